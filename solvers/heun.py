"""Heun's second-order method, deterministic EDM sampler (Karras et al. 2022, Algorithm 1, S_churn = 0).

Per step: d = (x - D(x, sigma)) / sigma, x' = x + (sigma_next - sigma) d, then, if sigma_next > 0,
d' = (x' - D(x', sigma_next)) / sigma_next and x_next = x + (sigma_next - sigma)(d + d') / 2. The last
step to sigma = 0 stays Euler (d' is undefined there). So n steps cost 2n - 1 NFE.

NFE budgets. An odd budget N takes n = (N + 1) / 2 steps. An even budget N takes n = N / 2 + 1 steps
with the FIRST step (highest sigma, where the ODE is nearly linear) taken by Euler, which costs
1 + 2(n - 2) + 1 = N. In general n = N // 2 + 1 and euler_first_steps = 1 when N is even and >= 2;
`sample_heun.steps_for_nfe` and `sample_heun.options_for_nfe` return these.
"""
import torch

from .common import call_denoiser, check_cond, check_nfe, check_state, run_sampler, step_level
from .euler import euler_update


def heun_update(denoiser, x, sigma, sigma_next, sigma_batch, sigma_next_batch, cond, solver):
    """One Heun step (2 NFE) with precomputed levels; sigma_next must be > 0."""
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    d = (x - x0_hat) / sigma
    x_euler = x + (sigma_next - sigma) * d
    d_next = (x_euler - call_denoiser(denoiser, x_euler, sigma_next_batch, cond, solver)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * (d + d_next)), x0_hat


def heun_step(denoiser, x, sigma, sigma_next, cond=None):
    """One Heun step from sigma to sigma_next -> (x_next, x0_hat at sigma); Euler when sigma_next = 0.

    sigma and sigma_next are python floats, 0-dim tensors or [B] tensors (one level per sample). With
    float levels a step to 0 costs 1 NFE. With a tensor sigma_next the Euler/Heun choice is made per
    sample on the device (no host sync), so the second evaluation is always made: 2 NFE.
    """
    check_state(x, "heun_step")
    cond = check_cond(cond, "heun_step")
    s, sigma_batch = step_level(sigma, x, "heun_step")
    s_next, sigma_next_batch = step_level(sigma_next, x, "heun_step")
    if not isinstance(s, torch.Tensor) and s == 0:
        raise ValueError("heun_step: sigma must be > 0 (the ODE's d = (x - D) / sigma is undefined at 0)")
    if not isinstance(s_next, torch.Tensor):
        if s_next == 0:
            return euler_update(denoiser, x, s, s_next, sigma_batch, cond, "heun_step")
        return heun_update(denoiser, x, s, s_next, sigma_batch, sigma_next_batch, cond, "heun_step")
    # Per-sample levels: evaluate the correction at sigma instead of 0 where sigma_next = 0 (finite values
    # and gradients), then keep the Euler result there.
    final = s_next == 0
    safe_batch = torch.where(sigma_next_batch > 0, sigma_next_batch, sigma_batch)
    safe = torch.where(final, s, s_next)
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, "heun_step")
    d = (x - x0_hat) / s
    x_euler = x + (safe - s) * d
    d_next = (x_euler - call_denoiser(denoiser, x_euler, safe_batch, cond, "heun_step")) / safe
    x_heun = x + (s_next - s) * (0.5 * (d + d_next))
    return torch.where(final, x0_hat + (s_next / s) * (x - x0_hat), x_heun), x0_hat


def sample_heun(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, euler_first_steps=0):
    """Heun (EDM Algorithm 1, deterministic): second order, 2 NFE per step, Euler on the last step to 0.

    x = sigmas[0] * z; sigmas a strictly decreasing 1-D tensor ending in 0. euler_first_steps takes
    that many leading steps with Euler (1 NFE each), which lets an even NFE budget be met exactly.
    Returns x0, or (x0, trajectory) with the states at every sigma when return_trajectory is set.
    callback(info) gets {"i", "x", "sigma", "sigma_next", "x0_hat"} per step, x and x0_hat at sigma.
    """
    cond = check_cond(cond, "heun")
    if isinstance(euler_first_steps, bool) or not isinstance(euler_first_steps, int) or euler_first_steps < 0:
        raise ValueError(f"heun: euler_first_steps must be an integer >= 0, got {euler_first_steps!r}")

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        if sigma_next == 0 or i < euler_first_steps:
            return euler_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, "heun")
        return heun_update(denoiser, x, sigma, sigma_next, sigma_batch, sigma_next_batch, cond, "heun")

    return run_sampler("heun", step, x, sigmas, callback, return_trajectory)


def _steps_for_nfe(nfe):
    """n = nfe // 2 + 1 steps: 2n - 1 = nfe when odd; with the first step Euler, 2n - 2 = nfe when even."""
    return check_nfe(nfe, "heun") // 2 + 1


def _options_for_nfe(nfe):
    nfe = check_nfe(nfe, "heun")
    return {"euler_first_steps": 1 if nfe % 2 == 0 else 0}


sample_heun.steps_for_nfe = _steps_for_nfe
sample_heun.options_for_nfe = _options_for_nfe
