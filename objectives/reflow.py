"""Reflow: rectified flow on a teacher's coupling (Liu, Gong & Liu, ICLR 2023, "Flow Straight and Fast: Learning to
Generate and Transfer Data with Rectified Flow"), and its one-step distillation.

Rectified flow with the noise at t = 1 (the paper puts it at t = 0; t here is 1 - theirs):

    x_t = (1 - t) x0 + t z,   v = dx_t/dt = z - x0,   min_theta E_t E_(z, x0) ||(z - x0) - v_theta(x_t, t)||^2

In VE sigma space this is x = x_t / (1 - t) = x0 + sigma z with sigma = t / (1 - t) (models/noise.py). Reflow trains it
on the teacher's deterministic coupling: z is the unit noise a teacher rollout started from (x = sigma_max z) and x0 the
rollout's end, so the learned paths are straighter than the teacher's and few Euler steps follow them well.

The velocity comes through the Denoiser: any D gives x0_hat and hence v_hat = (x_t - x0_hat) / t
= (x - (1 + sigma) x0_hat) / sigma, so

    ||v - v_hat||^2 = ||x0_hat - x0||^2 / t^2 = ((1 + sigma) / sigma)^2 ||x0_hat - x0||^2,

the x0-MSE with DSM's weight 1 / c_out^2 of the `flow` parameterisation, whose backbone output is v_hat itself.

mode="flow" (default): t ~ U(t(sigma_min), t(sigma_max)) with t(s) = s / (1 + s), which keeps sigma inside the range
    the teacher's net knows (the paper draws t ~ U(eps, 1), eps = 1e-3); loss = distance(v_hat, z - x0), the paper's
    loss for distance="mse" (other distances compare the velocities too). The result is a denoiser (`denoiser()`),
    sampled by `solver` (default "euler", RF's sampler) with exactly nfe evaluations on `schedule`, by default
    "flow_uniform" (solvers.schedules): RF's Euler grid, n steps uniform in t from t(sigma_max) to 0.
mode="distill": the paper's one-step distillation (as its code does it for k = 1): train only at t(sigma_max) with
    loss = distance(D(sigma_max z, sigma_max), x0) (the paper uses LPIPS: distance="lpips"). One Euler step from
    sigma_max to 0 is D's output, so `generate` takes nfe = 1; the model is then a one-step generator, not a denoiser
    at the other sigmas, and `denoiser()` is None.

The pairs: rollout_solver, rollout_nfe, rollout_schedule, sigma_min, sigma_max, rho and rollout_n say how the loop
makes them (`self.rollouts`: only the final state is saved). eval_nfe: the NFE of the loop's sample grids and quality
report.

Student: a Denoiser over `backbone`, initialised from a trained teacher (`init_from_teacher`). By default
(parameterisation="teacher") a trained teacher's parameterisation and sigma_data are kept: its weights only mean
something under its own preconditioning, and the loss above depends on x0_hat alone, so an `edm` or `eps` student
trains on the same velocity objective. With an analytic teacher the default is "flow" (the paper's), from random
weights.

k-rectified flow: run reflow again with this run as the teacher. The loop generates the couplings afresh from the new
teacher (its own ODE map; a store made by another teacher is refused by fingerprint), and the student starts from its
weights:

    python -m runs.train --objective dsm objective.parameterisation=flow objective.sigma_sampler=flow ...  # 1-RF
    python -m runs.train --objective reflow --teacher RUN_1 ...                                             # 2-RF
    python -m runs.train --objective reflow --teacher RUN_2 ...                                             # 3-RF
    python -m runs.train --objective reflow objective.mode=distill objective.distance=lpips --teacher RUN_k
"""
import torch

from models.noise import append_dims, flow_sigma, flow_t
from objectives.base import Objective, choose, one_step_sample, pick, rollout_plan, student_denoiser
from objectives.distances import make_distance
from solvers import SCHEDULES, SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe

MODES = ("flow", "distill")


class Reflow(Objective):
    """Rectified flow on the teacher's (z, x0) coupling (k-RF), or its one-step distillation (mode="distill")."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True

    def __init__(self, backbone, teacher=None, mode="flow", parameterisation="teacher", sigma_data=None, distance="mse",
                 solver="euler", schedule="flow_uniform", rollout_solver="heun", rollout_nfe=35,
                 rollout_schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0, rollout_n=10000, eval_nfe=1):
        super().__init__()
        if teacher is None:
            raise ValueError("reflow needs a teacher: pass --teacher RUN (a trained denoiser) whose ODE coupling "
                             "(z, x0) the flow is rectified on")
        self.mode = choose(mode, MODES, "reflow mode")
        if self.mode == "distill" and eval_nfe != 1:
            raise ValueError(f"reflow mode=distill samples in one step: eval_nfe must be 1, got {eval_nfe!r}")
        self.eval_nfe = int(eval_nfe)  # the NFE of the loop's sample grids and quality report
        self.networks["student"], self.initialised_from_teacher = student_denoiser(
            backbone, teacher, parameterisation, sigma_data, "flow")
        self.parameterisation = self.networks["student"].parameterisation
        self.sigma_data = self.networks["student"].sigma_data
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.distance = make_distance(distance)
        self.sigma_max = float(sigma_max)
        self.t_min, self.t_max = flow_t(float(sigma_min)), flow_t(self.sigma_max)
        self.solver = pick(SOLVERS, solver, "solver")
        self.schedule = pick(SCHEDULES, schedule, "schedule")
        self.schedule_kwargs = (dict(sigma_max=sigma_max) if schedule == "flow_uniform"  # RF's grid ends at t = 0
                                else schedule_kwargs(schedule, sigma_min, sigma_max, rho))
        self.rollouts, self.rollout_sigmas = rollout_plan(rollout_solver, rollout_nfe, rollout_schedule, sigma_min,
                                                          sigma_max, rho, save_sigmas=1, n=rollout_n)

    def loss(self, role, batch, step):
        z, xs, labels = batch
        x0 = xs[:, -1]  # the teacher's sample: the last saved state, at sigma = 0
        labels = labels if self.conditional else None
        student, distance = self.networks["student"], self.distance
        if self.mode == "distill":
            loss = distance(one_step_sample(student, z, self.sigma_max, labels), x0).mean()
            return loss, {"loss": loss.detach()}
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(z.shape[0], device=z.device, dtype=z.dtype)
        sigma = append_dims(flow_sigma(t), z.ndim)
        x = x0 + sigma * z  # = x_t / (1 - t), x_t = (1 - t) x0 + t z
        x0_hat = student(x, sigma.flatten(), labels)
        v_hat = (x - (1 + sigma) * x0_hat) / sigma  # = (x_t - x0_hat) / t
        loss = distance(v_hat, z - x0).mean()
        return loss, {"loss": loss.detach()}

    def denoiser(self):
        return self.networks["student"] if self.mode == "flow" else None

    def sampler(self):
        """mode="flow": the flow's own solver and schedule (RF's Euler on flow_uniform by default); mode="distill"
        samples with `generate` (one step), so None."""
        return (self.solver, self.schedule, dict(self.schedule_kwargs)) if self.mode == "flow" else None

    def generate(self, z, nfe, cond=None):
        student = self.networks["student"]
        if self.mode == "distill":
            if nfe != 1:
                raise ValueError(f"reflow mode=distill samples in exactly one step (nfe=1); got nfe={nfe}")
            return one_step_sample(student, z, self.sigma_max, (cond or {}).get("class_labels"))
        sigmas = sigmas_for_nfe(self.solver, nfe, self.schedule, **self.schedule_kwargs).to(z.device)
        return self.solver(student, z * sigmas[0], sigmas, cond=cond, **options_for_nfe(self.solver, nfe))
