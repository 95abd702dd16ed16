"""Progressive distillation: halve the sampler's step count stage by stage.

Salimans & Ho, ICLR 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2, in VE
sigma space (x = x0 + sigma n, where DDIM with eta = 0 is exactly the Euler step, `solvers.euler_step`).

Time grid (nested, so one student step spans exactly two teacher steps): Karras' ramp as a continuous function,

    sigma(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho  for u in (0, 1],  sigma(0) = 0.

A student of N steps samples at u = i/N, i = N..0; its teacher takes 2N steps at u = j/2N. Per sample, draw
i ~ U{1..N} and n ~ N(0, I), set sigma = sigma(i/N), sigma' = sigma(i/N - 1/2N), sigma'' = sigma(i/N - 1/N) and
x = x0 + sigma n (x0 from the data batch, as in the paper). Two teacher DDIM steps give x -> x' -> x''. The target
is the x0 for which ONE student DDIM step from (x, sigma) lands on x'' (the paper's x~, written in VE):

    x'' = (sigma''/sigma) x + (1 - sigma''/sigma) x0_tilde,  so  x0_tilde = (x'' - r x) / (1 - r),  r = sigma''/sigma

(x0_tilde = x'' when sigma'' = 0: the teacher's midpoint x0_hat, as in the paper's code). The loss is
w(sigma) d(D_student(x, sigma), x0_tilde), d a distance from `objectives.distances` (MSE by default), with the
paper's weights on the x0 error, SNR = 1/sigma^2 in VE:

    weighting="truncated_snr"  w = max(SNR, 1)  (the paper's recommendation, "truncated SNR")
    weighting="snr_plus_one"   w = SNR + 1      (equal to the v-MSE)

Stages. Stage k (0-based) trains a student of start_steps/2^(k+1) steps against a teacher of start_steps/2^k steps,
down to end_steps. The first stage's teacher is the given (frozen) teacher; at each stage boundary a frozen copy of
the student's current weights becomes the teacher, and the student keeps training from those same weights (the
paper starts each new student as a copy of the new teacher, which is the same thing). The stage is a pure function
of the training step; the switch happens in loss() at the first step of a stage, and steps after the last stage keep
training it. state_dict() / load_state_dict() hold the stage and the teacher copy, so a resumed run is exact.
The paper's fresh student per stage implies a fresh optimiser: at each stage boundary the loop clears Adam's moments
(`fresh_optimizer`; fresh_optimizer_per_stage=False keeps them). Deviations from the paper: the learning-rate
schedule is the loop's (the paper anneals the learning rate linearly within each stage); the copy is of the training
weights, not the EMA.

Student: Denoiser(backbone, parameterisation, sigma_data) initialised from the teacher (objectives.base.
init_from_teacher; an analytic teacher leaves it at random init). parameterisation="teacher" keeps the teacher's
own (EDM's preconditioning is well conditioned at every sigma; the paper's choices, "x0" and "v", are available;
eps fails as SNR -> 0, as the paper shows).
"""
import math

import torch

from models.noise import append_dims
from objectives.base import Objective, choose, frozen_copy, student_denoiser
from objectives.distances import make_distance
from solvers import SOLVERS, euler_step

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def nested_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """sigma(u) at u = i/n, i = n..0 (float64 [n + 1], descending, ending in 0). Grids for n and 2n are nested
    exactly: i/n and 2i/2n round to the same float."""
    u = torch.arange(n, -1, -1, dtype=torch.float64) / n
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + u * (hi - lo)) ** rho
    sigmas[-1] = 0.0
    return sigmas


def distillation_target(teacher, x, sigma, sigma_mid, sigma_next, cond=None):
    """(x0_tilde, x'') for [B] sigma tensors: x'' from two teacher DDIM (= Euler) steps sigma -> sigma_mid ->
    sigma_next, and x0_tilde the x0 that takes one DDIM step from (x, sigma) to x'' (exact when sigma_next = 0)."""
    x_mid, _ = euler_step(teacher, x, sigma, sigma_mid, cond)
    x_next, _ = euler_step(teacher, x_mid, sigma_mid, sigma_next, cond)
    ratio = append_dims(sigma_next / sigma, x.ndim).to(x_next.dtype)
    return (x_next - ratio * x) / (1 - ratio), x_next


def _power_of_two(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


class Progressive(Objective):
    """Progressive distillation (Salimans & Ho 2022): N-step student, 2N-step teacher; N halves per stage."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True

    def __init__(self, backbone, teacher=None, parameterisation="teacher", sigma_data=None, weighting="truncated_snr",
                 distance="mse", start_steps=64, end_steps=1, steps_per_stage=None, final_stages_factor=2,
                 sigma_min=0.002, sigma_max=80.0, rho=7.0, fresh_optimizer_per_stage=True, total_steps=None):
        super().__init__()
        if teacher is None:
            raise ValueError("progressive needs a teacher: pass --teacher RUN (a trained denoiser) or an analytic one")
        if not _power_of_two(start_steps) or not _power_of_two(end_steps) or not end_steps < start_steps:
            raise ValueError(f"progressive: start_steps and end_steps must be powers of 2, end_steps < start_steps; "
                             f"got start_steps={start_steps!r}, end_steps={end_steps!r}")
        self.num_stages = int(math.log2(start_steps // end_steps))
        self.stage_lengths = self._stage_lengths(steps_per_stage, final_stages_factor, start_steps, total_steps)
        self.stage_starts = [sum(self.stage_lengths[:k]) for k in range(self.num_stages)]
        self.start_steps, self.end_steps = start_steps, end_steps
        if not 0 < sigma_min < sigma_max or not rho > 0:
            raise ValueError(f"progressive: need 0 < sigma_min < sigma_max and rho > 0, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, rho={rho}")
        self.grid_kwargs = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))
        self.weighting = choose(weighting, WEIGHTINGS, "weighting")
        self.distance = make_distance(distance)

        self.networks["student"] = student_denoiser(backbone, teacher, parameterisation, sigma_data)[0]
        self.parameterisation = self.networks["student"].parameterisation
        self.sigma_data = self.networks["student"].sigma_data
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.teacher = teacher          # the given teacher: stage 0's
        self.stage = 0                  # the stage of the last loss() call
        self.stage_teacher = None       # frozen copy of the student, the teacher of stages >= 1
        self._grids = {}
        self.fresh_optimizer_per_stage = bool(fresh_optimizer_per_stage)

    def _stage_lengths(self, steps_per_stage, final_stages_factor, start_steps, total_steps):
        """Stage lengths: a list, or steps_per_stage for each stage (the last two x final_stages_factor), or with
        steps_per_stage=None the stages fill total_steps (runs.train: train.steps unless set) in those proportions;
        with neither, the paper's 50,000 per stage."""
        factors = [final_stages_factor if start_steps >> (k + 1) <= 2 else 1 for k in range(self.num_stages)]
        if steps_per_stage is None and total_steps is None:
            steps_per_stage = 50000
        if steps_per_stage is None:
            if not isinstance(total_steps, int) or total_steps < self.num_stages:
                raise ValueError(f"progressive: total_steps={total_steps!r} cannot hold {self.num_stages} stages; "
                                 "set steps_per_stage or train.steps")
            steps_per_stage = [max(1, total_steps * f // sum(factors)) for f in factors]
            steps_per_stage[-1] += total_steps - sum(steps_per_stage)
        if isinstance(steps_per_stage, (list, tuple)):
            lengths = list(steps_per_stage)
            if len(lengths) != self.num_stages:
                raise ValueError(f"progressive: steps_per_stage lists {len(lengths)} stage lengths but there are "
                                 f"{self.num_stages} stages (start_steps -> end_steps halving)")
        else:  # the paper trains the stages down to 2 and 1 steps twice as long
            lengths = [steps_per_stage * f for f in factors]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
            raise ValueError(f"progressive: stage lengths must be integers >= 1, got {lengths} "
                             f"(steps_per_stage={steps_per_stage!r}, final_stages_factor={final_stages_factor!r})")
        return lengths

    # -- the stage schedule, a pure function of the training step

    def stage_at(self, step):
        """The stage trained at training step `step` (the last stage for every step past the schedule)."""
        return max(k for k in range(self.num_stages) if step >= self.stage_starts[k]) if step >= 0 else 0

    def student_steps(self, stage=None):
        return self.start_steps >> ((self.stage if stage is None else stage) + 1)

    def teacher_steps(self, stage=None):
        return self.start_steps >> (self.stage if stage is None else stage)

    def fresh_optimizer(self, role, step):
        return self.fresh_optimizer_per_stage and step in self.stage_starts[1:]

    def current_teacher(self):
        return self.teacher if self.stage == 0 else self.stage_teacher

    def advance(self, step):
        """Enter the stage of `step`: at a boundary the student's current weights become the (frozen) teacher."""
        stage = self.stage_at(step)
        if stage > self.stage:
            self.stage_teacher = frozen_copy(self.networks["student"])
            self.stage = stage
        return stage

    # -- training

    def weight(self, sigma):
        snr = sigma.float() ** -2
        return snr.clamp_min(1) if self.weighting == "truncated_snr" else snr + 1

    def target(self, x, sigma, sigma_mid, sigma_next, cond=None):
        """x0_tilde for the current stage's teacher (no gradient)."""
        teacher = self.current_teacher()
        if self.stage > 0 and next(teacher.parameters()).device != x.device:
            teacher.to(x.device)  # a copy restored by load_state_dict before the loop moved the student
        with torch.no_grad():
            return distillation_target(teacher, x, sigma, sigma_mid, sigma_next, cond)[0]

    def _teacher_grid(self, n, like):
        """nested_sigmas(2n) in like's dtype and device, cached (one host-to-device copy per stage)."""
        key = (n, like.device, like.dtype)
        if key not in self._grids:
            self._grids[key] = nested_sigmas(2 * n, **self.grid_kwargs).to(like.device, like.dtype)
        return self._grids[key]

    def conditioning(self, x0, labels):
        """What the teacher and the student are conditioned on for this batch (guidance_progressive adds w)."""
        return {"class_labels": labels} if self.conditional else {}

    def loss(self, role, batch, step):
        self.advance(step)
        x0, labels = batch
        cond = self.conditioning(x0, labels)
        n = self.student_steps()
        noise = torch.randn_like(x0)
        i = torch.randint(1, n + 1, (x0.shape[0],), device=x0.device)
        # teacher grid index of u = i/n is 2n - 2i; the midpoint and the student's next point follow it
        sigmas = self._teacher_grid(n, x0)
        sigma, sigma_mid, sigma_next = (sigmas[2 * n - 2 * i + k] for k in range(3))
        x = x0 + append_dims(sigma, x0.ndim) * noise
        x0_tilde = self.target(x, sigma, sigma_mid, sigma_next, cond)
        x0_hat = self.networks["student"](x, sigma, **cond)
        loss = (self.weight(sigma) * self.distance(x0_hat, x0_tilde)).mean()
        return loss, {"loss": loss.detach(), "student_steps": torch.tensor(float(n), device=x0.device)}

    def phases(self, step):
        return ["student"]

    # -- sampling

    def allowed_nfe(self):
        """Step counts whose grid is nested in the current student's: N, N/2, ..., 1."""
        n = self.student_steps()
        return [n >> j for j in range(int(math.log2(n)) + 1)]

    @property
    def eval_nfe(self):
        """The NFE the student is trained for: its current step count."""
        return self.student_steps()

    def generate(self, z, nfe, cond=None):
        """The student's DDIM (Euler) sampler on its nested grid, nfe steps (one of allowed_nfe())."""
        if nfe not in self.allowed_nfe():
            raise ValueError(f"progressive: the {self.student_steps()}-step student samples on its own nested grid; "
                             f"nfe must be one of {self.allowed_nfe()}, got {nfe!r} (for training sample grids set "
                             f"train.sample_nfe to one of them)")
        sigmas = nested_sigmas(nfe, **self.grid_kwargs).to(z.device)
        return SOLVERS["euler"](self.networks["student"], z * sigmas[0], sigmas, cond=cond)

    def denoiser(self):
        return self.networks["student"]

    # -- exact resume

    def state_dict(self):
        state = {"stage": self.stage, "student_steps": self.student_steps()}
        if self.stage > 0:
            state["teacher"] = {k: v.detach().clone() for k, v in self.stage_teacher.state_dict().items()}
        return state

    def load_state_dict(self, state):
        stage = int(state["stage"])
        if not 0 <= stage < self.num_stages or state.get("student_steps", self.student_steps(stage)) != \
                self.student_steps(stage):
            raise ValueError(f"progressive: saved stage {stage} ({state.get('student_steps')}-step student) does not "
                             f"fit this schedule (start_steps={self.start_steps}, end_steps={self.end_steps})")
        if stage > 0 and "teacher" not in state:
            raise ValueError(f"progressive: saved stage {stage} lacks its teacher's weights")
        self.stage = stage
        self.stage_teacher = (frozen_copy(self.networks["student"], state["teacher"]) if stage > 0 else None)
