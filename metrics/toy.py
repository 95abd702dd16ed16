"""Distances between two sample sets of vectors [N, D], for toy and analytic distributions.

Sliced Wasserstein (Rabin et al. 2011; Bonneel et al. 2015): SW_p(x, y)^p = E_theta W_p(<theta, x>, <theta, y>)^p
over directions theta uniform on the sphere, with exact 1-D W_p between empirical measures from their quantile
functions, integral_0^1 |F^-1(u) - G^-1(u)|^p du (piecewise constant, so exact for unequal set sizes too).

MMD (Gretton et al. 2012, "A Kernel Two-Sample Test", eq. 3): the unbiased estimate of MMD^2 with a sum of RBF
kernels k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2)). Unbiased means it can be slightly negative when x ~ y.
Memory is O(N M): fine for the few thousand points toy metrics use.
"""
import numpy as np
import torch


def _as_points(x, name):
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    x = x.detach().to(torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty set of vectors [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_pair(x, y):
    x = _as_points(x, "x")
    y = _as_points(y, "y").to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return x, y


def sliced_wasserstein(x, y, projections=256, generator=None, p=2):
    """Sliced p-Wasserstein distance (p = 1 or 2) between point sets x [N, D] and y [M, D], averaged over
    `projections` random directions; generator=None uses a fixed seed so the metric is deterministic."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    x, y = _check_pair(x, y)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    x_proj, y_proj = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values  # [N, P], [M, P]
    n, m = len(x_proj), len(y_proj)
    # quantile levels where either step function jumps; both are constant between consecutive levels
    levels = torch.unique(torch.cat([torch.arange(n + 1, dtype=torch.float64) / n,
                                     torch.arange(m + 1, dtype=torch.float64) / m]))
    widths, middles = levels.diff(), (levels[1:] + levels[:-1]) / 2
    x_idx, y_idx = (middles * n).long().clamp(max=n - 1), (middles * m).long().clamp(max=m - 1)
    gaps = (x_proj[x_idx.to(x.device)] - y_proj[y_idx.to(x.device)]).abs() ** p  # [K, P]
    per_projection = (widths.to(x.device)[:, None] * gaps).sum(0)
    return per_projection.mean().item() ** (1 / p)


def _rbf_sum(a, b, bandwidths):
    squared = torch.cdist(a, b).square()
    return sum(torch.exp(-squared / (2 * s * s)) for s in bandwidths)


def mmd(x, y, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0)):
    """Unbiased MMD^2 between x [N, D] and y [M, D] (N, M >= 2) with a sum of RBF kernels of the given widths."""
    x, y = _check_pair(x, y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"unbiased MMD needs at least 2 points per set, got {len(x)} and {len(y)}")
    if not bandwidths or any(float(s) <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive widths, got {bandwidths!r}")
    n, m, k = len(x), len(y), len(bandwidths)  # k(a, a) = k, one per kernel, on the excluded diagonals
    xx = (_rbf_sum(x, x, bandwidths).sum() - n * k) / (n * (n - 1))
    yy = (_rbf_sum(y, y, bandwidths).sum() - m * k) / (m * (m - 1))
    xy = _rbf_sum(x, y, bandwidths).mean()
    return (xx + yy - 2 * xy).item()
