"""Euler's method for the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i with d_i = (x_i - D(x_i, sigma_i)) / sigma_i, which equals
DDIM (eta = 0), DPM-Solver-1 and DPM-Solver++(1) in VE coordinates (EDM, Karras et al. 2022: Algorithm 1
without its second-order correction). First order; one denoiser evaluation per step: n steps = n NFE.
"""
import torch

from .common import call_denoiser, check_cond, check_state, one_nfe_per_step, run_sampler, step_level


def euler_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, solver):
    """One Euler step with precomputed levels (floats, or [B, 1, ...] tensors) and sigma batch."""
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    # x + (sigma_next - sigma) * (x - x0_hat) / sigma, arranged so that sigma_next = 0 gives x0_hat exactly
    return x0_hat + (sigma_next / sigma) * (x - x0_hat), x0_hat


def euler_step(denoiser, x, sigma, sigma_next, cond=None):
    """One Euler step from sigma to sigma_next -> (x_next, x0_hat at sigma).

    sigma and sigma_next are python floats, 0-dim tensors or [B] tensors (one level per sample, as in
    consistency distillation); tensors cost no host sync. sigma_next may exceed sigma (inversion).
    """
    check_state(x, "euler_step")
    s, sigma_batch = step_level(sigma, x, "euler_step")
    s_next, _ = step_level(sigma_next, x, "euler_step")
    if not isinstance(s, torch.Tensor) and s == 0:
        raise ValueError("euler_step: sigma must be > 0 (the ODE's d = (x - D) / sigma is undefined at 0)")
    return euler_update(denoiser, x, s, s_next, sigma_batch, check_cond(cond, "euler_step"), "euler_step")


def sample_euler(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False):
    """Euler (= DDIM eta=0): first order, 1 NFE per step.

    x = sigmas[0] * z; sigmas a strictly decreasing 1-D tensor ending in 0. Returns x0, or
    (x0, trajectory) with the states at every sigma when return_trajectory is set. callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step, x and x0_hat taken at sigma.
    """
    cond = check_cond(cond, "euler")

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        return euler_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, "euler")

    return run_sampler("euler", step, x, sigmas, callback, return_trajectory)


one_nfe_per_step(sample_euler, "euler")
