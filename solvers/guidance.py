"""Classifier-free guidance as a denoiser wrapper, so every solver and one-step update samples with it unchanged.

Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") mixes a conditional and an
unconditional prediction of the same network, trained with label dropout so that it knows the null label:

    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))

CONVENTION: w = 1 is no guidance (the conditional model itself), w = 0 the unconditional model, w > 1 guides.
This is the convention of EDM2 (Karras et al. 2024) and k-diffusion's CFGDenoiser; Ho & Salimans write the same
thing as (1 + w') D_c - w' D_u, so their w' is our w - 1. `python -m runs.sample --guidance W` uses this w.

Guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models"): guidance is applied only for sigma in (sigma_lo, sigma_hi], the
paper's half-open interval; elsewhere D_w is the conditional D(x, sigma, c) alone.

Cost and NFE. Inside the interval the conditional and unconditional predictions come from ONE call of the wrapped
denoiser on a batch of 2B (x twice; the labels, then the null label), outside it from one call of batch B with the
labels. One guided evaluation counts as ONE NFE, as the field reports guided samplers (EDM2, the interval paper):
wrap the guided denoiser in solvers.CountingDenoiser (counting outside), never the other way round. w = 1 skips the
unconditional pass altogether, so it reproduces the conditional sampler bit for bit.

The null label. Class labels are int indices [B] or float one-hot / soft rows [B, label_dim]; the null label of
the backbones (models.unet, models.mlp) and the analytic teachers (models.analytic) is `None`, which they treat as
the all-zero row. In one batched call the null half is therefore the all-zero row [B, label_dim], and int labels
are turned into one-hot rows first (so label_dim must be known: the denoiser's `label_dim` or `num_classes`, or
the `label_dim` argument).

No host syncs. Whether a call is inside the interval is a host decision (it changes the batch size), and reading
a sigma that lives on an accelerator would block on the device once per call. So the decision is made one of
three ways, none of which syncs:
  1. planned (what runs.sample does): `plan(solver, sigmas, like=x, **options)` runs the solver once, before
     sampling, on one CPU sample with a stand-in denoiser and records the sigma of every evaluation it makes (a
     solver's evaluation levels are python-float functions of the schedule and options, never of x). Each
     evaluation's decision is then read from that list by a call counter: python floats, no device reads. A plan
     serves one solver call (plan again before the next batch). Where sigma is on the CPU anyway, each planned
     decision is checked against the sigma actually given, and a mismatch is a ValueError.
  2. unplanned, sigma on the CPU: the sigmas are read directly (host memory, no device to wait for).
  3. unplanned, sigma on an accelerator (or per-sample sigmas that straddle an interval edge): one 2B call and
     a per-sample torch.where between the guided and the conditional prediction; exact, sync-free, but the
     unconditional half is computed outside the interval too.
"""
import math

import torch
from torch.nn import functional as F

from .common import sigma_dtype


class GuidedDenoiser:
    """D_w(x, sigma, class_labels) = D_u + w (D_c - D_u) in one batched call; see the module docstring.

    denoiser: D(x, sigma, class_labels=None) of a class-conditional model trained with label dropout.
    scale: w >= 0 (1 = no guidance). interval: None (guide at every sigma) or (sigma_lo, sigma_hi), guiding for
    sigma_lo < sigma <= sigma_hi. label_dim: number of classes (default: the denoiser's label_dim / num_classes).
    """

    def __init__(self, denoiser, scale, interval=None, label_dim=None):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0 (1 = no guidance), got {scale!r}")
        if interval is not None:
            try:
                lo, hi = (float(v) for v in interval)
            except (TypeError, ValueError):
                raise ValueError(f"guidance interval must be (sigma_lo, sigma_hi), got {interval!r}") from None
            if not (0 <= lo < hi) or math.isnan(hi):
                raise ValueError(f"guidance interval needs 0 <= sigma_lo < sigma_hi, got ({lo:g}, {hi:g})")
            interval = (lo, hi)
        if label_dim is None:
            label_dim = getattr(denoiser, "label_dim", None)
            label_dim = getattr(denoiser, "num_classes", None) if label_dim is None else label_dim
        if label_dim is not None and int(label_dim) < 1:
            raise ValueError("guidance needs a class-conditional denoiser (this one has label_dim 0)")
        self.denoiser, self.scale, self.interval = denoiser, float(scale), interval
        self.label_dim = None if label_dim is None else int(label_dim)
        self._plan, self._cursor = None, 0

    # ------------------------------------------------------------------ the interval decision

    def inside(self, sigma):
        """Whether sigma (a python float or a tensor, elementwise) lies in the guidance interval."""
        if self.interval is None:
            return True if not isinstance(sigma, torch.Tensor) else torch.ones_like(sigma, dtype=torch.bool)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def plan(self, solver, sigmas, like=None, **options):
        """Record, before sampling, which evaluations of `solver(self, x, sigmas, **options)` are guided.

        `solver` is a sampler function or a name in SOLVERS. Runs it once on a single CPU sample shaped and typed
        like `like` (default: float64 [1, 1]) with a stand-in denoiser, reading each evaluation's sigma (CPU: free).
        A `generator` in options is replaced by a throwaway one, so the real sampling's random stream is untouched;
        cond, callback and return_trajectory are not used. Returns self.
        """
        self._plan, self._cursor = None, 0
        if self.interval is None or self.scale == 1:
            return self  # every evaluation is decided already
        shape = (1, *like.shape[1:]) if like is not None else (1, 1)
        dtype = like.dtype if like is not None else torch.float64
        seen = []

        def stand_in(x, sigma, **_):
            seen.append(sigma.detach().cpu().reshape(-1)[0].item())
            return torch.zeros_like(x)

        from . import get_solver  # here: solvers/__init__ imports this module
        options = {k: v for k, v in options.items() if k not in ("cond", "callback", "return_trajectory")}
        if "generator" in options:
            options["generator"] = torch.Generator().manual_seed(0)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        get_solver(solver)(stand_in, sigmas[0] * torch.ones(shape, dtype=dtype), sigmas, **options)
        self._plan = [bool(self.inside(level)) for level in seen]
        return self

    @staticmethod
    def host_readable(sigma):
        """Whether sigma can be read on the host without waiting for a device (it lives in CPU memory)."""
        return sigma.device.type == "cpu"

    def _decide(self, sigma):
        """True / False: the whole batch is inside / outside the interval; None: decide per sample on the device."""
        if self.interval is None:
            return True
        host = self.host_readable(sigma)
        if self._plan is not None:
            if self._cursor >= len(self._plan):
                raise ValueError(f"guided denoiser: the plan holds {len(self._plan)} evaluations and all were used; "
                                 "call plan() before each solver call")
            decision = self._plan[self._cursor]
            self._cursor += 1
            if host and not bool((self.inside(sigma) == decision).all()):
                raise ValueError("guided denoiser: the planned guidance interval decisions do not match the sigmas "
                                 "given; plan() with the same solver, sigmas and options as the sampling")
            return decision
        if host:
            mask = self.inside(sigma)
            return True if bool(mask.all()) else False if not bool(mask.any()) else None
        return None

    # ------------------------------------------------------------------ the guided evaluation

    def _onehot(self, class_labels, batch):
        """Labels as float rows [B, label_dim]; the null half of the batched call is the all-zero row."""
        if class_labels.is_floating_point():
            if class_labels.ndim != 2 or class_labels.shape[0] != batch:
                raise ValueError(f"float class_labels must be one-hot / soft rows [{batch}, label_dim], got "
                                 f"{list(class_labels.shape)}")
            return class_labels
        if class_labels.shape != (batch,):
            raise ValueError(f"int class_labels must have shape [{batch}], got {list(class_labels.shape)}")
        if self.label_dim is None:
            raise ValueError("guidance with int class_labels needs label_dim (the denoiser has no label_dim or "
                             "num_classes): pass label_dim=K or one-hot labels")
        return F.one_hot(class_labels.long(), self.label_dim).to(torch.float32)

    def predictions(self, x, sigma, class_labels):
        """(D_c, D_u): the conditional and the unconditional prediction from ONE call of the denoiser on 2B (x twice;
        the labels as rows, then the null label as all-zero rows), sigma a [B] tensor. What __call__ mixes with its
        scale; guidance distillation mixes them with a per-sample w instead (objectives/guidance_distill.py)."""
        batch = x.shape[0]
        labels = self._onehot(class_labels, batch)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             class_labels=torch.cat([labels, torch.zeros_like(labels)]))
        return both[:batch], both[batch:]

    def __call__(self, x, sigma, class_labels=None):
        if self.scale == 1 or class_labels is None:  # no guidance, or no condition (then D_c = D_u)
            return self.denoiser(x, sigma, class_labels=class_labels)
        batch = x.shape[0]
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor(float(sigma), dtype=sigma_dtype(x), device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        decision = self._decide(sigma)
        if decision is False:  # outside the interval: the conditional pass alone, batch B
            return self.denoiser(x, sigma, class_labels=class_labels)
        cond, uncond = self.predictions(x, sigma, class_labels)
        guided = uncond + self.scale * (cond - uncond)
        if decision is None:  # per sample, on the device
            inside = self.inside(sigma).reshape(batch, *[1] * (x.ndim - 1))
            guided = torch.where(inside, guided, cond)
        return guided


def guided(denoiser, scale, interval=None, label_dim=None):
    """Classifier-free guidance (Ho & Salimans 2022) of `denoiser` at scale w (w = 1: none; EDM2's convention),
    optionally only for sigma in (interval[0], interval[1]] (Kynkaanniemi et al. 2024). One guided evaluation is
    one batched call of the denoiser and counts as one NFE. See GuidedDenoiser and the module docstring."""
    return GuidedDenoiser(denoiser, scale, interval, label_dim)
