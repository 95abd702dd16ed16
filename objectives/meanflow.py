"""MeanFlow: Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447).

A one-step generator trained from scratch (no teacher) by regressing the AVERAGE velocity of the flow-matching ODE
over an interval [r, t] onto a target built from the model itself through the MeanFlow identity.

In the paper's coordinates, z_t = (1 - t) x + t e (x data, e ~ N(0, I), t in [0, 1]; t = 1 is pure noise):

    u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds            average velocity; z_r = z_t - (t - r) u(z_t, r, t)
    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)      the MeanFlow identity (d/dt along the trajectory)
    d/dt u       = v . grad_z u + partial_t u                  = jvp of u at (z_t, r, t) with tangent (v, 0, 1)

Algorithm 1 of the paper, line by line, and where each line is here (`MeanFlow.loss`):

    t, r = sample_t_r()                     draw_times: two logit-normal draws, r = min, t = max; r = t for a
                                            fraction 1 - r_neq_t of the batch (plain flow matching rows)
    e = randn_like(x)
    z = (1 - t) * x + t * e
    v = e - x                               the conditional velocity (guided_velocity: v_g under CFG, below)
    u, dudt = jvp(fn, (z, r, t), (v, 0, 1)) target(): torch.func.jvp of u_theta(z, r, t) in (z, t) with r held,
                                            tangent (v, 1), under no_grad, in float32 with autocast off, on the
                                            unwrapped student, replaying the graded pass's dropout masks
    u_tgt = v - (t - r) * dudt              (t - r) clipped to [0, 1] as the JAX code does
    error = u - stopgrad(u_tgt)             u: the graded pass, through self.networks["student"] (the DDP wrapper,
                                            so gradients are synchronised; jvp cannot run through DDP)
    loss = metric(error)                    adaptive L2: d = ||error||^2 summed over pixels, loss = mean(w d) with
                                            w = sg(1 / (d + c)^p); p = 1 - gamma in the paper

and sampling (the paper's Algorithm 2): x = e - u_theta(e, 0, 1) in one step, z_r = z_t - (t - r) u in several.

The network. The student is a models.flow_map.FlowMap with the "flow" parameterisation over a two-time backbone
(unet, dit, mlp given a second time input): its backbone output F(c_in x, c_noise(sigma), c_noise(sigma_to)) IS
MeanFlow's u(z_t, r, t) at sigma = t / (1 - t), x = z_t / (1 - t), sigma_to = r / (1 - r) (c_in x = z_t exactly),
and its jump G(x, sigma, sigma_to) is z_r = z_t - (t - r) u in VE coordinates (FlowMap's docstring). So the same
weights sample through solvers.sample_flow_map like any flow map, and g(x, sigma, sigma) = z_t - t u(z_t, t, t) is
a flow-matching denoiser (`denoiser()`: any ODE solver samples it). MeanFlowMap.velocity is u_theta(z, r, t) written
in flow coordinates; the conversion to the FlowMap's VE inputs happens INSIDE it, so the jvp in (z, t) differentiates
through sigma(t), x(z, t) and the noise label ln(sigma)/4 (the chain rule the identity needs). The paper's network
is conditioned on (t, t - r) (positional embeddings); here on (ln sigma_t / 4, ln sigma_r / 4) = (logit t / 4,
logit r / 4), the project's noise labels: the same information, but it has no value at t = 1 or r = 0.

Choices forced by that, and other choices:
  - Levels are clamped to [sigma_min, sigma_max] (default [0.002, 80], the project's range; t in [0.001996,
    0.98765]): a logit-normal t is exactly a lognormal sigma = e^l (l = logit t), so draw_times clamps l to
    [ln sigma_min, ln sigma_max] after ordering. With the paper's CIFAR-10 (-2, 2) that touches ~3% of r and
    ~0.15% of t draws. sigma_min >= the flow map's target-label floor (0.002), so the network always sees the r it is
    trained for.
  - Sampling starts at t_max = sigma_max / (1 + sigma_max) from x = sigma_max e (flow z = t_max e: the VE
    convention of every sampler here; the data's share (1 - t_max) x of z is dropped, as everywhere in VE) instead
    of t = 1, and the last jump lands at sigma_min, whose state is the sample (as a consistency model's f(x,
    sigma_min)): u was trained for r >= r_min, and landing there instead of at 0 keeps the error second-order
    (~sigma_min^2 times the score) rather than first-order (~r_min |e|). Starting at sigma = 80 instead of infinity
    moves a sample by ~sigma_data |E x| / 80 (a Gaussian's map). n-step sampling jumps through levels uniform in t
    on [0, t_max] (2 steps: t = t_max / 2, sigma ~ 0.976), unless sample_sigmas gives the inner levels.
  - (t, r) draws (py-meanflow's "v0", the paper's): both from one logit-normal (p_mean, p_std), ordered; each row
    keeps r != t with probability r_neq_t. PITFALL: py-meanflow's `ratio` is this fraction, the JAX code's
    `data_proportion` is its complement (the fraction with r = t). Paper / official settings:
        CIFAR-10 (U-Net, from scratch): (-2, 2), r_neq_t = 0.75, p = 0.75, c = 1e-3      <- the defaults here
        ImageNet 256 (latent DiT):      (-0.4, 1.0), r_neq_t = 0.25, p = 1.0, c = 1e-2
    (py-meanflow's later "v1" sampler, with separate t and r distributions, is not implemented.)
  - CFG in training (class-conditional runs; the JAX code's guidance_fn and cond_drop): for t in cfg_interval,
        v_g = omega v + (1 - omega - kappa) u_theta(z, t, t | null) + kappa u_theta(z, t, t | c)
    (no grad, eval mode), replaces v both as the jvp tangent and in u_tgt; label_dropout (10%) of the rows get the
    null label and keep v_g = v. omega = 1, kappa = 0 (the default) is plain conditional training, with the labels
    still dropped at label_dropout so that the unconditional model trains too. The objective drops labels itself (a
    one-hot row of zeros is the null label of every backbone here), so with guidance on the backbone's own
    label_dropout must be 0. Sampling uses no guidance: it is in the weights.
  - The jvp differentiates the network in its noise label (d(ln sigma / 4)/dt = 1 / (4 t (1 - t))), so the label's
    embedding must be smooth: the unet's and dit's default sinusoidal embedding (frequencies <= 1) is; the mlp's
    default random Fourier features (scale 16, slopes ~100 per unit label) are not: on the 2-D mixture 600 steps
    left a one-step map error of 0.41 against 0.14 with backbone.embedding=positional (iCT and sCM shrink Fourier
    scales for the same reason). Use backbone.embedding=positional with the mlp.
  - Attention under jvp: PyTorch's flash / memory-efficient SDPA kernels have no forward-mode AD, so the jvp runs with
    SDPA held to its math kernel (the U-Net's attention layers call SDPA; the DiT takes its own math path when it
    sees a tangent). The jvp pass costs ~2.5x a forward + backward of the student (default U-Net on MNIST).
  - The paper's CIFAR-10 recipe beyond the loss (batch 1024, Adam (0.9, 0.999), lr 6e-4, 800k iterations, dropout
    0.2, EDM augmentation, EMA 0.9999) is the loop's and the backbone's to set (train.*, backbone.dropout); the
    defaults here stay CPU-sized.
"""
import contextlib
import math

import torch
from torch.nn import functional as F

from models.flow_map import SIGMA_TO_FLOOR, FlowMap, FlowMapDenoiser
from models.forward_ad import full_precision, time_jvp
from models.noise import append_dims, edm_log_noise_label, flow_sigma
from objectives.base import Objective, unwrap
from objectives.consistency import random_state, replayed_random_draws
from solvers import sample_flow_map


def float_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def evaluating(module):
    """`module` in eval mode inside (no dropout, no label dropout), its own mode after."""
    was_training = module.training
    module.train(False)
    try:
        yield module
    finally:
        module.train(was_training)


class MeanFlowMap(FlowMap):
    """A models.flow_map.FlowMap ("flow" parameterisation) that can also be called in MeanFlow's coordinates:
    forward(x, sigma, sigma_to, class_labels) is the flow map's jump G (VE, for samplers); forward(z_t, t, r,
    class_labels, flow=True) is u_theta(z_t, r, t), the backbone output (for the graded pass, through DDP)."""

    def forward(self, x, sigma, sigma_to, class_labels=None, flow=False):
        if flow:
            return self.velocity(x, sigma, sigma_to, class_labels)
        return super().forward(x, sigma, sigma_to, class_labels)

    def velocity(self, z, t, r, class_labels=None):
        """u_theta(z_t, r, t) [B, ...] from flow coordinates: z [B, ...], t, r [B] with 0 < r <= t < 1. The VE inputs
        (sigma = t / (1 - t), x = z / (1 - t), sigma_to = r / (1 - r)) are made here, so a jvp of this function in
        (z, t) differentiates through them. Float32 (or float64 when z and the backbone are float64)."""
        dtype = float_dtype(z)
        t, r = t.to(dtype), r.to(dtype)
        if dtype == torch.float64:
            first = next(iter(self.backbone.parameters()), None)
            dtype = torch.float64 if first is None or first.dtype == torch.float64 else torch.float32
        sigma = append_dims(flow_sigma(t), z.ndim)
        x = z / append_dims(1 - t, z.ndim)
        _, _, c_in, c_noise = self.coefficients(sigma)  # as Denoiser.raw, without its float32 cast
        target = edm_log_noise_label(flow_sigma(r).clamp_min(SIGMA_TO_FLOOR))  # as FlowMap.jump
        out = self.backbone((c_in * x).to(dtype), c_noise.flatten().to(dtype), class_labels,
                            target_noise_labels=target.to(dtype))
        return out.to(dtype)


class MeanFlow(Objective):
    """MeanFlow (Geng et al. 2025): a one- or few-step flow map trained from scratch on the MeanFlow identity.

    Average-velocity regression with a jvp target, (t, r) logit-normal draws, adaptive loss, optional CFG in
    training; see the module docstring."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    eval_nfe = 1

    def __init__(self, backbone, teacher=None, p_mean=-2.0, p_std=2.0, r_neq_t=0.75, norm_p=0.75, norm_c=1e-3,
                 sigma_min=0.002, sigma_max=80.0, sample_sigmas=(), cfg_omega=1.0, cfg_kappa=0.0,
                 cfg_interval=(0.0, 1.0), label_dropout=0.1):
        super().__init__()
        if teacher is not None:
            raise ValueError("meanflow trains from scratch and takes no teacher")
        numbers = dict(p_mean=p_mean, p_std=p_std, r_neq_t=r_neq_t, norm_p=norm_p, norm_c=norm_c,
                       sigma_min=sigma_min, sigma_max=sigma_max, cfg_omega=cfg_omega, cfg_kappa=cfg_kappa,
                       label_dropout=label_dropout)
        bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v)]
        if bad:
            raise ValueError(f"meanflow {bad[0]} must be a finite number; got {numbers[bad[0]]!r}")
        checks = [(p_std > 0, f"p_std > 0 (the logit-normal's std), got {p_std}"),
                  (0 <= r_neq_t <= 1, f"0 <= r_neq_t <= 1 (the fraction of rows with r != t), got {r_neq_t}"),
                  (0 <= norm_p <= 1, f"0 <= norm_p <= 1 (the adaptive weight's power p = 1 - gamma), got {norm_p}"),
                  (norm_c > 0, f"norm_c > 0 (the adaptive weight's constant c), got {norm_c}"),
                  (SIGMA_TO_FLOOR <= sigma_min < sigma_max,
                   f"{SIGMA_TO_FLOOR} <= sigma_min < sigma_max (the flow map's target-label floor is "
                   f"{SIGMA_TO_FLOOR}), got sigma_min={sigma_min}, sigma_max={sigma_max}"),
                  (cfg_omega > 0, f"cfg_omega > 0, got {cfg_omega}"),
                  (0 <= cfg_kappa < 1, f"0 <= cfg_kappa < 1, got {cfg_kappa}"),
                  (0 <= label_dropout < 1, f"0 <= label_dropout < 1, got {label_dropout}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"meanflow needs {message}")
        interval = list(cfg_interval) if isinstance(cfg_interval, (list, tuple)) else None
        if interval is None or len(interval) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval) \
                or not 0 <= interval[0] < interval[1] <= 1:
            raise ValueError(f"meanflow cfg_interval must be [t_start, t_end] with 0 <= t_start < t_end <= 1; "
                             f"got {cfg_interval!r}")
        self.p_mean, self.p_std, self.r_neq_t = float(p_mean), float(p_std), float(r_neq_t)
        self.norm_p, self.norm_c = float(norm_p), float(norm_c)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.cfg_omega, self.cfg_kappa = float(cfg_omega), float(cfg_kappa)
        self.cfg_interval = (float(interval[0]), float(interval[1]))
        self.label_dropout = float(label_dropout)
        self.guided = self.cfg_omega != 1.0 or self.cfg_kappa != 0.0
        self.label_dim = int(getattr(backbone, "label_dim", 0) or 0)
        self.conditional = self.label_dim > 0
        if self.guided and not self.conditional:
            raise ValueError("meanflow cfg_omega / cfg_kappa (guidance in training) need class labels: set "
                             "train.conditional=true (a backbone with label_dim > 0)")
        if self.guided and self.label_dropout == 0:
            raise ValueError("meanflow guidance in training needs label_dropout > 0 (the paper's 0.1) to train the "
                             "unconditional velocity it uses")
        if self.guided and getattr(backbone, "label_dropout", 0):
            raise ValueError("meanflow drops labels itself (objective.label_dropout) when it trains with guidance; "
                             "set backbone.label_dropout=0")
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        if any(not self.sigma_min < s < self.sigma_max for s in self.sample_sigmas) or \
                self.sample_sigmas != sorted(set(self.sample_sigmas), reverse=True):
            raise ValueError(f"meanflow sample_sigmas (the inner levels of few-step sampling) must decrease strictly "
                             f"inside ({sigma_min}, {sigma_max}); got {list(sample_sigmas)}")
        self.networks["student"] = MeanFlowMap(backbone, "flow")  # FlowMap raises for a one-time backbone

    # -- Algorithm 1

    def draw_times(self, n, device):
        """(t, r) [n], r <= t: two logit-normal draws ordered, r = t with probability 1 - r_neq_t, each level
        clamped to [sigma_min, sigma_max] in sigma = e^logit (module docstring)."""
        a = self.p_mean + self.p_std * torch.randn(n, device=device)
        b = self.p_mean + self.p_std * torch.randn(n, device=device)
        same = torch.rand(n, device=device) >= self.r_neq_t
        high, low = torch.maximum(a, b), torch.minimum(a, b)
        low = torch.where(same, high, low)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.sigmoid(high.clamp(lo, hi)), torch.sigmoid(low.clamp(lo, hi))

    def class_rows(self, labels, n, device):
        """Float label rows [n, label_dim] (int ids one-hot) or None when unconditional."""
        if not self.conditional:
            return None
        if labels.dtype in (torch.int64, torch.int32) and labels.shape == (n,):
            return F.one_hot(labels.long(), self.label_dim).float()
        return labels.float()

    def guided_velocity(self, z, t, v, rows):
        """(label rows with label_dropout of them nulled, v_g): CFG in training (module docstring). Unconditional:
        (None, v)."""
        if rows is None:
            return None, v
        keep = torch.rand(rows.shape[0], device=rows.device) >= self.label_dropout
        dropped = rows * append_dims(keep, rows.ndim).to(rows.dtype)
        if not self.guided:
            return dropped, v
        student = unwrap(self.networks["student"])
        with torch.no_grad(), full_precision(z.device), evaluating(student):
            zf, tf = z.to(float_dtype(z)), t.to(float_dtype(z))
            v_g = self.cfg_omega * v
            if self.cfg_omega + self.cfg_kappa != 1:
                v_g = v_g + (1 - self.cfg_omega - self.cfg_kappa) * student.velocity(zf, tf, tf, torch.zeros_like(rows))
            if self.cfg_kappa:
                v_g = v_g + self.cfg_kappa * student.velocity(zf, tf, tf, rows)
        inside = keep & (t >= self.cfg_interval[0]) & (t <= self.cfg_interval[1])
        return dropped, torch.where(append_dims(inside, v.ndim), v_g.to(v.dtype), v)

    def velocity_and_derivative(self, z, t, r, tangent, labels=None):
        """(u_theta(z, r, t), d/dt u_theta = jvp in (z, t) with tangent (tangent, 1), r held), no grad, autocast
        off, float32 (float64 inputs stay float64), on the unwrapped student (jvp cannot run through DDP), with
        PyTorch's attention held to its math kernel (the flash / memory-efficient ones have no forward-mode AD: the
        U-Net's attention layers call SDPA; the DiT switches to its own math path when it sees a tangent)."""
        student = unwrap(self.networks["student"])
        dtype = float_dtype(z)
        z, t, r, tangent = z.to(dtype), t.to(dtype), r.to(dtype), tangent.to(dtype)
        return time_jvp(lambda z_, t_: student.velocity(z_, t_, r, labels), (z, t), (tangent, torch.ones_like(t)),
                        "meanflow")

    def target(self, z, t, r, v, labels=None):
        """u_tgt = v - clip(t - r, 0, 1) d/dt u_theta(z, r, t), the jvp's tangent being v (no grad, float32)."""
        _, dudt = self.velocity_and_derivative(z, t, r, v, labels)
        with full_precision(z.device):
            return v.to(dudt.dtype) - append_dims((t - r).to(dudt.dtype).clamp(0, 1), z.ndim) * dudt

    def loss(self, role, batch, step):
        x, labels = batch[0], batch[-1]
        n, device = x.shape[0], x.device
        t, r = (s.to(float_dtype(x)) for s in self.draw_times(n, device))
        e = torch.randn_like(x)
        z = append_dims(1 - t, x.ndim) * x + append_dims(t, x.ndim) * e
        v = e - x
        rows, v_g = self.guided_velocity(z, t, v, self.class_rows(labels, n, device))
        draws = random_state(device)
        u = self.networks["student"](z, t, r, rows, flow=True)  # the graded pass, through the DDP wrapper
        with replayed_random_draws(draws, device):  # the jvp pass draws the same dropout masks
            u_tgt = self.target(z, t, r, v_g, rows)
        with full_precision(device):
            d = (u.to(u_tgt.dtype) - u_tgt).square().flatten(1).sum(1)
            weight = (d.detach() + self.norm_c) ** -self.norm_p
            loss = (weight * d).mean()
        return loss, {"loss": loss.detach(), "mse": d.detach().mean()}

    # -- sampling (Algorithm 2)

    def sample_levels(self, nfe):
        """[sigma_max, inner levels..., 0] of an nfe-jump sample (the last jump lands at sigma_min: generate)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"meanflow samples with an integer nfe >= 1; got {nfe!r}")
        if len(self.sample_sigmas) >= nfe - 1:
            inner = self.sample_sigmas[:nfe - 1]
        else:  # uniform in t on [0, t_max]
            t_max = self.sigma_max / (1 + self.sigma_max)
            inner = [flow_sigma(t_max * (1 - k / nfe)) for k in range(1, nfe)]
            if inner and inner[-1] <= self.sigma_min:
                raise ValueError(f"meanflow: {nfe} steps uniform in t put levels below sigma_min={self.sigma_min}; "
                                 "ask for fewer steps or give objective.sample_sigmas")
        return [self.sigma_max, *inner, 0.0]

    def generate(self, z, nfe, cond=None):
        """x = sigma_max z, then nfe jumps of the flow map G through sample_levels(nfe), the last one landing at
        sigma_min (its state is the sample): one step is z_r = z_t - (t - r) u_theta(z_t, r, t) from t_max to r_min."""
        student, floor = self.networks["student"], self.sigma_min

        def landing(x, sigma, sigma_to, **labels):
            return student(x, sigma, sigma_to.clamp_min(floor), **labels)

        labels = (cond or {}).get("class_labels") if self.conditional else None
        return sample_flow_map(landing, self.sigma_max * z, self.sample_levels(nfe),
                               cond=None if labels is None else {"class_labels": labels})

    def denoiser(self):
        """The student's instantaneous-velocity denoiser g(x, sigma, sigma) = z_t - t u_theta(z_t, t, t) (its r = t
        rows are plain flow matching), for any ODE solver."""
        return FlowMapDenoiser(unwrap(self.networks["student"]))
