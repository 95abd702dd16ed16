"""What the distribution-matching objectives share: Diff-Instruct (diff_instruct.py), DMD (dmd.py), DMD2 (dmd2.py)
and SiD (sid.py). Three networks, by role:

    student     G_theta(z) = D_theta(sigma_init z, sigma_init): a one-step generator. It is a Denoiser over the
                objective's backbone with the teacher's weights and preconditioning, so at step 0 it is the
                teacher's one-step map (one Euler step from sigma_init; class-conditional where the teacher is).
    fake_score  D_phi, a copy of the teacher trained by EDM's denoising score matching on detached generator samples
                (dsm.denoising_loss with EDM's weight (sigma^2 + sd^2)/(sigma sd)^2), so that it tracks the denoiser
                of the generator's distribution q. It must have the teacher's architecture (a copy), else a
                one-line ValueError.
    teacher     D_psi, frozen (not a role): the denoiser of the data distribution p.

With an analytic teacher (no `.backbone`, e.g. models.analytic.GaussianMixtureDenoiser) there are no weights to copy:
the generator and the fake score are the objective's backbone with its random initialisation (the fake score a copy
of the same random weights), as kd's student is. The generator then starts far from the data and the fake score
from whatever the random network denoises to; both are learnt.

The identity the four methods build on. By Tweedie, D(x_t, sigma) = x_t + sigma^2 grad log p_sigma(x_t), so

    D_fake(x_t) - D_teacher(x_t) = sigma^2 (s_q - s_p)(x_t)           s = score of the sigma-noised distribution

and for x_t = G_theta(z) + sigma n, grad_theta KL(q_sigma || p_sigma) = E[(s_q - s_p)(x_t)^T dx_t/dtheta] (the term
with d/dtheta of log q has zero mean). A method picks a per-sample vector g = w (D_fake - D_teacher) computed under
no-grad and applies it to the generator's sample through the surrogate

    L = 0.5 ||x - sg(x - g)||^2, reduced as the mean over the batch and the sample's elements,

whose gradient w.r.t. x is g / (B x elements): a descent step on the sigma-averaged reverse KL with weight w sigma^2.
SiD instead backpropagates through both networks (its own loss, sid.py).

Phases: the loop updates one role at a time with the other roles frozen but differentiable w.r.t. their inputs. The
fake-score loss draws its generator samples under no_grad (x_g is detached); the student's loss calls the fake score
and the teacher on a graph through x_g. Networks are called through `self.networks[role]` at call time.

Data: none (`needs_data = False`): each batch contributes only its size, shape, device and its labels (the class of
each generated sample where the backbone is conditional). DMD's batches are teacher rollouts (z, xs, labels).
Sampling: `generate(z, 1)` = G(z) (dmd2's multi-step generator overrides it).
"""
import copy

import torch

from models.noise import append_dims
from objectives.base import Objective, one_step_sample, student_denoiser
from objectives.dsm import denoising_loss, loss_weight


# -- noise levels


def lognormal_sigma(n, device, P_mean=-1.2, P_std=1.2):
    """ln sigma ~ N(P_mean, P_std^2), EDM's training distribution (Diff-Instruct, SiD's fake score)."""
    return (P_mean + P_std * torch.randn(n, device=device)).exp()


def karras_sigma(u, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma at u in [0, 1] along the Karras ramp, ascending: sigma_min at u = 0, sigma_max at u = 1. Level i of an
    ascending grid of N levels (DMD2's 1000-level grid) is u = i / (N - 1)."""
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + u * (high - low)) ** rho


def grid_sigma(n, device, first, last, levels=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma of a level drawn uniformly from first..last (inclusive) of the ascending Karras grid of `levels`."""
    index = torch.randint(first, last + 1, (n,), device=device)
    return karras_sigma(index.float() / (levels - 1), sigma_min, sigma_max, rho)


class KarrasGridLevels:
    """Mixin for dmd and dmd2 (DMD2's code, main/edm/edm_guidance.py): an ascending Karras grid of `levels` noise
    levels; the student's loss draws a level uniformly from indices int(dm_min_fraction levels) ..
    int(dm_max_fraction levels) (20 .. 980 of 1000: sigma 0.0032 .. 72), the fake score from all of them."""

    def use_grid(self, levels, sigma_min, sigma_max, rho, dm_min_fraction, dm_max_fraction):
        if int(levels) != levels or levels < 2 or not 0 < sigma_min < sigma_max or not rho > 0:
            raise ValueError(f"{self.method}: the noise grid needs levels >= 2, 0 < sigma_min < sigma_max and rho > 0; "
                             f"got levels={levels}, sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}")
        first, last = int(dm_min_fraction * levels), min(int(dm_max_fraction * levels), int(levels) - 1)
        if not 0 <= first <= last:
            raise ValueError(f"{self.method}: need 0 <= dm_min_fraction <= dm_max_fraction (fractions of the grid); "
                             f"got {dm_min_fraction}, {dm_max_fraction}")
        self.grid = dict(levels=int(levels), sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))
        self.dm_levels = (first, last)

    def generator_sigma(self, n, device):
        return grid_sigma(n, device, *self.dm_levels, **self.grid)

    def fake_sigma(self, n, device):
        return grid_sigma(n, device, 0, self.grid["levels"] - 1, **self.grid)


# -- the update applied to generator samples


def matching_surrogate(x, grad):
    """0.5 mean (x - sg(x - grad))^2: its gradient w.r.t. x is grad / x.numel(); its value is 0.5 mean grad^2.
    Written as mean((x - sg x) grad) + 0.5 mean grad^2 (the first term is exactly 0), the same value and gradient
    without forming x - grad, which rounds away a small grad next to a large x in float32."""
    x, grad = x.float(), grad.detach().float()
    return ((x - x.detach()) * grad).mean() + 0.5 * grad.square().mean()


def mean_abs_normaliser(x_g, teacher_x0, floor=1e-5):
    """sg(mean |x_g - D_teacher(x_t)|) per sample [B], at least `floor`: DMD's and SiD's per-sample normaliser."""
    return (x_g.detach() - teacher_x0.detach()).float().abs().flatten(1).mean(1).clamp_min(floor)


class DistributionMatching(Objective):
    """Base of diff_instruct / dmd / dmd2 / sid: generator, fake score, their losses' shared parts (module docstring).
    A subclass sets `method` (its registry name), `generator_sigma` and `student_loss`."""

    learns_teacher_map = False

    method = "distribution matching"
    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True
    needs_data = False
    eval_nfe = 1

    def __init__(self, backbone, teacher, sigma_init):
        super().__init__()
        if teacher is None:
            raise ValueError(f"{self.method} needs a teacher: pass --teacher RUN (a trained denoiser), or none for an "
                             "analytic teacher fitted to the data")
        if not sigma_init > 0:
            raise ValueError(f"{self.method}: sigma_init (the generator's noise level) must be > 0; got {sigma_init!r}")
        self.teacher = teacher
        self.sigma_init = float(sigma_init)
        try:
            self.networks["fake_score"] = student_denoiser(copy.deepcopy(backbone), teacher)[0]
        except ValueError as error:
            raise ValueError(f"{self.method}: the fake score is a copy of the teacher and needs its architecture; "
                             f"{error}") from None
        self.networks["student"], self.initialised_from_teacher = student_denoiser(backbone, teacher)
        self.sigma_data = self.networks["student"].sigma_data  # the teacher's, for EDM's weight in the fake loss
        self.conditional = bool(getattr(backbone, "label_dim", 0))

    # -- what a method chooses

    def generator_sigma(self, n, device):
        """The noise levels [n] at which the student's loss compares the two scores."""
        raise NotImplementedError(f"{type(self).__name__} does not define generator_sigma()")

    def fake_sigma(self, n, device):
        """The noise levels [n] of the fake score's DSM loss; EDM's lognormal(-1.2, 1.2) unless a method says else."""
        return lognormal_sigma(n, device)

    def student_loss(self, x_g, labels, batch, step):
        """(loss, logs) of the generator, given its samples x_g (on the graph)."""
        raise NotImplementedError(f"{type(self).__name__} does not define student_loss()")

    # -- the shared parts

    def phases(self, step):
        return ["fake_score", "student"]

    def labels_of(self, batch):
        return batch[-1] if self.conditional else None

    def generator(self, z, labels=None):
        """G(z) = D_theta(sigma_init z, sigma_init) from unit noise z."""
        return one_step_sample(self.networks["student"], z, self.sigma_init, labels)

    def generator_samples(self, like, labels):
        """Samples of the current generator, one per row of `like` (fresh noise each call)."""
        return self.generator(torch.randn_like(like), labels)

    def denoised(self, x_g, sigma, labels):
        """(D_teacher(x_t), D_fake(x_t)) at x_t = x_g + sigma n: on x_g's graph unless called under no_grad."""
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        return self.teacher(x_t, sigma, labels), self.networks["fake_score"](x_t, sigma, labels)

    def normaliser(self, x_g, teacher_x0):
        """The per-sample divisor [B] of DMD's gradient and SiD's loss (a method; tests may replace it)."""
        return mean_abs_normaliser(x_g, teacher_x0)

    def distribution_matching_loss(self, x_g, labels):
        """DMD's surrogate: g = (D_fake - D_teacher)(x_t) / mean|x_g - D_teacher(x_t)| per sample, under no-grad, at
        sigma = generator_sigma; as 0.5 ||x_g - sg(x_g - g)||^2 (dmd, dmd2)."""
        sigma = self.generator_sigma(x_g.shape[0], x_g.device)
        with torch.no_grad():
            teacher_x0, fake_x0 = self.denoised(x_g, sigma, labels)
            grad = (fake_x0 - teacher_x0) / append_dims(self.normaliser(x_g, teacher_x0), x_g.ndim)
        return matching_surrogate(x_g, torch.nan_to_num(grad))

    def fake_score_loss(self, x_g, labels, batch, step):
        """EDM's DSM of the fake score on detached generator samples at sigma = fake_sigma."""
        sigma = self.fake_sigma(x_g.shape[0], x_g.device)
        weight = loss_weight("edm", "edm", sigma, self.sigma_data)
        loss = denoising_loss(self.networks["fake_score"], x_g, sigma, weight, labels)
        return loss, {"loss": loss.detach()}

    def loss(self, role, batch, step):
        labels = self.labels_of(batch)
        if role == "fake_score":
            with torch.no_grad():
                x_g = self.generator_samples(batch[0], labels)
            return self.fake_score_loss(x_g, labels, batch, step)
        if role == "student":
            return self.student_loss(self.generator_samples(batch[0], labels), labels, batch, step)
        raise ValueError(f"{self.method} has roles student and fake_score; got {role!r}")

    def generate(self, z, nfe, cond=None):
        if nfe != 1:
            raise ValueError(f"{self.method}: the generator samples in exactly one step (nfe=1); got nfe={nfe}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        return self.generator(z, labels)
