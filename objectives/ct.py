"""Consistency training (CT): Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 3 and Sec. 5.

No teacher: the lower point is the same noise at the lower level, an unbiased estimate of the ODE's point there
(Theorem 2), so x_lo = x0 + sigma_{i+1} z. The grid grows and the target EMA tightens over training (k = step,
K = total_steps, the run's train.steps unless set):

    N(k)  = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1         levels (2 at k = 0, s1 + 1 at k = K)
    mu(k) = exp(s0 ln(mu0) / (N(k) - 1))

The paper writes mu(k) = exp(s0 ln(mu0) / N(k)); both official codes divide by N(k) - 1 (mu(0) = mu0^2), which
is what their published numbers used and what this file does. Defaults: CIFAR-10's s0 = 2, s1 = 150, mu0 = 0.9;
the student starts from random weights (the paper's CIFAR-10 CT). The paper's best distance is LPIPS; "mse" is the
project's default. Everything else (loss, target, sampling) is objectives/consistency.py.
"""
import math

from objectives.consistency import ConsistencyObjective


class CT(ConsistencyObjective):
    """Consistency training (Song et al. 2023, Alg. 3): the same noise at the next level gives the lower point."""

    def __init__(self, backbone, s0=2, s1=150, mu0=0.9, total_steps=None, distance="mse", sigma_min=0.002,
                 sigma_max=80.0, rho=7.0, sample_sigmas=()):
        if not (int(s0) == s0 and int(s1) == s1 and 2 <= s0 <= s1):
            raise ValueError(f"ct needs integers 2 <= s0 <= s1; got s0={s0!r}, s1={s1!r}")
        if not 0 < mu0 < 1:
            raise ValueError(f"ct mu0 must be in (0, 1); got {mu0!r}")
        if total_steps is None or int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"ct needs total_steps (K, the curriculum's length) >= 1; got {total_steps!r}")
        super().__init__(backbone, None, sigma_min, sigma_max, rho, distance=distance, sample_sigmas=sample_sigmas)
        self.s0, self.s1, self.mu0, self.total_steps = int(s0), int(s1), float(mu0), int(total_steps)

    def grid_size(self, step):
        k = min(step, self.total_steps) / self.total_steps
        return math.ceil(math.sqrt(k * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1) + 1

    def target_decay(self, step):
        return math.exp(self.s0 * math.log(self.mu0) / (self.grid_size(step) - 1))
