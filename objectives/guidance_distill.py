"""Guidance distillation: one w-conditioned evaluation replaces classifier-free guidance's two (stage one), then
progressive distillation of that student cuts its steps (stage two).

Meng, Rombach, Gao, Kingma, Ermon, Ho and Salimans, CVPR 2023, "On Distillation of Guided Diffusion Models",
Section 3 (the two-stage distillation), in VE sigma space (x = x0 + sigma n).

The guided teacher. A class-conditional teacher D trained with label dropout knows a conditional and an
unconditional prediction; classifier-free guidance (Ho & Salimans 2022) mixes them,

    D_w(x, sigma, c) = D_u + w (D_c - D_u),   D_c = D(x, sigma, c),  D_u = D(x, sigma, null)

in the project's (EDM2's) convention: w = 1 is the conditional model, w = 0 the unconditional one (solvers/
guidance.py). The paper writes x^w = (1 + w') x_c - w' x_u, so its w' is our w - 1. Each guided evaluation costs one
teacher call on a batch of 2B (GuidedDenoiser.predictions, whose null-label handling is reused here).

The student. D_eta(x, sigma, c, w) is the teacher's network with one more input, w: a sinusoidal embedding of w
through a zero-initialised projection added to the noise embedding (the paper: "a Fourier embedding of w added to
the time-step embedding"), `guidance_dim` sinusoidal channels (default 64). The objective adds it to the student
backbone at construction (`add_guidance_embedding` of models/unet.py, models/mlp.py and models/dit.py; the
backbone's own settings stay the teacher's, and a reloaded run rebuilds the same layers before its weights load). It starts from the
teacher's weights (init_from_teacher; only the guidance embedding keeps its init), so at step 0 it is exactly the
teacher's CONDITIONAL model for every w. Stage one's loss:

    L(eta) = E_{w ~ U[w_min, w_max], sigma, x0, c, n} lambda(sigma) || D_eta(x0 + sigma n, sigma, c, w) - D_w(x0 + sigma n, sigma, c) ||^2

with x0 and c from the (labelled) data batch, n ~ N(0, I), ln sigma ~ N(P_mean, P_std^2) as EDM's training
(Karras et al. 2022; EDM's -1.2, 1.2) and lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, EDM's
weighting, standing in for the paper's omega(lambda_t) as in the project's DSM. The target is computed under
no_grad, with one w drawn per sample.

Label dropout. The student always sees the batch's label c (its target is D_w for that c), so its backbone's
label_dropout, which a student run inherits from its teacher's settings, is switched off at construction.

The range of w. The paper samples w ~ U[w_min, w_max] (for ImageNet 64x64 its w' in [0, 4], i.e. our [1, 5]; see
shared/METHODS-consistency-matching.md Section 16, unverified). Our default [0, 4] spans the unconditional model
(w = 0), the conditional one (w = 1) and guidance up to w = 4 (the paper's w' = 3), which holds the moderate
strengths usually sampled; widen it with w_max for stronger guidance. A student is only trained for w inside the
range, and sample_w (default 2) must be chosen inside it.

Sampling. The distilled student is a denoiser: `denoiser()` is D_eta(x, sigma, c, sample_w), a fixed w (default 2),
so every solver samples it at ONE network evaluation of batch B per NFE; `sampler()` is the teacher's default
(Heun, Karras schedule), so `python -m runs.sample RUN --nfe 35` integrates it, and `--solver` picks any other.
The denoiser also takes guidance=w per call (a [B] tensor or a number), to sample or distil at other w.

The end-of-run report (runs/quality.py) compares a student with its teacher's UNGUIDED rollouts; this student
reproduces the GUIDED teacher D_w, so an error to the unguided map would measure guidance, not distillation:
learns_teacher_map is False (the report gives distribution distances only) and tests/test_guidance_distill.py
measures the error to the guided teacher directly. eval_nfe (default 35, the Heun/Karras NFE of the teacher's
own sampling) is the NFE of the loop's sample grids and of that report.

Stage two: GuidanceProgressive ("guidance_progressive"), progressive distillation
(Salimans & Ho 2022; objectives/progressive.py, whose grid, target and stage schedule it reuses) of a stage-one
student: the teacher is the w-conditioned denoiser of a guidance_distill run (`--teacher RUN`), the student starts
from its weights (guidance embedding included), and per sample w ~ U[w_min, w_max] is drawn and given to both, so
one student DDIM step at w matches two teacher DDIM steps at the same w. It samples on its nested grid at sample_w;
its end-of-run map error is reported when sample_w is its teacher's (the report's reference is the teacher's own
fixed-w map). Its backbone's label dropout is switched off as in stage one.
The paper's stochastic sampler (a double-length deterministic step, then re-noising) is not implemented.
"""
import math

import torch
from torch import nn

from models.denoiser import Denoiser
from models.noise import append_dims
from objectives.base import Objective, init_from_teacher, pick, teacher_preconditioning, unwrap
from objectives.distances import make_distance
from objectives.dsm import loss_weight
from objectives.progressive import Progressive, nested_sigmas
from solvers import SCHEDULES, SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe
from solvers.guidance import GuidedDenoiser

TEACHER_ERROR = "guidance_distill needs a class-conditional teacher trained with label dropout"


def teacher_label_dim(teacher):
    """The number of classes a teacher denoiser takes (a Denoiser's label_dim, an analytic teacher's num_classes)."""
    label_dim = getattr(teacher, "label_dim", None)
    return int(getattr(teacher, "num_classes", 0) if label_dim is None else label_dim)


class FixedGuidance(nn.Module):
    """D(x, sigma, class_labels) = student(x, sigma, class_labels, guidance=w): a w-conditioned student as a plain
    denoiser at a fixed guidance weight w (one call of batch B). guidance=... in a call overrides w."""

    takes_guidance = True  # a stage-two teacher (GuidanceProgressive) passes guidance=w per sample

    def __init__(self, denoiser, w):
        super().__init__()
        self.denoiser, self.w = denoiser, float(w)

    @property
    def _inner(self):
        return unwrap(self.denoiser)

    @property
    def backbone(self):
        return self._inner.backbone

    @property
    def label_dim(self):
        return self._inner.label_dim

    @property
    def parameterisation(self):
        return self._inner.parameterisation

    @property
    def sigma_data(self):
        return self._inner.sigma_data

    def forward(self, x, sigma, class_labels=None, guidance=None):
        w = self.w if guidance is None else guidance
        w = torch.as_tensor(w, dtype=torch.float32, device=x.device)
        w = w.expand(x.shape[0]) if w.ndim == 0 else w
        return self.denoiser(x, sigma, class_labels, guidance=w)


class GuidanceDistill(Objective):
    """Meng et al. 2023, stage one: a w-conditioned student regresses on the guided teacher D_u + w (D_c - D_u)."""

    needs_teacher = True
    needs_labels = True
    learns_teacher_map = False  # it learns the GUIDED teacher's denoiser; the report's map is the unguided one

    def __init__(self, backbone, teacher=None, w_min=0.0, w_max=4.0, sample_w=2.0, guidance_dim=64,
                 parameterisation="teacher", sigma_data=None, distance="mse", P_mean=-1.2, P_std=1.2,
                 solver="heun", schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0, eval_nfe=35):
        super().__init__()
        if teacher is None:
            raise ValueError("guidance_distill needs a teacher: pass --teacher RUN (a class-conditional denoiser trained "
                             "with label dropout) or use data whose analytic teacher is class-conditional (gmm)")
        label_dim = teacher_label_dim(teacher)
        if label_dim < 1:
            raise ValueError(TEACHER_ERROR)
        dropout = getattr(getattr(teacher, "backbone", None), "label_dropout", None)  # None: not declared (dit)
        if dropout is not None and not dropout > 0:
            raise ValueError(TEACHER_ERROR + " (this teacher's backbone.label_dropout is 0: its unconditional "
                             "prediction was never trained)")
        student_labels = int(getattr(backbone, "label_dim", 0))
        if student_labels == 0:
            raise ValueError("guidance_distill needs conditional data: set train.conditional=true")
        if student_labels != label_dim:
            raise ValueError(f"guidance_distill: the student takes {student_labels} classes, the teacher {label_dim}")
        if getattr(backbone, "outputs_trajectory", False) or not hasattr(backbone, "add_guidance_embedding"):
            raise ValueError(f"guidance_distill needs a denoiser backbone that can take a guidance weight (unet, mlp, dit); "
                             f"{type(backbone).__name__} cannot")
        check_w_range("guidance_distill", w_min, w_max, sample_w)
        if not (isinstance(eval_nfe, int) and not isinstance(eval_nfe, bool) and eval_nfe >= 1):
            raise ValueError(f"guidance_distill: eval_nfe must be an integer >= 1, got {eval_nfe!r}")
        if not backbone.guidance_dim:
            backbone.add_guidance_embedding(guidance_dim)

        if getattr(backbone, "label_dropout", 0) > 0:  # inherited from the teacher's settings by runs.train
            backbone.label_dropout = 0.0  # the student must see every label: it matches D_w for its label c
        parameterisation, sigma_data = teacher_preconditioning(teacher, parameterisation, sigma_data)
        self.initialised_from_teacher = init_from_teacher(
            backbone, teacher, allow_missing=getattr(type(backbone), "GUIDANCE_PREFIXES", ()))
        self.networks["student"] = Denoiser(backbone, parameterisation, sigma_data)
        self.parameterisation, self.sigma_data = parameterisation, sigma_data
        self.teacher, self.label_dim = teacher, label_dim
        self.w_min, self.w_max, self.sample_w = float(w_min), float(w_max), float(sample_w)
        self.distance = make_distance(distance)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.solver = pick(SOLVERS, solver, "solver")
        self.schedule = pick(SCHEDULES, schedule, "schedule")
        self.schedule_kwargs = schedule_kwargs(schedule, sigma_min, sigma_max, rho)
        self.eval_nfe = eval_nfe

    # -- training

    def draw_w(self, n, device):
        """w ~ U[w_min, w_max], one per sample."""
        return self.w_min + (self.w_max - self.w_min) * torch.rand(n, device=device)

    def target(self, x, sigma, labels, w):
        """The guided teacher D_u + w (D_c - D_u) per sample, from one teacher call on 2B (no gradient)."""
        with torch.no_grad():
            d_c, d_u = GuidedDenoiser(self.teacher, 1.0, label_dim=self.label_dim).predictions(x, sigma, labels)
            return d_u + append_dims(w.to(d_c.dtype), x.ndim) * (d_c - d_u)

    def loss(self, role, batch, step):
        x0, labels = batch
        n = x0.shape[0]
        sigma = (self.P_mean + self.P_std * torch.randn(n, device=x0.device)).exp()
        w = self.draw_w(n, x0.device)
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        target = self.target(x, sigma, labels, w)
        x0_hat = self.networks["student"](x, sigma, labels, guidance=w)
        weight = loss_weight("edm", self.parameterisation, sigma, self.sigma_data)
        loss = (weight * self.distance(x0_hat, target.to(x0_hat.dtype))).mean()
        return loss, {"loss": loss.detach()}

    def phases(self, step):
        return ["student"]

    # -- sampling

    def denoiser(self):
        """The student at the fixed guidance weight sample_w: D(x, sigma, class_labels), one call of batch B."""
        return FixedGuidance(self.networks["student"], self.sample_w)

    def sampler(self):
        """The teacher's default solver and schedule (objective.solver / schedule / sigma_min / sigma_max / rho)."""
        return self.solver, self.schedule, dict(self.schedule_kwargs)

    def generate(self, z, nfe, cond=None):
        sigmas = sigmas_for_nfe(self.solver, nfe, self.schedule, **self.schedule_kwargs).to(z.device)
        return self.solver(self.denoiser(), z * sigmas[0], sigmas, cond=cond, **options_for_nfe(self.solver, nfe))


def check_w_range(method, w_min, w_max, sample_w):
    for name, value in (("w_min", w_min), ("w_max", w_max), ("sample_w", sample_w)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{method}: {name} must be a finite number >= 0, got {value!r}")
    if not w_min < w_max:
        raise ValueError(f"{method} needs w_min < w_max, got [{w_min:g}, {w_max:g}]")
    if not w_min <= sample_w <= w_max:
        raise ValueError(f"{method}: sample_w={sample_w:g} lies outside the trained range [{w_min:g}, {w_max:g}]")


class GuidanceProgressive(Progressive):
    """Meng et al. 2023, stage two: progressive distillation of a w-conditioned student, w ~ U per sample."""

    few_step = False        # a guided student: measured against the guided teacher by runs.bench guidance
    needs_labels = True

    def __init__(self, backbone, teacher=None, w_min=0.0, w_max=4.0, sample_w=2.0, parameterisation="teacher",
                 sigma_data=None, weighting="truncated_snr", distance="mse", start_steps=64, end_steps=1,
                 steps_per_stage=None, final_stages_factor=2, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 fresh_optimizer_per_stage=True, total_steps=None):
        if teacher is None or not getattr(teacher, "takes_guidance", False):
            raise ValueError("guidance_progressive needs a w-conditioned teacher: --teacher RUN of a guidance_distill "
                             "run (stage one)")
        check_w_range("guidance_progressive", w_min, w_max, sample_w)
        if not hasattr(backbone, "add_guidance_embedding") or getattr(backbone, "outputs_trajectory", False):
            raise ValueError(f"guidance_progressive needs a denoiser backbone that can take a guidance weight (unet, "
                             f"mlp); {type(backbone).__name__} cannot")
        source = getattr(teacher, "backbone", None)
        if not backbone.guidance_dim:  # the teacher's embedding width, so that its weights fit
            backbone.add_guidance_embedding(getattr(source, "guidance_dim", 0) or 64)
        if getattr(backbone, "label_dropout", 0) > 0:  # as in stage one: every label is seen
            backbone.label_dropout = 0.0
        super().__init__(backbone, teacher, parameterisation=parameterisation, sigma_data=sigma_data,
                         weighting=weighting, distance=distance, start_steps=start_steps, end_steps=end_steps,
                         steps_per_stage=steps_per_stage, final_stages_factor=final_stages_factor,
                         sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         fresh_optimizer_per_stage=fresh_optimizer_per_stage, total_steps=total_steps)
        self.w_min, self.w_max, self.sample_w = float(w_min), float(w_max), float(sample_w)
        # the end-of-run report's reference is the teacher's own (fixed-w) map: comparable at the same w only
        self.learns_teacher_map = self.sample_w == getattr(teacher, "w", None)

    def conditioning(self, x0, labels):
        """Progressive's conditioning plus guidance=w, w ~ U[w_min, w_max] per sample, for teacher and student."""
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(x0.shape[0], device=x0.device)
        return {"class_labels": labels if self.conditional else None, "guidance": w}

    def denoiser(self):
        """The student at the fixed guidance weight sample_w."""
        return FixedGuidance(self.networks["student"], self.sample_w)

    def generate(self, z, nfe, cond=None):
        """The student's DDIM (Euler) sampler on its nested grid at sample_w, nfe one of allowed_nfe()."""
        if nfe not in self.allowed_nfe():
            raise ValueError(f"guidance_progressive: the {self.student_steps()}-step student samples on its own "
                             f"nested grid; nfe must be one of {self.allowed_nfe()}, got {nfe!r}")
        sigmas = nested_sigmas(nfe, **self.grid_kwargs).to(z.device)
        return SOLVERS["euler"](self.denoiser(), z * sigmas[0], sigmas, cond=cond)
