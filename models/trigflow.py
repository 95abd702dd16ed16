"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing & Scaling Continuous-Time Consistency Models", Sec. 3 and
4.1): the noise process, its conversion to the project's VE sigma space, and the sCM student.

    TrigFlow:  x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sd^2 I),   t in [0, pi/2]       (sd = sigma_data)
    VE:        sigma = sd tan(t),   x_VE = x_t / cos(t)          (so x_VE = x0 + sigma n with n = z / sd)
    PF-ODE:    dx_t/dt = sd F(x_t / sd, t);   from a VE denoiser D: (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t)
    f:         f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t))            the consistency function

In VE variables cos^2 t = sd^2 / (sigma^2 + sd^2), sd sin t = sigma sd / sqrt(sigma^2 + sd^2) and cos(t) / sd =
1 / sqrt(sigma^2 + sd^2): EDM's c_skip, c_out and c_in (Karras et al. 2022, Table 1). So f(x_VE, sigma) =
c_skip x_VE + c_out (-F) is an EDM denoiser whose network output is F_EDM = -F: an EDM backbone serves as a TrigFlow
F with the sign flipped, and the student is still a function f(x, sigma) of the project's sigma space (solvers,
solvers.sample_consistency and runs.sample take it as it is). Unlike models.consistency.ConsistencyFunction there is
no boundary shift: c_skip = 1 and c_out = 0 at t = 0 itself, so f(x, 0) = x with the "t" label (the "edm" label,
ln(sigma) / 4, is not finite at sigma = 0; training clamps t to [t(sigma_min), t(sigma_max)] and sampling never
evaluates sigma = 0).

Noise label c_noise(t) fed to the backbone (`time_label`):
    "t"    the paper's identity c_noise(t) = t (Sec. 4.1: log-sigma labels blow up as t -> pi/2; t stays in [0, pi/2])
    "edm"  the project's ln(sigma) / 4 = ln(sd tan t) / 4 (models.noise.edm_log_noise_label): the label an EDM
           teacher's backbone was trained with, so a student initialised from its weights computes exactly the
           teacher's denoiser at the start (FastGen's TrigFlowPrecond also keeps the EDM net's own time input).
The label is computed in fp32 (float64 for float64 inputs) with autocast off, so its tangent under torch.func.jvp is
exact in fp32 (with the "edm" label d c_noise/dt = 1 / (4 sin t cos t), which the sCM "JVP rearrangement" multiplies
by cos t sin t: a constant 1/4). The backbone's own sinusoidal embedding takes that fp32 label (the project's
embeddings compute their sines in fp32); the layers after it follow the caller's autocast like the rest of the net.

The adaptive weight w_phi(t) of the sCM loss (Sec. 4.2) lives in the student module as `weighting` (an MLP on fixed
Fourier features of t, output layer zero-initialised so w = 0 at the start, always computed in fp32 with autocast
off): one role, one optimiser, one backward for both, as the paper trains them jointly; the loop's EMA of the student
carries it too (sampling never calls it).
"""
import math

import torch
from torch import nn

from models.forward_ad import full_precision
from models.noise import append_dims, sigma_batch

TIME_LABELS = ("t", "edm")


def trigflow_t(sigma, sigma_data=0.5):
    """TrigFlow time of a VE level: t = arctan(sigma / sd) (atan2, so sigma = inf gives pi/2)."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_data))


def trigflow_sigma(t, sigma_data=0.5):
    """VE level of a TrigFlow time: sigma = sd tan(t)."""
    return sigma_data * torch.tan(t)


def noise_label(t, time_label="t", sigma_data=0.5):
    """c_noise(t): t itself ("t", the paper's) or EDM's ln(sd tan t) / 4 ("edm"); see the module docstring."""
    if time_label == "t":
        return t
    if time_label == "edm":
        return (sigma_data * torch.tan(t)).log() / 4
    raise ValueError(f"unknown TrigFlow time label {time_label!r}; known: {', '.join(TIME_LABELS)}")


def trigflow_velocity(denoiser, x_t, t, sigma_data=0.5, class_labels=None):
    """dx_t/dt = (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin t: the PF-ODE in TrigFlow time of a project denoiser
    D(x, sigma) (any parameterisation, analytic or trained), = sd F_teacher(x_t / sd, t). t is [B], in (0, pi/2)."""
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    cond = {} if class_labels is None else {"class_labels": class_labels}
    x0_hat = denoiser(x_t / cos, trigflow_sigma(t, sigma_data), **cond).to(x_t.dtype)
    return (cos * x_t - x0_hat) / sin


class AdaptiveWeight(nn.Module):
    """w_phi(t) of the sCM loss: Linear-SiLU-Linear over [cos(2 k t), sin(2 k t)], k = 1..frequencies (a Fourier basis
    on t in [0, pi/2]); the last layer starts at zero, so w = 0 (unit weight) until it learns. fp32, autocast off."""

    def __init__(self, frequencies=8, hidden=64):
        super().__init__()
        self.register_buffer("freqs", 2.0 * torch.arange(1, frequencies + 1, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t):
        dtype = self.net[0].weight.dtype
        with full_precision(t.device):
            angles = t.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
            return self.net(torch.cat([angles.cos(), angles.sin()], dim=1)).squeeze(1)


class TrigFlowConsistency(nn.Module):
    """The sCM student: f(x, sigma) in VE space (forward), F(x_t, t) in TrigFlow (`F`), and w_phi(t) (`weighting`).

    forward(x, sigma, class_labels)                 f(x_VE, sigma): a consistency function for solvers / sampling
    forward(x_t, t, class_labels, trigflow=True)    (F(x_t / sd, c_noise(t)), w_phi(t)): the sCM training pass, one
                                                    call so that a DDP wrapper sees every parameter used
    """

    def __init__(self, backbone, sigma_data=0.5, time_label="t", weight_frequencies=8, weight_hidden=64):
        super().__init__()
        if time_label not in TIME_LABELS:
            raise ValueError(f"unknown TrigFlow time label {time_label!r}; known: {', '.join(TIME_LABELS)}")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"TrigFlow needs a finite sigma_data > 0; got {sigma_data!r}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.time_label = time_label
        self.weighting = AdaptiveWeight(weight_frequencies, weight_hidden)

    @property
    def label_dim(self):
        return getattr(self.backbone, "label_dim", 0)

    def F(self, x_t, t, class_labels=None):
        """F_theta(x_t / sd, c_noise(t)) = -backbone(x_t / sd, c_noise(t)): TrigFlow's network output, in fp32 (float64
        for float64 x_t; the backbone itself gets float32 unless its weights are float64). Differentiable in (x_t, t) by
        forward and reverse mode."""
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32  # of the result
        net_dtype = torch.float64 if dtype == torch.float64 and self._float64_backbone() else torch.float32
        t = sigma_batch(t, x_t).to(dtype)
        with full_precision(x_t.device):
            label = noise_label(t, self.time_label, self.sigma_data).to(net_dtype)
            x_in = (x_t / self.sigma_data).to(net_dtype)
        return -self.backbone(x_in, label, class_labels).to(dtype)

    def _float64_backbone(self):
        """Whether the backbone's weights are float64 (then float64 inputs stay float64; else it gets float32)."""
        return any(p.dtype == torch.float64 for p in self.backbone.parameters())

    def forward(self, x, sigma, class_labels=None, trigflow=False):
        if trigflow:
            return self.F(x, sigma, class_labels), self.weighting(sigma_batch(sigma, x))
        t = trigflow_t(sigma_batch(sigma, x), self.sigma_data)
        cos, sin = append_dims(t.cos(), x.ndim), append_dims(t.sin(), x.ndim)
        x_t = cos * x
        return (cos * x_t - sin * self.sigma_data * self.F(x_t, t, class_labels)).to(x.dtype)
