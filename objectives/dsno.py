"""DSNO: diffusion sampling with neural operators, a one-pass student that outputs the teacher's whole trajectory.

Zheng, Nie, Vahdat, Azizzadenesheli & Anandkumar, ICML 2023, "Fast Sampling of Diffusion Models via Operator
Learning". The student is the teacher's U-Net with temporal Fourier layers (models/fno.py), wrapped as a
models.generator.TimeGenerator and initialised from the teacher: from the start noise z (x_T = sigma_max z) it
returns, in one network evaluation, the states at the K saved levels sigma_1 > ... > sigma_K = 0 of the teacher's
ODE rollout (the data set holds (z, xs [K, ...], label) from the trajectory store). The loss (the paper's Sec. 4 and
its code) is

    L = E_z [ sum_k w_k d(alpha_k x_hat_k(z), alpha_k x_teacher(sigma_k; z)) ],   w_k = clamp(sqrt(SNR_k), 1, 1e4),

with SNR = 1 / sigma^2 in VE (= alpha^2 / sigma_vp^2 in VP), so sigma = 0 gets 1e4 and the endpoint dominates
(CIFAR's four times give w = 1, 2.41, 10.15, 1e4). d is `distance` (mse here by default; the paper uses LPIPS on
CIFAR-10 and L1 on ImageNet-64). normalise_weights=True divides w by its sum (a loss of the distance's scale,
same minimiser; off by default, as in the paper). The paper's trajectory is the VP one, x_vp = alpha x with
alpha_k = 1 / sqrt(1 + sigma_k^2); the student outputs VE states x_hat_k, so both sides are scaled by alpha_k before
the distance: the loss is the paper's (for a perceptual distance, images stay at data scale), not a VE-space MSE
that would weight the noisy early times by 1 + sigma_k^2. Sampling returns the last time's output: the x0 estimate.

Saved times: save_sigmas = K (default 4, the paper's count) takes K evenly spaced points of the rollout grid
ending at 0 (data.trajectories.saved_sigmas), or a list of sigmas snapped to the grid.
"""
import torch

from models.generator import outputs_trajectory
from models.noise import append_dims
from objectives.base import Objective, rollout_plan, time_generator_student
from objectives.distances import make_distance


def dsno_weights(sigmas):
    """DSNO's weights clamp(sqrt(SNR), 1, 1e4) = clamp(1 / sigma, 1, 1e4) for VE levels sigma (0 -> 1e4)."""
    return (1 / sigmas).clamp(1.0, 1e4)


class DSNO(Objective):
    """DSNO (Zheng et al. 2023): one pass of an operator backbone regresses K points of the teacher's trajectory."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True

    def __init__(self, backbone, teacher=None, solver="heun", nfe=35, schedule="karras", sigma_min=0.002,
                 sigma_max=80.0, rho=7.0, save_sigmas: int | list = 4, n=2000, distance="mse", normalise_weights=False):
        super().__init__()
        if teacher is None:
            raise ValueError("dsno needs a teacher: pass --teacher RUN (its rollouts are the training data)")
        if not outputs_trajectory(backbone):
            raise ValueError("dsno needs a backbone that outputs a trajectory (fno); "
                             f"got {type(backbone).__name__.lower()}")
        self.rollouts, self.rollout_sigmas = rollout_plan(solver, nfe, schedule, sigma_min, sigma_max, rho,
                                                          save_sigmas, n)
        if float(self.rollout_sigmas[-1]) != 0:
            raise ValueError(f"dsno's last saved sigma must be 0 (the x0 it samples); got save_sigmas={save_sigmas}")
        self.weights = dsno_weights(self.rollout_sigmas.to(torch.float64))
        self.vp_scale = (1 + self.rollout_sigmas.to(torch.float64) ** 2).rsqrt()  # alpha_k of x_vp = alpha x_ve
        if normalise_weights:
            self.weights = self.weights / self.weights.sum()
        self.distance = make_distance(distance)
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.networks["student"] = time_generator_student(backbone, teacher, float(sigma_max), sigma_min)

    def _labels(self, labels):
        return labels if self.conditional else None

    def trajectory(self, z, cond=None):
        """All K outputs [B, K, *shape], at self.rollout_sigmas."""
        labels = None if cond is None else self._labels(cond.get("class_labels"))
        return self.networks["student"](z, self.rollout_sigmas, labels)

    def loss(self, role, batch, step):
        z, xs, labels = batch
        x_hat = self.networks["student"](z, self.rollout_sigmas, self._labels(labels))
        scale = append_dims(self.vp_scale, xs.ndim - 1).to(xs.dtype)  # compare in VP space, as the paper does
        per_time = self.distance((scale * x_hat).flatten(0, 1), (scale * xs).flatten(0, 1)).reshape(xs.shape[:2])
        weights = self.weights.to(per_time)
        loss = (per_time * weights).sum(1).mean()
        logs = {"loss": loss.detach()}
        logs.update({f"d_{k}": value.detach() for k, value in enumerate(per_time.mean(0))})
        return loss, logs

    def generate(self, z, nfe, cond=None):
        if nfe != 1:
            raise ValueError(f"dsno generates in one pass (nfe=1); got nfe={nfe}")
        return self.trajectory(z, cond)[:, -1]
