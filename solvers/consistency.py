"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

    x = f(sigma_0 z, sigma_0);   for each later level tau > 0:  x_hat = x + sqrt(tau^2 - eps^2) n,  x = f(x_hat, tau)

over a consistency function f (models.consistency) with boundary eps = sigma_min, n ~ N(0, I) fresh at every step.
In the project's schedule convention the levels are sigmas = [sigma_max, tau_1, ..., tau_{n-1}, 0]: n steps, n NFE,
the final 0 only marking the end (each step's output is already a clean estimate). One step is f(sigma_max z,
sigma_max). The paper picks the intermediate tau by search (CIFAR-10 iCT/ECT: 0.821 for two steps); any schedule of
`solvers.schedules` works too. Not in SOLVERS: applied to a plain denoiser this re-noises its posterior mean, which is
not an ODE solver.
"""
import math

from .common import call_denoiser, check_cond, one_nfe_per_step, run_sampler, step_level
from .stochastic import check_generator, noise_like


def consistency_step(model, x, sigma, sigma_next, cond=None, sigma_min=0.002, generator=None):
    """(x_next, x0_hat): x0_hat = f(x, sigma) (sigma a float or a [B] tensor), re-noised to the python float
    sigma_next (x0_hat itself when it is 0)."""
    _, sigma_batch = step_level(sigma, x, "consistency")
    x0_hat = call_denoiser(model, x, sigma_batch, check_cond(cond, "consistency"), "consistency")
    if sigma_next == 0:
        return x0_hat, x0_hat
    return x0_hat + math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0)) * noise_like(x0_hat, generator), x0_hat


def sample_consistency(model, x, sigmas, cond=None, callback=None, return_trajectory=False, sigma_min=None,
                       generator=None):
    """Algorithm 1 over x = sigmas[0] z (module docstring); sigma_min defaults to the model's own (its boundary)."""
    sigma_min = float(getattr(model, "sigma_min", 0.002) if sigma_min is None else sigma_min)
    if not sigma_min > 0:
        raise ValueError(f"consistency: sigma_min must be > 0, got {sigma_min!r}")
    generator = check_generator(generator, "consistency")
    cond = check_cond(cond, "consistency")

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        return consistency_step(model, x, sigma_batch, sigma_next, cond, sigma_min, generator)

    return run_sampler("consistency", step, x, sigmas, callback, return_trajectory)


one_nfe_per_step(sample_consistency, "consistency")
