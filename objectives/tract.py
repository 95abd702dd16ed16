"""TRACT: transitive closure time-distillation (Berthelot et al. 2023, "TRACT: Denoising Diffusion Models with
Transitive Closure Time-Distillation"), the EDM variant (apple/ml-tract tc_distill_edm.py).

Progressive distillation with large jumps: each phase distils a T_prev-step sampler into a T_next-step one (e.g.
40 -> 1, or 1024 -> 32 -> 1), T_prev = m T_next. The fine grid has T_prev Karras steps (objectives.progressive.
nested_sigmas); the coarse one takes every m-th level, so each coarse step is a segment of m fine steps. Per sample:

    a segment k and a fine point s0 in it; s1 = s0 + 1 (the next fine level); s2 = the segment's end
    x_s0 = x0 + sigma_s0 z
    x_s1 = one teacher step s0 -> s1 (Heun for EDM teachers, `teacher_solver`; Euler for a phase teacher, a
           distilled student trained for Euler jumps, which a Heun step would evaluate off its grid)
    x_s2 = x_s1 if s1 = s2, else one Euler (DDIM) jump s1 -> s2 of the self-teacher, an EMA of the student (0.5)
    x0_tilde = (sigma_s0 x_s2 - sigma_s2 x_s0) / (sigma_s0 - sigma_s2)   the x0 whose Euler jump s0 -> s2 lands on x_s2
    L = lambda(sigma_s0) d(D_student(x_s0, sigma_s0), SG x0_tilde),      lambda = EDM's (sigma^2 + sd^2) / (sigma sd)^2

At the last fine step of the grid (s1 = s2 = 0) the target is the teacher's own x0 (Heun's step into 0 is Euler).
The teacher of phase 0 is the given one; at each later phase a frozen copy of the student becomes the teacher (the
paper uses the evaluation EMA there: the loop owns that EMA, so this takes the training weights, as
objectives/progressive.py does). The self-teacher is updated after every optimiser step (`after_step`). The student
is a Denoiser on a copy of the teacher's backbone with the teacher's preconditioning; it samples with Euler on the
coarse grid of the current phase (eval_nfe = T_next).
"""
import torch

from models.noise import append_dims
from models.ema import update_ema
from objectives.base import TEACHER_STEPS, Objective, frozen_copy, pick, student_denoiser
from objectives.distances import make_distance
from objectives.progressive import nested_sigmas
from solvers import SOLVERS, euler_step


class TRACT(Objective):
    """TRACT (Berthelot et al. 2023): a teacher step plus a self-teacher jump across each coarse segment."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True

    def __init__(self, backbone, teacher=None, steps=(40, 1), steps_per_phase=50000, self_teacher_decay=0.5,
                 teacher_solver="heun", distance="mse", sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__()
        if teacher is None:
            raise ValueError("tract needs a teacher: pass --teacher RUN (a trained denoiser) or an analytic one")
        steps = [int(s) for s in steps]
        if len(steps) < 2 or min(steps) < 1 or any(a <= b or a % b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"tract steps must decrease, each dividing the one before (e.g. [40, 1] or [1024, 32, 1]); "
                             f"got {steps}")
        if int(steps_per_phase) != steps_per_phase or steps_per_phase < 1 or not 0 <= self_teacher_decay < 1:
            raise ValueError(f"tract needs steps_per_phase >= 1 and self_teacher_decay in [0, 1); got "
                             f"{steps_per_phase!r}, {self_teacher_decay!r}")
        self.steps, self.steps_per_phase = steps, int(steps_per_phase)
        self.self_teacher_decay = float(self_teacher_decay)
        self.grid_kwargs = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))
        self.teacher_step = pick(TEACHER_STEPS, teacher_solver, "tract teacher_solver")
        self.distance = make_distance(distance)
        self.networks["student"] = student_denoiser(backbone, teacher, "teacher", None)[0]
        self.sigma_data = self.networks["student"].sigma_data
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.teacher = teacher            # phase 0's
        self.phase = 0                    # the phase of the last loss() call
        self.phase_teacher = None         # frozen copy of the student, the teacher of phases >= 1
        self.self_teacher = None          # EMA of the student, made at the first step
        self._grids = {}

    # -- phases, a pure function of the training step

    def phase_at(self, step):
        return min(step // self.steps_per_phase, len(self.steps) - 2)

    @property
    def eval_nfe(self):
        return self.steps[self.phase + 1]

    def advance(self, step):
        phase = self.phase_at(step)
        if phase > self.phase:
            self.phase_teacher = frozen_copy(self.networks["student"])
            self.phase = phase

    def fine_grid(self, like):
        """The T_prev-step grid of the current phase (descending, ending in 0), in like's dtype and device, cached."""
        key = (self.steps[self.phase], like.device, like.dtype)
        if key not in self._grids:
            self._grids[key] = nested_sigmas(self.steps[self.phase], **self.grid_kwargs).to(like.device, like.dtype)
        return self._grids[key]

    # -- training

    def target(self, x0, noise, fine_index, segment_end, cond):
        """(x_s0, sigma_s0, x0_tilde) for fine indices s0 = fine_index and s2 = segment_end (both [B])."""
        grid = self.fine_grid(x0)
        sigma_s0, sigma_s1, sigma_s2 = grid[fine_index], grid[fine_index + 1], grid[segment_end]
        x_s0 = x0 + append_dims(sigma_s0, x0.ndim) * noise
        if self.phase == 0:
            x_s1 = self.teacher_step(self.teacher, x_s0, sigma_s0, sigma_s1, cond=cond)[0]
        else:  # a distilled student is trained for Euler jumps on its grid: step it with Euler
            x_s1 = euler_step(self.phase_teacher, x_s0, sigma_s0, sigma_s1, cond=cond)[0]
        # the self-teacher's Euler jump s1 -> s2, kept where s1 < s2 (computed for the whole batch: no host sync; where
        # s1 is the grid's final 0 the level is raised to sigma_min only to keep the discarded values finite)
        sigma_s1 = sigma_s1.clamp_min(self.grid_kwargs["sigma_min"])
        x0_hat = self.self_teacher(x_s1, sigma_s1, **(cond or {}))
        x_jump = x0_hat + append_dims(sigma_s2 / sigma_s1, x0.ndim) * (x_s1 - x0_hat)
        x_s2 = torch.where(append_dims(fine_index + 1 < segment_end, x0.ndim), x_jump, x_s1)
        ratio = append_dims(sigma_s2 / sigma_s0, x0.ndim)
        return x_s0, sigma_s0, (x_s2 - ratio * x_s0) / (1 - ratio)

    def loss(self, role, batch, step):
        self.advance(step)
        if self.self_teacher is None:
            self.self_teacher = frozen_copy(self.networks["student"])
        x0, labels = batch
        cond = {"class_labels": labels} if self.conditional else None
        t_prev, t_next = self.steps[self.phase], self.steps[self.phase + 1]
        m = t_prev // t_next
        fine_index = torch.randint(0, t_prev, (x0.shape[0],), device=x0.device)
        segment_end = (fine_index // m + 1) * m
        with torch.no_grad():
            x_s0, sigma_s0, x0_tilde = self.target(x0, torch.randn_like(x0), fine_index, segment_end, cond)
        x0_hat = self.networks["student"](x_s0, sigma_s0, **(cond or {}))
        weight = (sigma_s0**2 + self.sigma_data**2) / (sigma_s0 * self.sigma_data) ** 2
        loss = (weight * self.distance(x0_hat, x0_tilde)).mean()
        return loss, {"loss": loss.detach()}

    def after_step(self, role, step):
        update_ema(self.self_teacher, self.networks["student"], self.self_teacher_decay)

    # -- sampling

    def generate(self, z, nfe, cond=None):
        """Euler on the coarse grid of the current phase: nfe must be its step count T_next."""
        if nfe != self.eval_nfe:
            raise ValueError(f"tract: the student of phase {self.phase} samples with its {self.eval_nfe} coarse steps; "
                             f"got nfe={nfe}")
        m = self.steps[self.phase] // nfe
        sigmas = nested_sigmas(self.steps[self.phase], **self.grid_kwargs)[::m].to(z.device)
        return SOLVERS["euler"](self.networks["student"], z * sigmas[0], sigmas, cond=cond)

    def denoiser(self):
        return self.networks["student"]

    # -- exact resume

    def state_dict(self):
        state = {"phase": self.phase}
        for name in ("phase_teacher", "self_teacher"):
            if getattr(self, name) is not None:
                state[name] = {k: v.detach().clone() for k, v in getattr(self, name).state_dict().items()}
        return state

    def load_state_dict(self, state):
        phase = int(state.get("phase", 0))
        if not 0 <= phase <= len(self.steps) - 2 or (phase > 0 and "phase_teacher" not in state):
            raise ValueError(f"tract: saved phase {phase} does not fit steps {self.steps} (or lacks its teacher)")
        self.phase = phase
        for name in ("phase_teacher", "self_teacher"):
            setattr(self, name, frozen_copy(self.networks["student"], state[name]) if name in state else None)

