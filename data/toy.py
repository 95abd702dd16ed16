"""Toy 2-D point clouds: two moons, eight Gaussians, checkerboard, swiss roll.

The usual low-dimensional test beds of generative-model papers (e.g. FFJORD, Grathwohl et al. 2019), written
here from their geometric definitions. Each set is a fixed cloud of `n` points drawn once from a seeded
`torch.Generator`, centred and scaled so that the average variance per coordinate is about 1, plus optional
Gaussian noise given in those output units. The sets are unlabelled: every label is 0 and `num_classes` is 0.
"""

import math

import torch
from torch.utils.data import Dataset


def _check_config(n, seed, **nonnegative):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of points, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, value in nonnegative.items():
        if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return torch.Generator().manual_seed(seed)


class PointCloud(Dataset):
    """A fixed, unlabelled set of 2-D points held in memory (base of the toy sets)."""

    shape = (2,)
    num_classes = 0

    def __init__(self, points):
        self.points = points.to(torch.float32).contiguous()  # [n, 2], also used as the reference sample by metrics

    def __len__(self):
        return self.points.shape[0]

    def __getitem__(self, index):
        return self.points[index], torch.zeros((), dtype=torch.int64)


class Moons(PointCloud):
    """Two interleaving half circles (the 'two moons'), centred and scaled to unit variance."""

    def __init__(self, n=50000, seed=0, noise=0.05):
        generator = _check_config(n, seed, noise=noise)
        t = torch.rand(n, generator=generator) * math.pi
        upper = torch.rand(n, generator=generator) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        # Raw moons: mean (0.5, 0.25), variances 0.75 and 1/2 - 1/pi + 1/16; their average is 0.705**2.
        points = torch.stack([x - 0.5, y - 0.25], dim=1) / 0.705
        super().__init__(points + noise * torch.randn(n, 2, generator=generator))


class EightGaussians(PointCloud):
    """Eight isotropic Gaussians evenly spaced on a circle (equal weights)."""

    def __init__(self, n=50000, seed=0, radius=math.sqrt(2.0), std=0.1):
        generator = _check_config(n, seed, radius=radius, std=std)
        angle = torch.randint(0, 8, (n,), generator=generator) * (2 * math.pi / 8)
        centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        # Per-coordinate variance is radius**2 / 2 + std**2: about 1 with the defaults.
        super().__init__(centres + std * torch.randn(n, 2, generator=generator))


class Checkerboard(PointCloud):
    """Uniform on the 8 dark squares of a 4x4 checkerboard, scaled to unit variance."""

    def __init__(self, n=50000, seed=0):
        generator = _check_config(n, seed)
        x = torch.rand(n, generator=generator) * 4 - 2
        # y in [-2, -1) or [0, 1), shifted up by one in every other column: the dark squares of the board.
        y = torch.rand(n, generator=generator) - 2 * torch.randint(0, 2, (n,), generator=generator)
        y = y + torch.floor(x).remainder(2)
        # Uniform on [-2, 2] has variance 4/3: scale by sqrt(3)/2.
        super().__init__(torch.stack([x, y], dim=1) * (math.sqrt(3) / 2))


class SwissRoll(PointCloud):
    """A 2-D swiss roll (t cos t, t sin t) for t uniform in [1.5 pi, 4.5 pi], centred and scaled."""

    def __init__(self, n=50000, seed=0, noise=0.1):
        generator = _check_config(n, seed, noise=noise)
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        # Raw roll: mean (2, 2 / (3 pi)) and average per-coordinate variance 6.79**2 (integrals over t).
        points = torch.stack([t * torch.cos(t) - 2.0, t * torch.sin(t) - 2 / (3 * math.pi)], dim=1) / 6.79
        super().__init__(points + noise * torch.randn(n, 2, generator=generator))
