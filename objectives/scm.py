"""sCM: continuous-time consistency models, Lu & Song 2024, "Simplifying, Stabilizing & Scaling Continuous-Time
Consistency Models" (arXiv 2410.11081; no official code, formulas cross-checked against NVlabs/FastGen's sCM.py).
Two entries: `scd` (consistency distillation from a teacher, sCD) and `sct` (consistency training from scratch, sCT).

TrigFlow (Sec. 3; models/trigflow.py): x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I); the student is
f(x_t, t) = cos t x_t - sin t sd F_theta(x_t / sd, c_noise(t)), which in the project's sigma space (sigma = sd tan t,
x_VE = x_t / cos t) is an EDM denoiser with F_EDM = -F: it samples as any consistency function f(x, sigma).

One training step (the paper's algorithm box; Sec. 4.2 for the tangent's normalisation and warm-up and the adaptive
weight):

    x0 ~ data, z ~ N(0, sd^2 I), tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sd)   (clamped to [t_min, t_max], below)
    x_t    = cos t x0 + sin t z
    dx_t/dt = cos t z - sin t x0                          sCT: the conditional velocity
            = sd F_teacher(x_t / sd, t)                   sCD: the teacher's PF-ODE (models.trigflow.trigflow_velocity;
                                                           with classifier-free guidance w: v_c + (w - 1)(v_c - v_u))
    F, w   = F_theta(x_t / sd, t), w_phi(t)               the graded pass, through self.networks["student"] (DDP)
    F-, cos t sin t dF-/dt = jvp((x, t) -> F_theta-(x / sd, t), (x_t, t), (cos t sin t dx_t/dt, cos t sin t))
                                                           no grad, theta- = SG(theta), the graded pass's dropout mask
    g      = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)     r = min(1, step / tangent_warmup_steps)
    g      = g / (||g|| + c)                                                   per sample, c = tangent_norm_const = 0.1
    L      = mean_batch[ e^w / D ||F - F- - g||^2  (x prior 1/(sd tan t))  - w ]     D = dimension of x0

(F - F- is 0 in value; only its gradient, that of the continuous-time consistency loss, moves theta. F- is the graded
pass's output detached, as FastGen does, so the residual is exactly -g in value whatever the precision of that pass.)
The "JVP rearrangement" multiplies both tangents by cos t sin t, so the JVP returns cos t sin t dF/dt directly: finite
as t -> pi/2 and, with the "edm" label, its d c_noise/dt = 1 / (4 sin t cos t) becomes exactly 1/4.

Precision and paths: the JVP, the teacher's velocity, the tangent and the loss run in fp32 with autocast off (float64
for float64 data); only the graded pass follows the loop's autocast. The JVP runs on the unwrapped module
(objectives.base.unwrap: torch.func.jvp fails on a DDP module) under no_grad, while the graded pass goes through the
possibly wrapped self.networks["student"] (the unwrapped module there would silently skip DDP's gradient sync).
Scaled-dot-product attention has no forward-mode AD in its fused kernels (flash / memory-efficient, and the CPU
flash kernel), so the JVP runs with SDPA restricted to its math kernel (torch.nn.attention.sdpa_kernel); DiT's "auto"
path switches to explicit attention by itself. A backbone op without forward AD is a one-line ValueError.

Choices and defaults (CPU-scale where the paper's scale would not fit a default run; the paper's in parentheses):
    c_noise        sct: "t" (the paper's c_noise(t) = t). scd: "auto" = "edm" (ln(sigma)/4) when the student starts
                   from a trained teacher's weights, whose backbone only knows that label, else "t".
    P_mean, P_std  -1.0, 1.4 (the paper's CIFAR-10); scd starting from a trained (EDM) teacher: P_std 1.8 (FastGen's
                   value when starting from an EDM checkpoint). t is clamped to [arctan(sigma_min / sd),
                   arctan(sigma_max / sd)] = [0.004, pi/2 - 0.006] for sd = 0.5: P(e^tau > 80) < 0.2%.
    tangent_warmup_steps  100 (the paper's 10,000 at batch 512 and 100k+ iterations; 0 = no warm-up, r = 1).
    tangent_norm_const    c = 0.1 (the paper's), over the whole per-sample norm (FastGen's default divides the norm
                   by sqrt(D) instead, an RMS; not done here).
    prior_weight   1/(sd tan t) = 1/sigma on (FastGen's default; with a converged w(t) it cancels out, as e^w absorbs
                   any per-t factor). w_phi(t) lives in the student module (models.trigflow.AdaptiveWeight): one
                   role, one optimiser, trained jointly as in the paper.
    theta-         SG(theta), no EMA target (the loop keeps an EMA of the student for sampling).
    sampling       eval_nfe = 1: x0 = f(sigma_max z, sigma_max) with sigma_max = 80, i.e. t = arctan(160) = pi/2 - 0.006
                   (the paper evaluates at t = pi/2 exactly, sigma = infinity, which the project's sigma space cannot
                   hold; its x_T = sd z differs from cos(t_max) 80 z = 0.99998 sd z). Two or more steps re-noise with
                   solvers.sample_consistency at sample_sigmas = (0.821,) (FastGen's CIFAR-10 level, t = 1.02; the
                   paper's t_m = 1.1 would be sigma = 0.98); more steps than levels given fall back to Karras levels.
    optimiser      Adam with betas (0.9, 0.99) (FastGen's CIFAR-10 sCM recipe uses RAdam with these betas); the loop's
                   lr and gradient clipping. Dropout is the backbone's setting (FastGen: 0.2 for sCT, 0 for sCD).
    guidance       scd only: the teacher's classifier-free guidance weight w (1 = none), class-conditional runs only.
    time embedding the backbone's: the U-Net's and DiT's sinusoidal ones suit c_noise = t; random Fourier features of
                   scale 16 (the MLP's default) are what the paper found unstable (Sec. 4.1), and a warning says so.
"""
import logging
import math

import torch

from models.forward_ad import full_precision, time_jvp
from models.noise import append_dims
from models.trigflow import TIME_LABELS, TrigFlowConsistency, trigflow_sigma, trigflow_velocity
from objectives.base import unwrap
from objectives.consistency import ConsistencyObjective, random_state, replayed_random_draws

logger = logging.getLogger(__name__)


def warn_on_steep_time_embedding(backbone, name):
    """Log a warning when the backbone embeds its noise label with random Fourier features of scale > 1 (the MLP's
    default, 16): the paper (Sec. 4.1) found them to destabilise continuous-time CMs, and so does a 2-D mixture here
    (the one-step error barely moves in 300 steps where positional embeddings cut it by 3x)."""
    from models.unet import FourierEmbedding
    scales = [float(m.freqs.std()) for m in backbone.modules()
              if isinstance(m, FourierEmbedding) and m.freqs.numel() > 1]
    if any(scale > 1 for scale in scales):
        logger.warning("%s: the backbone embeds its noise label with random Fourier features of scale ~%.0f, which "
                       "make sCM's time derivative steep and its training unstable (Lu & Song 2024, Sec. 4.1); "
                       "prefer backbone.embedding=positional", name, max(scales))


def finite_number(value):
    """Whether `value` is a finite int or float (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SCM(ConsistencyObjective):
    """What sCD and sCT share: the TrigFlow student, time draws, the JVP, the tangent and the loss (module docstring).
    A subclass gives dx_t/dt (`velocity`)."""

    def __init__(self, backbone, teacher, c_noise, p_mean, p_std, tangent_warmup_steps, tangent_norm_const,
                 prior_weight, sigma_min, sigma_max, rho, sigma_data, sample_sigmas):
        name = type(self).__name__.lower()
        if c_noise not in TIME_LABELS:
            raise ValueError(f"{name} c_noise must be one of: {', '.join(TIME_LABELS)}" +
                             (", auto" if name == "scd" else "") + f"; got {c_noise!r}")
        if not (finite_number(p_mean) and finite_number(p_std) and p_std > 0):
            raise ValueError(f"{name} needs a finite p_mean and p_std > 0; got p_mean={p_mean!r}, p_std={p_std!r}")
        if not (finite_number(tangent_warmup_steps) and int(tangent_warmup_steps) == tangent_warmup_steps
                and tangent_warmup_steps >= 0):
            raise ValueError(f"{name} tangent_warmup_steps must be an integer >= 0 (0: no warm-up); "
                             f"got {tangent_warmup_steps!r}")
        if not (finite_number(tangent_norm_const) and tangent_norm_const > 0):
            raise ValueError(f"{name} tangent_norm_const (c in g / (||g|| + c)) must be > 0; "
                             f"got {tangent_norm_const!r}")
        if not (finite_number(sigma_min) and finite_number(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"{name} needs 0 < sigma_min < sigma_max < infinity (TrigFlow times strictly inside "
                             f"(0, pi/2)); got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        warn_on_steep_time_embedding(backbone, name)
        self.c_noise = c_noise
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.tangent_warmup_steps = int(tangent_warmup_steps)
        self.tangent_norm_const = float(tangent_norm_const)
        self.prior_weight = bool(prior_weight)
        super().__init__(backbone, teacher, sigma_min, sigma_max, rho, sigma_data=sigma_data,
                         sample_sigmas=sample_sigmas)
        sd = self.sigma_data
        self.t_min, self.t_max = math.atan2(self.sigma_min, sd), math.atan2(self.sigma_max, sd)

    def make_student(self, backbone, sigma_data):
        return TrigFlowConsistency(backbone, sigma_data, self.c_noise)

    def optimizer_settings(self):
        return {"student": {"betas": (0.9, 0.99)}}

    # -- what a mode chooses

    def velocity(self, x0, z, x_t, t, labels):
        """dx_t/dt at (x_t, t), in the dtype of x_t (run with autocast off and no grad)."""
        raise NotImplementedError(f"{type(self).__name__} does not define velocity() (sCD: the teacher's; sCT: the "
                                  "data's)")

    # -- the algorithm

    def draw_times(self, n, device, dtype=torch.float32):
        """t = arctan(e^tau / sd), tau ~ N(P_mean, P_std^2), clamped to [t_min, t_max]."""
        tau = self.p_mean + self.p_std * torch.randn(n, device=device, dtype=dtype)
        return torch.atan2(tau.exp(), torch.full_like(tau, self.sigma_data)).clamp(self.t_min, self.t_max)

    def warmup(self, step):
        """r = min(1, step / tangent_warmup_steps) (1 without warm-up)."""
        return min(1.0, step / self.tangent_warmup_steps) if self.tangent_warmup_steps else 1.0

    def time_derivative(self, x_t, t, dxdt, labels):
        """(F-, cos t sin t dF-/dt) by torch.func.jvp of (x, t) -> F_theta(x / sd, t) with tangents
        (cos t sin t dx_t/dt, cos t sin t), on the unwrapped student. Call under no_grad with autocast off."""
        student = unwrap(self.networks["student"])
        cs = t.cos() * t.sin()
        return time_jvp(lambda x, time: student.F(x, time, labels), (x_t, t), (append_dims(cs, x_t.ndim) * dxdt, cs),
                        type(self).__name__.lower())

    def tangent(self, F_minus, dF, x_t, dxdt, t, step):
        """g = -cos^2 t (sd F- - dx_t/dt) - r (cos t sin t x_t + sd cos t sin t dF-/dt), before normalisation."""
        cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
        sd = self.sigma_data
        return -cos**2 * (sd * F_minus - dxdt) - self.warmup(step) * (cos * sin * x_t + sd * dF)

    def loss(self, role, batch, step):
        x0, labels = batch[0], batch[-1]
        labels = labels if self.conditional else None
        dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        x0, device = x0.to(dtype), x0.device
        t = self.draw_times(x0.shape[0], device, dtype)
        cos, sin = append_dims(t.cos(), x0.ndim), append_dims(t.sin(), x0.ndim)
        z = self.sigma_data * torch.randn_like(x0)
        x_t = cos * x0 + sin * z
        with torch.no_grad(), full_precision(device):
            dxdt = self.velocity(x0, z, x_t, t, labels).to(dtype)
        draws = random_state(device)
        F, w = self.networks["student"](x_t, t, labels, trigflow=True)  # the graded pass (DDP-wrapped in a DDP run)
        with torch.no_grad(), full_precision(device), replayed_random_draws(draws, device):  # one dropout mask
            dF = self.time_derivative(x_t, t, dxdt, labels)[1].to(dtype)
        with full_precision(device):
            F, w = F.to(dtype), w.to(dtype)
            F_minus = F.detach()
            g = self.tangent(F_minus, dF, x_t, dxdt, t, step)
            g_norm = g.flatten(1).norm(dim=1)
            g = g / append_dims(g_norm + self.tangent_norm_const, g.ndim)
            residual = (F - F_minus - g).square().flatten(1).mean(1)  # ||.||^2 / D
            prior = 1 / trigflow_sigma(t, self.sigma_data) if self.prior_weight else torch.ones_like(t)
            loss = (w.exp() * prior * residual - w).mean()
        return loss, {"loss": loss.detach(), "residual": residual.mean().detach(), "w": w.mean().detach(),
                      "tangent_norm": g_norm.mean(), "warmup": torch.tensor(self.warmup(step), device=device)}


class SCD(SCM):
    """sCD (Lu & Song 2024): continuous-time consistency distillation; dx_t/dt is the teacher's PF-ODE in TrigFlow."""

    needs_teacher = True

    def __init__(self, backbone, teacher=None, c_noise="auto", p_mean=-1.0, p_std=None, tangent_warmup_steps=100,
                 tangent_norm_const=0.1, prior_weight=True, guidance=1.0, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 sigma_data=None, sample_sigmas=(0.821,)):
        if teacher is None:
            raise ValueError("scd distils a teacher: pass --teacher RUN (a trained edm denoiser), or run without it to "
                             "fit an analytic one to the data")
        trained = hasattr(teacher, "backbone")  # a trained network: the student starts from its weights
        if sigma_data is not None and not (finite_number(sigma_data) and sigma_data > 0):
            raise ValueError(f"scd sigma_data must be a number > 0, or null (the trained teacher's, else 0.5); "
                             f"got {sigma_data!r}")
        if trained and sigma_data is not None and float(sigma_data) != float(getattr(teacher, "sigma_data", 0.5)):
            raise ValueError(f"scd starts from the teacher's weights and keeps its sigma_data "
                             f"({getattr(teacher, 'sigma_data', 0.5)}); got sigma_data={sigma_data!r}")
        if c_noise == "auto":
            c_noise = "edm" if trained else "t"
        p_std = (1.8 if trained else 1.4) if p_std is None else p_std
        if not (finite_number(guidance) and guidance >= 0):
            raise ValueError(f"scd guidance (the teacher's classifier-free guidance weight, 1 = none) must be >= 0; "
                             f"got {guidance!r}")
        if guidance != 1 and not getattr(backbone, "label_dim", 0):
            raise ValueError(f"scd guidance={guidance} needs a class-conditional run (train.conditional=true)")
        super().__init__(backbone, teacher, c_noise, p_mean, p_std, tangent_warmup_steps, tangent_norm_const,
                         prior_weight, sigma_min, sigma_max, rho, 0.5 if sigma_data is None else sigma_data,
                         sample_sigmas)
        self.teacher = teacher
        self.guidance = float(guidance)

    def velocity(self, x0, z, x_t, t, labels):
        v = trigflow_velocity(self.teacher, x_t, t, self.sigma_data, labels)
        if self.guidance != 1 and labels is not None:
            unconditional = trigflow_velocity(self.teacher, x_t, t, self.sigma_data, None)
            v = v + (self.guidance - 1) * (v - unconditional)
        return v


class SCT(SCM):
    """sCT (Lu & Song 2024): continuous-time consistency training from scratch; dx_t/dt = cos t z - sin t x0."""

    def __init__(self, backbone, c_noise="t", p_mean=-1.0, p_std=1.4, tangent_warmup_steps=100,
                 tangent_norm_const=0.1, prior_weight=True, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
                 sample_sigmas=(0.821,)):
        super().__init__(backbone, None, c_noise, p_mean, p_std, tangent_warmup_steps, tangent_norm_const,
                         prior_weight, sigma_min, sigma_max, rho, sigma_data, sample_sigmas)

    def velocity(self, x0, z, x_t, t, labels):
        cos, sin = append_dims(t.cos(), x0.ndim), append_dims(t.sin(), x0.ndim)
        return cos * z - sin * x0
