"""Sampling a flow map G(x, sigma, sigma_to) (models/flow_map.py: CTM, MeanFlow) in one or a few jumps.

CTM's gamma-sampling (Kim et al. 2024, Sec. 5 / Algorithm 3) over levels sigmas = [s_0, s_1, ..., s_{n-1}, 0]:

    x = s_0 z;   for each step k:   x = G(x, s_k, sqrt(1 - gamma^2) s_{k+1}) + gamma s_{k+1} n_k,   n_k ~ N(0, I)

gamma = 0 is deterministic: the jumps compose along one ODE trajectory (a perfect flow map gives the same sample for
every n). gamma = 1 jumps to 0 and re-noises to s_{k+1}, which is multistep consistency sampling. One evaluation of G
per step, so n steps are n NFE; one step is G(s_0 z, s_0, 0). Not in SOLVERS: a solver there integrates a denoiser
D(x, sigma), and a flow map takes a second level.
"""
import math

from solvers.schedules import karras

from .common import check_cond, one_nfe_per_step, run_sampler
from .stochastic import check_generator, noise_like


def flow_map_levels(nfe, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The nfe + 1 levels [sigma_max, inner..., 0] of an nfe-jump sample: the nfe - 1 inner levels of the
    (nfe + 1)-level Karras grid, as multistep consistency sampling takes them (2.52 for nfe = 2 at the defaults)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"flow map sampling needs an integer nfe >= 1, got {nfe!r}")
    inner = karras(nfe + 1, sigma_min, sigma_max, rho)[1:-2].tolist() if nfe > 1 else []
    return [float(sigma_max), *inner, 0.0]


def sample_flow_map(flow_map, x, sigmas, cond=None, callback=None, return_trajectory=False, gamma=0.0,
                    generator=None):
    """gamma-sampling (module docstring) of flow_map(x, sigma [B], sigma_to [B], **cond) from x = sigmas[0] z.
    The callback's x0_hat is the jump's result (a flow map gives no separate x0 estimate without another call)."""
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"flow map sampling: gamma must lie in [0, 1], got {gamma!r}")
    generator = check_generator(generator, "flow_map")
    cond = check_cond(cond, "flow_map")
    keep = math.sqrt(1.0 - float(gamma) ** 2)

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        landed = flow_map(x, sigma_batch, keep * sigma_next_batch, **cond)
        if gamma > 0 and sigma_next > 0:
            landed = landed + gamma * sigma_next * noise_like(landed, generator)
        return landed, landed

    return run_sampler("flow_map", step, x, sigmas, callback, return_trajectory)


one_nfe_per_step(sample_flow_map, "flow_map")
