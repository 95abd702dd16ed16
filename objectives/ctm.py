"""CTM: Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji & Ermon 2024, "Consistency Trajectory Models: Learning
Probability Flow ODE Trajectory of Diffusion" (ICLR 2024), checked against sony/ctm (code/cm/karras_diffusion.py,
resample.py, script_util.py, train_util.py) and the fact sheet's section 5.

The student is a flow map (models/flow_map.py) over the objective's backbone, given a second time input and started
from the teacher's weights, so that before training it takes exactly the teacher's Euler step for every jump:

    G_theta(x_t, t, s) = (s / t) x_t + (1 - s / t) g_theta(x_t, t, s),     g_theta(x, t, t) a denoiser

Per student step, on the N-level Karras grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min (N = 18 CIFAR-10,
40 ImageNet-64; `num_levels`):

    k ~ p(k) = k^k_power / Z on {1, ..., K}   K = max_teacher_steps (default N - 1), one k per sample
    n ~ U{0, ..., N - 1 - k};  m ~ U{n + k, ..., N - 1};   t = sigma_n,  u = sigma_{n+k},  s = sigma_m  (s <= u < t)
    x_t  = x0 + t z
    x_u  = Solver(x_t, t -> u): k steps of the frozen teacher along the grid (TEACHER_STEPS[teacher_solver], Heun)
    est  = G_ema(G_theta(x_t, t, s), s, sigma_min)        inner jump online; outer jump with the target weights
                                                          (frozen), the gradient flowing through its input
    tgt  = G_ema(G_sg(theta)(x_u, u, s), s, sigma_min)    under no_grad, with the online pass's dropout mask
    L_CTM = E d(est, tgt)                                 d = `distance` (the paper: LPIPS; weight "uniform")

    L_DSM = E lambda(sigma) mean_elements (g_theta(x0 + sigma z', sigma, sigma) - x0)^2,
            lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (EDM's weight), sigma drawn half from
            lognormal(-1.2, 1.2), half as sigma(v) = (sigma_max^(1/rho) + v (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
            with v ~ U[0, 0.7] (the code's "halflognormal" sampler with diffusion_mult = 0.7)
    lambda_DSM = ||grad_w L_CTM|| / (||grad_w L_DSM|| + 1e-4), clamped to [0, 1e4] and detached, w the output layer

    L_GAN (optional, gan_weight > 0): fake = G_theta(x0 + sigma_max z'', sigma_max, sigma_min) (the one-step sample);
            objectives/adversarial.GanTerm with a models/discriminators.py network: hinge loss, D on real data and
            detached fakes, G: -D(fake); lambda_GAN = gan_weight * clip(||grad_w L_CTM|| / (||grad_w L_GAN|| + 1e-4),
            0.01, 10)

    student loss = L_CTM + lambda_DSM L_DSM + lambda_GAN L_GAN; after its optimiser step: ema <- mu ema + (1 - mu) theta

Sampling (`generate`, solvers/flow_map.py's gamma-sampling, Algorithm 3 of the paper): levels flow_map_levels(nfe)
(sigma_max, the nfe - 1 inner levels of the (nfe + 1)-level Karras grid, 0), x <- G(x, s_k, sqrt(1 - gamma^2) s_{k+1})
+ gamma s_{k+1} n; gamma = 0 (default) is deterministic, gamma = 1 multistep consistency sampling. `denoiser()` gives
g(x, sigma, sigma) as a denoiser D(x, sigma, class_labels=None), so any ODE solver samples the student too
(runs.sample --solver heun).

Choices and where they differ from the paper and its code:
- max_teacher_steps is the code's num_heun_step: N - 1 by default (17 CIFAR-10, 39 ImageNet-64; 20 in its ImageNet
  GAN fine-tune); k_power its heun_step_multiplier (1: "weighted"; 0 gives uniform k).
- k is drawn per sample (the code draws one k per batch and broadcasts it to every process; `shared_k=true` does
  that). The marginal law of (t, u, s) is the same. The k teacher steps of a batch run as max(k) steps over a batch
  sorted by k, each step on the prefix of samples that still have steps to take, so the teacher is evaluated sum(k)
  times, not B max(k); the draws are made on the CPU, so the loop needs no device-to-host sync.
- The outer jumps use a target EMA of the student with rate `target_decay`: 0.999 in the paper's CTM+DSM stage
  (0.9999 in its CIFAR GAN stage). The default here is 0.99: the CPU defaults train a few hundred steps, over which
  an EMA of rate 0.999 (half-life 693 steps) would barely leave its initialisation. Set 0.999 at the paper's scale.
  The target starts as a copy of the (teacher-initialised) student, is saved in checkpoints and is separate from the
  loop's evaluation EMA.
- distance: "mse" by default (the project's default, as cd's); the paper used LPIPS at 224 px
  (objective.distance=lpips); pseudo_huber is another offline choice.
- The output layer w of the adaptive weights: the code names it per network (the DDPM++ decoder's last aux conv,
  the ADM's last output block conv). Here `last_layer="auto"` finds it once at construction, by a probe forward of
  g(x, sigma, sigma): the weight (a parameter of >= 2 dimensions) nearest to the output in the autograd graph, i.e.
  unet `out_conv.weight`, dit `final.linear.weight`, mlp `out.weight`; or name a student parameter
  (e.g. "backbone.out_conv.weight"). dsm_weight may also be a fixed number (0 drops the DSM term).
- The DSM pass calls the flow map's `denoise` (g at s = t) on the module itself; inside a DDP wrapper its gradient
  is still all-reduced, since the CTM pass of the same backward goes through the wrapper's forward (DDP reduces each
  parameter's accumulated gradient once per backward).
- GAN term: off by default (the paper adds it in a fine-tuning stage from a CTM+DSM checkpoint). Phases then
  alternate as the code's g_learning_period = 2: the student on even steps, the discriminator on odd ones; the
  generator's GAN term starts at `gan_start` (discriminator_start_itr). The fake is the one-step sample from
  sigma_max, as the code's default GAN times give (gan_num_heun_step = N - 1); real = data. Discriminator "auto":
  teacher_features with a network teacher, conv with an analytic one (the paper's StyleGAN-XL projected
  discriminator on frozen DeiT + EfficientNet features is not in the registry; "dino" is the nearest). Its optimiser:
  RAdam, lr 2e-3, betas (0.5, 0.9), no EMA (the code's). The student's optimiser is the loop's (the paper: RAdam,
  lr 4e-4 in the CTM+DSM stage, 8e-6 in the ImageNet GAN stage: optim.student.optimizer=radam).
- As in the code: no time weighting of L_CTM (weight_schedule "uniform"), the teacher's solver steps taken on the
  grid itself (u is a grid level), and lambda_DSM computed afresh on every batch.
"""
import collections
import math

import torch

from models.discriminators import data_shape
from models.ema import update_ema
from models.flow_map import FlowMapDenoiser
from models.noise import append_dims
from objectives.adversarial import GanTerm
from objectives.base import TEACHER_STEPS, Objective, flow_map_student, frozen_copy, pick, unwrap
from objectives.consistency import random_state, replayed_random_draws
from objectives.distances import make_distance
from solvers import flow_map_levels, karras, sample_flow_map

ADAPTIVE_EPS = 1e-4            # ||grad L_CTM|| / (||grad L_other|| + 1e-4)
DSM_WEIGHT_MAX = 1e4           # the code clamps lambda_DSM to [0, 1e4]
GAN_WEIGHT_RANGE = (0.01, 10.0)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def output_layer(flow_map, shape, conditional):
    """The name of the weight nearest to the output of g(x, sigma, sigma) in its autograd graph (breadth first from
    the output; parameters of >= 2 dimensions only), found by one probe forward on a zero input of `shape`."""
    names = {id(p): name for name, p in flow_map.named_parameters() if p.requires_grad}
    like = next(flow_map.parameters())
    x = torch.zeros(1, *shape, device=like.device)
    labels = torch.zeros(1, dtype=torch.long, device=like.device) if conditional else None
    mode = flow_map.training
    with torch.enable_grad():
        out = flow_map.eval().denoise(x, torch.ones(1, device=like.device), labels)  # eval: no dropout draws
    flow_map.train(mode)
    queue, seen = collections.deque([out.grad_fn]), set()
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and variable.ndim >= 2 and id(variable) in names:
            return names[id(variable)]
        queue.extend(child for child, _ in node.next_functions)
    raise ValueError("ctm: found no trainable weight in the student's output path for the adaptive DSM/GAN weights; "
                     "name one with objective.last_layer=... or set a fixed objective.dsm_weight")


class CTM(Objective):
    """CTM (Kim et al. 2024): a flow map G(x, t, s) trained by soft consistency through the teacher's solver steps.

    Plus its DSM term, an optional GAN term through the discriminator registry, and gamma-sampling (module
    docstring)."""

    method = "ctm"
    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True
    needs_data = True
    eval_nfe = 1

    def __init__(self, backbone, teacher=None, num_levels=18, max_teacher_steps=None, k_power=1.0, shared_k=False,
                 teacher_solver="heun", target_decay=0.99, distance="mse", dsm_weight="adaptive", dsm_P_mean=-1.2,
                 dsm_P_std=1.2, dsm_karras_max=0.7, last_layer="auto", gan_weight=0.0, gan_start=0,
                 discriminator="auto", disc_args=None, gan_loss="hinge", r1_weight=0.0, r1_kind="exact", gamma=0.0,
                 sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__()
        if teacher is None:
            raise ValueError("ctm needs a teacher: pass --teacher RUN (a trained denoiser), or none for an analytic "
                             "teacher fitted to the data")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"ctm: num_levels (N, the Karras grid's levels) must be an integer >= 2; got "
                             f"{num_levels!r}")
        if max_teacher_steps is None:
            max_teacher_steps = num_levels - 1
        if (isinstance(max_teacher_steps, bool) or not isinstance(max_teacher_steps, int)
                or not 1 <= max_teacher_steps <= num_levels - 1):
            raise ValueError(f"ctm: max_teacher_steps (the largest k) must be an integer in 1..{num_levels - 1} "
                             f"(num_levels - 1); got {max_teacher_steps!r}")
        if not is_number(k_power) or k_power < 0:
            raise ValueError(f"ctm: k_power (p(k) proportional to k^k_power) must be a number >= 0; got {k_power!r}")
        if not isinstance(shared_k, bool):
            raise ValueError(f"ctm: shared_k must be true or false; got {shared_k!r}")
        if not is_number(target_decay) or not 0 <= target_decay < 1:
            raise ValueError(f"ctm: target_decay (the target EMA rate mu) must be in [0, 1); got {target_decay!r}")
        if dsm_weight != "adaptive" and (not is_number(dsm_weight) or dsm_weight < 0):
            raise ValueError(f"ctm: dsm_weight must be 'adaptive' or a number >= 0 (0: no DSM term); got "
                             f"{dsm_weight!r}")
        if not is_number(dsm_P_mean) or not is_number(dsm_P_std) or dsm_P_std <= 0:
            raise ValueError(f"ctm: dsm_P_mean must be a number and dsm_P_std a number > 0; got {dsm_P_mean!r}, "
                             f"{dsm_P_std!r}")
        if not is_number(dsm_karras_max) or not 0 < dsm_karras_max <= 1:
            raise ValueError(f"ctm: dsm_karras_max (the DSM levels' largest Karras position) must be in (0, 1]; "
                             f"got {dsm_karras_max!r}")
        if not is_number(gan_weight) or gan_weight < 0:
            raise ValueError(f"ctm: gan_weight must be a number >= 0 (0: no GAN term); got {gan_weight!r}")
        if isinstance(gan_start, bool) or not isinstance(gan_start, int) or gan_start < 0:
            raise ValueError(f"ctm: gan_start must be an integer >= 0; got {gan_start!r}")
        if not is_number(gamma) or not 0 <= gamma <= 1:
            raise ValueError(f"ctm: gamma (of gamma-sampling) must lie in [0, 1]; got {gamma!r}")
        if not all(is_number(v) for v in (sigma_min, sigma_max, rho)) or not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError(f"ctm: needs 0 < sigma_min < sigma_max and rho > 0; got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}, rho={rho!r}")
        self.teacher = teacher
        self.teacher_step = pick(TEACHER_STEPS, teacher_solver, "ctm teacher_solver")
        self.num_levels, self.max_teacher_steps = num_levels, max_teacher_steps
        self.k_power, self.shared_k = float(k_power), shared_k
        self.mu = float(target_decay)
        self.distance = make_distance(distance)
        self.dsm_weight = dsm_weight if dsm_weight == "adaptive" else float(dsm_weight)
        self.dsm_P_mean, self.dsm_P_std = float(dsm_P_mean), float(dsm_P_std)
        self.dsm_karras_max = float(dsm_karras_max)
        self.gan_weight, self.gan_start = float(gan_weight), gan_start
        self.gamma = float(gamma)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.gan = None
        if self.gan_weight > 0:
            self.gan = GanTerm("ctm", backbone, teacher, discriminator, disc_args, gan_loss, r1_weight, r1_kind)
        try:
            student, self.initialised_from_teacher = flow_map_student(backbone, teacher)
        except ValueError as error:
            raise ValueError(f"ctm: {error}") from None
        self.networks["student"] = student
        if self.gan is not None:
            self.networks["discriminator"] = self.gan.module
        self.sigma_data = student.sigma_data
        self.last_layer = None  # the output layer w of the adaptive weights, by name
        if self.dsm_weight == "adaptive" or self.gan is not None:
            if last_layer in ("auto", None):
                last_layer = output_layer(student, data_shape(backbone), self.conditional)
            known = [name for name, p in student.named_parameters() if p.requires_grad]
            if last_layer not in known:
                raise ValueError(f"ctm: last_layer {last_layer!r} is not a trainable parameter of the student "
                                 f"(e.g. {known[-1]!r})")
            self.last_layer = last_layer
        self.target = frozen_copy(student)  # G_ema of the outer jumps
        grid = karras(num_levels, self.sigma_min, self.sigma_max, self.rho)[:-1]
        self.grid = grid.to(torch.float32)  # sigma_0 = sigma_max ... sigma_{N-1} = sigma_min (moved by .to())
        self.k_weights = tuple(float(k) ** self.k_power for k in range(1, max_teacher_steps + 1))  # p(k) on the CPU

    # -- roles and optimisers

    def phases(self, step):
        if self.gan is None:
            return ["student"]
        return ["student"] if step % 2 == 0 else ["discriminator"]

    def optimizer_settings(self):
        if self.gan is None:
            return {}
        return {"discriminator": {"optimizer": "radam", "lr": 2e-3, "betas": (0.5, 0.9), "ema": False}}

    def labels_of(self, batch):
        return batch[-1] if self.conditional else None

    # -- times

    def draw_steps(self, batch):
        """(n, k, m) [B] int64 on the CPU: start index, teacher steps, index of s (module docstring)."""
        draws = 1 if self.shared_k else batch
        k = torch.multinomial(torch.tensor(self.k_weights, dtype=torch.float64), draws, replacement=True) + 1
        k = k.expand(batch) if self.shared_k else k
        n = (torch.rand(batch, dtype=torch.float64) * (self.num_levels - k)).long()
        m = n + k + (torch.rand(batch, dtype=torch.float64) * (self.num_levels - n - k)).long()
        return n, k, m

    def teacher_solve(self, x_t, n, k, labels):
        """x_u: k[b] teacher steps along the grid from level n[b], under no_grad. Samples are sorted by k, so step j
        runs on the prefix of those with k > j; n, k on the CPU (counts need no device sync)."""
        order = torch.argsort(k, descending=True, stable=True)
        counts = (k[order][None, :] > torch.arange(int(k.max()))[:, None]).sum(1).tolist()
        device = x_t.device
        order_dev = order.to(device, non_blocking=True)
        x = x_t[order_dev]
        start = n[order].to(device, non_blocking=True)
        labels = None if labels is None else labels[order_dev]
        for j, count in enumerate(counts):
            level = start[:count] + j
            cond = None if labels is None else {"class_labels": labels[:count]}
            x[:count] = self.teacher_step(self.teacher, x[:count], self.grid[level], self.grid[level + 1],
                                          cond=cond)[0]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return x[inverse.to(device, non_blocking=True)]

    def dsm_sigma(self, batch, device):
        """Half lognormal(P_mean, P_std), half the Karras curve at v ~ U[0, dsm_karras_max]."""
        half = batch // 2
        lognormal = (self.dsm_P_mean + self.dsm_P_std * torch.randn(half, device=device)).exp()
        v = torch.rand(batch - half, device=device) * self.dsm_karras_max
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return torch.cat([lognormal, (hi + v * (lo - hi)) ** self.rho])

    # -- the losses

    def target_network(self):
        return self.target.train(self.networks["student"].training)  # the online pass's dropout

    def ctm_loss(self, x0, labels):
        student, target = self.networks["student"], self.target_network()
        batch, device = x0.shape[0], x0.device
        n, k, m = self.draw_steps(batch)
        t, u, s = (self.grid[i.to(device, non_blocking=True)] for i in (n, n + k, m))
        floor = torch.full_like(s, self.sigma_min)
        x_t = x0 + append_dims(t, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, n, k, labels)
        draws = random_state(device)
        estimate = target(student(x_t, t, s, labels), s, floor, labels)
        with torch.no_grad(), replayed_random_draws(draws, device):  # one dropout mask for both
            goal = target(student(x_u, u, s, labels), s, floor, labels)
        return self.distance(estimate, goal).mean()

    def dsm_loss(self, x0, labels):
        sigma = self.dsm_sigma(x0.shape[0], x0.device)
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        g = unwrap(self.networks["student"]).denoise(x, sigma, labels)  # g(x, sigma, sigma)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (g.float() - x0.float()).square().flatten(1).mean(1)).mean()

    def gan_fake(self, x0, labels):
        """The one-step sample G_theta(x0 + sigma_max z, sigma_max, sigma_min), on the graph."""
        sigma = torch.full((x0.shape[0],), self.sigma_max, device=x0.device)
        x = x0 + self.sigma_max * torch.randn_like(x0)
        return self.networks["student"](x, sigma, torch.full_like(sigma, self.sigma_min), labels)

    def output_gradient_norm(self, loss):
        """||d loss / d w|| for the output layer w (0 when loss does not reach it), or None where no gradient can be
        taken (no grad mode, or w frozen)."""
        weight = unwrap(self.networks["student"]).get_parameter(self.last_layer)
        if not (torch.is_grad_enabled() and weight.requires_grad and loss.requires_grad):
            return None
        (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        return torch.zeros((), device=loss.device) if grad is None else grad.float().norm()

    def adaptive_weight(self, ctm_norm, loss):
        """||grad_w L_CTM|| / (||grad_w loss|| + 1e-4), detached; 1 where no gradient can be taken."""
        other = self.output_gradient_norm(loss)
        if ctm_norm is None or other is None:
            return torch.ones((), device=loss.device)
        return (ctm_norm / (other + ADAPTIVE_EPS)).detach()

    def student_loss(self, x0, labels, step):
        ctm = self.ctm_loss(x0, labels)
        loss, logs = ctm, {"ctm": ctm.detach()}
        use_gan = self.gan is not None and step >= self.gan_start
        ctm_norm = self.output_gradient_norm(ctm) if (self.dsm_weight == "adaptive" or use_gan) else None
        if self.dsm_weight == "adaptive" or self.dsm_weight > 0:
            dsm = self.dsm_loss(x0, labels)
            if self.dsm_weight == "adaptive":
                weight = self.adaptive_weight(ctm_norm, dsm).clamp(0, DSM_WEIGHT_MAX)
            else:
                weight = torch.tensor(self.dsm_weight, device=dsm.device)
            loss = loss + weight * dsm
            logs.update(dsm=dsm.detach(), dsm_weight=weight)
        if use_gan:
            gan = self.gan.generator_loss(self.networks["discriminator"], self.gan_fake(x0, labels), labels)
            weight = self.gan_weight * self.adaptive_weight(ctm_norm, gan).clamp(*GAN_WEIGHT_RANGE)
            loss = loss + weight * gan
            logs.update(gan=gan.detach(), gan_weight=weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def loss(self, role, batch, step):
        x0, labels = batch[0], self.labels_of(batch)
        if role == "student":
            return self.student_loss(x0, labels, step)
        if role == "discriminator" and self.gan is not None:
            with torch.no_grad():
                fake = self.gan_fake(x0, labels)
            return self.gan.discriminator_loss(self.networks["discriminator"], x0, fake, labels)
        raise ValueError(f"ctm has roles {', '.join(self.networks)}; got {role!r}")

    # -- the target EMA

    def after_step(self, role, step):
        if role == "student":
            update_ema(self.target, unwrap(self.networks["student"]), self.mu)

    def state_dict(self):
        return {"target": {k: v.detach().clone() for k, v in self.target.state_dict().items()}}

    def load_state_dict(self, state):
        if "target" in state:
            self.target.load_state_dict(state["target"])  # in place: it stays where .to() put it

    # -- sampling

    def generate(self, z, nfe, cond=None):
        """gamma-sampling with nfe jumps over flow_map_levels(nfe) (module docstring)."""
        labels = (cond or {}).get("class_labels") if self.conditional else None
        sigmas = torch.tensor(flow_map_levels(nfe, self.sigma_min, self.sigma_max, self.rho), dtype=torch.float64)
        return sample_flow_map(self.networks["student"], self.sigma_max * z, sigmas,
                               cond=None if labels is None else {"class_labels": labels}, gamma=self.gamma)

    def denoiser(self):
        return FlowMapDenoiser(unwrap(self.networks["student"]))
