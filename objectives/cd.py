"""Consistency distillation (CD): Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 2.

    repeat:  x0 ~ data, i ~ U{0, ..., N-2} on the Karras grid sigma_max = sigma_0 > ... > sigma_{N-1} = sigma_min
             x_hi  = x0 + sigma_i z
             x_lo  = Phi(x_hi, sigma_i -> sigma_{i+1}; teacher)        one ODE-solver step of the frozen teacher
             L     = d(f_theta(x_hi, sigma_i), SG f_theta-(x_lo, sigma_{i+1}))        (lambda = 1)
             theta- <- mu theta- + (1 - mu) theta                      after the optimiser step

(objectives/consistency.py holds the shared loss, target and sampling). The student is a consistency function
(models.consistency) on a copy of a trained teacher's backbone. Defaults follow the paper's CIFAR-10 setting: N = 18
levels, Heun (EDM's second-order step) as Phi, target_decay mu = 0 (the target is the student under stop-gradient;
ImageNet-64 used N = 40 and mu = 0.95). The paper's best distance is LPIPS (objective.distance=lpips); "mse" is
the project's default (also reported in the paper, as "L2"). sample_sigmas: the re-noising levels of multistep
sampling (the paper searched them; e.g. [1.38] for two steps on ImageNet-64).
"""
from objectives.base import TEACHER_STEPS, pick
from objectives.consistency import ConsistencyObjective


class CD(ConsistencyObjective):
    """Consistency distillation (Song et al. 2023, Alg. 2): one teacher ODE step gives the lower point."""

    needs_teacher = True

    def __init__(self, backbone, teacher=None, num_levels=18, target_decay=0.0, teacher_solver="heun",
                 distance="mse", sigma_min=0.002, sigma_max=80.0, rho=7.0, sample_sigmas=()):
        if teacher is None:
            raise ValueError("cd needs a teacher: pass --teacher RUN (a trained edm denoiser) or an analytic one")
        if int(num_levels) != num_levels or num_levels < 2:
            raise ValueError(f"cd needs num_levels >= 2 (N levels, N - 1 intervals); got {num_levels!r}")
        if not 0 <= target_decay < 1:
            raise ValueError(f"cd target_decay (mu) must be in [0, 1); got {target_decay!r}")
        super().__init__(backbone, teacher, sigma_min, sigma_max, rho, distance=distance, sample_sigmas=sample_sigmas)
        self.teacher = teacher
        self.num_levels, self.mu = int(num_levels), float(target_decay)
        self.teacher_step = pick(TEACHER_STEPS, teacher_solver, "cd teacher_solver")

    def grid_size(self, step):
        return self.num_levels

    def target_decay(self, step):
        return self.mu

    def lower_point(self, x0, z, x_hi, sigma_hi, sigma_lo, labels):
        cond = None if labels is None else {"class_labels": labels}
        return self.teacher_step(self.teacher, x_hi, sigma_hi, sigma_lo, cond=cond)[0]
