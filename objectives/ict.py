"""Improved consistency training (iCT): Song & Dhariwal 2024, "Improved Techniques for Training Consistency Models".

Consistency training (objectives/ct.py) with the paper's changes, each in one place below:

- no EMA target: f_theta- = SG f_theta (Sec. 3.2), so target_decay is 0;
- pseudo-Huber distance d = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (Sec. 3.3; objectives/distances.py);
- weight lambda = 1 / (sigma_hi - sigma_lo) (Sec. 3.4);
- exponential curriculum (Sec. 3.5): N(k) = min(s0 2^floor(k / K'), s1) + 1 levels, K' = floor(K / (log2 floor(s1 / s0)
  + 1)); with s0 = 10, s1 = 1280 and K = 400k: K' = 50k and N = 11, 21, 41, ..., 1281;
- lognormal interval draws (Sec. 3.5): p(i) proportional to erf((ln sigma_hi - P_mean) / (sqrt 2 P_std))
  - erf((ln sigma_lo - P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2.0.

K = total_steps, the run's train.steps unless set. Dropout is shared between the two passes
(objectives/consistency.py); the paper used dropout 0.3 on CIFAR-10 (backbone.dropout). Random initial weights.
"""
import math

import torch

from objectives.consistency import ConsistencyObjective


class ICT(ConsistencyObjective):
    """iCT (Song & Dhariwal 2024): CT without an EMA target, pseudo-Huber, 1/dsigma weights, exponential curriculum
    and lognormal level draws."""

    def __init__(self, backbone, s0=10, s1=1280, total_steps=None, p_mean=-1.1, p_std=2.0, distance="pseudo_huber",
                 sigma_min=0.002, sigma_max=80.0, rho=7.0, sample_sigmas=()):
        if not (int(s0) == s0 and int(s1) == s1 and 1 <= s0 <= s1):
            raise ValueError(f"ict needs integers 1 <= s0 <= s1; got s0={s0!r}, s1={s1!r}")
        if total_steps is None or int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"ict needs total_steps (K, the curriculum's length) >= 1; got {total_steps!r}")
        if not p_std > 0:
            raise ValueError(f"ict p_std must be > 0; got {p_std!r}")
        super().__init__(backbone, None, sigma_min, sigma_max, rho, distance=distance, sample_sigmas=sample_sigmas)
        self.s0, self.s1, self.total_steps = int(s0), int(s1), int(total_steps)
        self.stage_length = max(1, self.total_steps // (int(math.log2(self.s1 // self.s0)) + 1))  # K'
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self._probabilities = {}

    def grid_size(self, step):
        return min(self.s0 * 2 ** (step // self.stage_length), self.s1) + 1

    def interval_probabilities(self, grid):
        """p(i) of each interval grid[i] > grid[i + 1] (sums to 1), made once per grid."""
        key = (len(grid), str(grid.device))
        if key not in self._probabilities:
            cdf = torch.erf((grid.double().log() - self.p_mean) / (math.sqrt(2) * self.p_std))
            mass = cdf[:-1] - cdf[1:]
            self._probabilities[key] = (mass / mass.sum()).to(grid.dtype)
        return self._probabilities[key]

    def draw_intervals(self, n, grid, device):
        return torch.multinomial(self.interval_probabilities(grid), n, replacement=True)

    def weight(self, sigma_hi, sigma_lo):
        return 1 / (sigma_hi - sigma_lo)
