"""A test oracle: the Gaussian N(mu, v I), whose denoiser and probability-flow ODE solution are exact closed forms.

Written independently of models.analytic on purpose, so solver tests do not trust the code they test against.
"""
import math

import numpy as np
import torch

V = 0.25  # data variance (sigma_data = 0.5)


def gaussian_denoiser(mu, v=V):
    """Exact D(x, s) = mu + v / (v + s^2) (x - mu) for x0 ~ N(mu, v I); s has shape [B]."""
    return lambda x, s: mu + (v / (v + s.reshape(-1, *[1] * (x.ndim - 1)) ** 2)) * (x - mu)


def exact_flow(x, mu, s1, s2, v=V):
    """Exact ODE solution x(s2) = mu + sqrt((v + s2^2) / (v + s1^2)) (x(s1) - mu)."""
    return mu + math.sqrt((v + s2 ** 2) / (v + s1 ** 2)) * (x - mu)


def problem(batch=8, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, dtype=torch.float64, generator=g)
    z = torch.randn(batch, dim, dtype=torch.float64, generator=g)
    return mu, z


def convergence_slope(steps, errors):
    """Slope of log(error) against log(steps): -p for a method of order p."""
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])
