"""Stochastic samplers: Euler ancestral (k-diffusion) and the EDM stochastic sampler (Karras et al. 2022, Alg. 2).

Euler ancestral. A step sigma -> sigma_next is split into a deterministic Euler step down to sigma_down and
fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 so that the noise level is right:
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    x_next = x + (sigma_down - sigma) d + S_noise * sigma_up * z,   d = (x - D(x, sigma)) / sigma.
eta = 1 adds the DDPM posterior's variance (ancestral sampling), eta = 0 is Euler, and for eta <= 1 this is
DDIM(eta) in VE coordinates (derivation in solvers/ddim.py). One NFE per step: n steps = n NFE. The step to
sigma = 0 has sigma_up = sigma_down = 0 and returns D(x, sigma) exactly.

EDM stochastic (Alg. 2). Before step i, if S_tmin <= sigma_i <= S_tmax, the state is pushed up to
sigma_hat = sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) with N the number of steps, by adding
noise of std sqrt(sigma_hat^2 - sigma_i^2) * S_noise ("churn"); then a Heun step sigma_hat -> sigma_{i+1},
Euler into sigma = 0. S_churn = 0 is sample_heun exactly. NFE as Heun: n steps cost 2n - 1; an even budget N
takes n = N / 2 + 1 steps with the first one Euler (euler_first_steps = 1).

Noise is drawn with torch.randn(x.shape, generator=generator) on x's device in x's dtype, only where it is
used, so a sample is reproducible per generator seed (generator=None uses torch's global RNG).
"""
import math
import numbers

import torch

from .common import check_cond, check_nfe, one_nfe_per_step, check_sigmas, check_state, run_sampler, sigma_dtype, step_level
from .euler import euler_update
from .heun import heun_update, sample_heun


def check_real(value, what, solver, low=0.0, high=math.inf, allow_inf=False):
    """A python/0-dim number in [low, high] (finite unless allow_inf), or a one-line ValueError naming the solver."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{solver}: {what} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{solver}: {what} must be {'a' if allow_inf else 'a finite'} number {bounds}, got {value}")
    return value


def check_generator(generator, solver):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{solver}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ancestral_levels(sigma, sigma_next, eta):
    """(sigma_down, sigma_up) of an ancestral step; floats give floats, tensors tensors (no host sync).

    A step up (sigma_next > sigma) gets no noise with tensor levels; the float path rejects it upstream.
    """
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        ancestral = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp_min(0).sqrt()
        sigma_up = torch.minimum(ancestral, torch.as_tensor(sigma_next).to(ancestral))
        return (sigma_next**2 - sigma_up**2).clamp_min(0).sqrt(), sigma_up
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def ancestral_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, eta, S_noise, generator, solver):
    """Euler down to sigma_down, then S_noise * sigma_up * z (drawn only when sigma_up may be > 0)."""
    sigma_down, sigma_up = ancestral_levels(sigma, sigma_next, eta)
    x_next, x0_hat = euler_update(denoiser, x, sigma, sigma_down, sigma_batch, cond, solver)
    if isinstance(sigma_up, torch.Tensor) or sigma_up > 0:
        x_next = x_next + (S_noise * sigma_up) * noise_like(x, generator)
    return x_next, x0_hat


def ancestral_one_step(denoiser, x, sigma, sigma_next, cond, eta, S_noise, generator, solver):
    """Shared body of the public one-step ancestral functions (euler_ancestral_step, ddim_step)."""
    check_state(x, solver)
    cond = check_cond(cond, solver)
    check_generator(generator, solver)
    s, sigma_batch = step_level(sigma, x, solver)
    s_next, _ = step_level(sigma_next, x, solver)
    if not isinstance(s, torch.Tensor):
        if s == 0:
            raise ValueError(f"{solver}: sigma must be > 0 (the ODE's d = (x - D) / sigma is undefined at 0)")
        if not isinstance(s_next, torch.Tensor) and s_next > s:
            raise ValueError(f"{solver}: an ancestral step needs sigma_next <= sigma, got {s_next} > {s}")
    if eta == 0:
        return euler_update(denoiser, x, s, s_next, sigma_batch, cond, solver)
    return ancestral_update(denoiser, x, s, s_next, sigma_batch, cond, eta, S_noise, generator, solver)


# ---------------------------------------------------------------- Euler ancestral

def euler_ancestral_step(denoiser, x, sigma, sigma_next, cond=None, eta=1.0, S_noise=1.0, generator=None):
    """One Euler-ancestral step from sigma to sigma_next -> (x_next, x0_hat at sigma).

    sigma and sigma_next are python floats, 0-dim tensors or [B] tensors (one level per sample). With
    tensor levels noise is always drawn (scaled by sigma_up, 0 where sigma_next = 0).
    """
    eta = check_real(eta, "eta", "euler_ancestral_step")
    S_noise = check_real(S_noise, "S_noise", "euler_ancestral_step")
    return ancestral_one_step(denoiser, x, sigma, sigma_next, cond, eta, S_noise, generator, "euler_ancestral_step")


def sample_euler_ancestral(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False,
                           eta=1.0, S_noise=1.0, generator=None):
    """Euler ancestral (k-diffusion): Euler to sigma_down plus fresh noise sigma_up; 1 NFE per step.

    eta >= 0 scales the noise (eta = 0 is sample_euler exactly, eta = 1 ancestral/DDPM), S_noise >= 0
    inflates it, generator (torch.Generator) makes it reproducible. x = sigmas[0] * z; sigmas strictly
    decreasing, ending in 0. Returns x0, or (x0, trajectory) with return_trajectory. callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step, x and x0_hat taken at sigma.
    """
    solver = "euler_ancestral"
    cond = check_cond(cond, solver)
    eta = check_real(eta, "eta", solver)
    S_noise = check_real(S_noise, "S_noise", solver)
    check_generator(generator, solver)

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        if eta == 0:
            return euler_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, solver)
        return ancestral_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, eta, S_noise, generator, solver)

    return run_sampler(solver, step, x, sigmas, callback, return_trajectory)


one_nfe_per_step(sample_euler_ancestral, "euler_ancestral")


# ---------------------------------------------------------------- EDM stochastic (Algorithm 2)

def churn(x, sigma, gamma, S_noise, generator):
    """Raise the noise level from sigma to sigma_hat = sigma (1 + gamma) -> (x_hat, sigma_hat); sigma a float
    or a [B, 1, ...] tensor. gamma = 0 returns x itself and draws nothing."""
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + ((sigma_hat**2 - sigma**2) ** 0.5 * S_noise) * noise_like(x, generator), sigma_hat


def edm_churn_gamma(sigma, n_steps, S_churn, S_tmin=0.0, S_tmax=math.inf):
    """EDM's gamma_i = min(S_churn / N, sqrt(2) - 1) when S_tmin <= sigma_i <= S_tmax, else 0."""
    return min(S_churn / n_steps, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0


def edm_stochastic_step(denoiser, x, sigma, sigma_next, gamma=0.0, cond=None, S_noise=1.0, generator=None):
    """One EDM Algorithm 2 step: churn sigma -> sigma (1 + gamma), then Heun to sigma_next (Euler into 0)
    -> (x_next, x0_hat at sigma_hat). sigma is a python float; gamma = edm_churn_gamma(sigma, N, S_churn, ...)."""
    solver = "edm_stochastic_step"
    check_state(x, solver)
    cond = check_cond(cond, solver)
    check_generator(generator, solver)
    gamma = check_real(gamma, "gamma", solver)
    S_noise = check_real(S_noise, "S_noise", solver)
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        raise ValueError(f"{solver}: sigma and sigma_next must be python floats here; use heun_step after churn "
                         f"for per-sample levels")
    s, _ = step_level(sigma, x, solver)
    s_next, sigma_next_batch = step_level(sigma_next, x, solver)
    if s == 0 or s_next >= s:
        raise ValueError(f"{solver}: need sigma > sigma_next >= 0, got sigma={s}, sigma_next={s_next}")
    x_hat, sigma_hat = churn(x, s, gamma, S_noise, generator)
    hat_batch = torch.full((x.shape[0],), sigma_hat, dtype=sigma_dtype(x), device=x.device)
    if s_next == 0:
        return euler_update(denoiser, x_hat, sigma_hat, s_next, hat_batch, cond, solver)
    return heun_update(denoiser, x_hat, sigma_hat, s_next, hat_batch, sigma_next_batch, cond, solver)


def sample_edm_stochastic(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False,
                          S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0, generator=None,
                          euler_first_steps=0):
    """EDM stochastic sampler (Karras et al. 2022, Alg. 2): churn, then Heun; 2 NFE per step, Euler into 0.

    S_churn >= 0 sets gamma = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_tmin, S_tmax]; S_noise inflates
    the added noise (EDM's ImageNet-64: S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003). S_churn = 0 is
    sample_heun exactly. euler_first_steps as in sample_heun (even NFE budgets). callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"}, x at sigma before the churn, x0_hat at sigma_hat.
    """
    solver = "edm_stochastic"
    cond = check_cond(cond, solver)
    S_churn = check_real(S_churn, "S_churn", solver)
    S_tmin = check_real(S_tmin, "S_tmin", solver, allow_inf=True)
    S_tmax = check_real(S_tmax, "S_tmax", solver, allow_inf=True)
    S_noise = check_real(S_noise, "S_noise", solver)
    check_generator(generator, solver)
    if S_tmin > S_tmax:
        raise ValueError(f"{solver}: need S_tmin <= S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    if isinstance(euler_first_steps, bool) or not isinstance(euler_first_steps, int) or euler_first_steps < 0:
        raise ValueError(f"{solver}: euler_first_steps must be an integer >= 0, got {euler_first_steps!r}")
    check_state(x, solver)
    levels = check_sigmas(sigmas, solver)
    n_steps = len(levels) - 1
    gammas = [edm_churn_gamma(sigma, n_steps, S_churn, S_tmin, S_tmax) for sigma in levels[:-1]]
    sigma_hats = [sigma * (1 + gamma) if gamma > 0 else sigma for sigma, gamma in zip(levels, gammas)]
    # the churned levels fed to the denoiser, made once on the device (no per-step allocation or sync)
    hat_batches = torch.tensor(sigma_hats, dtype=torch.float64).to(device=x.device, dtype=sigma_dtype(x))
    batch = x.shape[0]

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        x_hat, sigma_hat = churn(x, sigma, gammas[i], S_noise, generator)
        hat_batch = sigma_batch if gammas[i] == 0 else hat_batches[i].expand(batch)
        if sigma_next == 0 or i < euler_first_steps:
            return euler_update(denoiser, x_hat, sigma_hat, sigma_next, hat_batch, cond, solver)
        return heun_update(denoiser, x_hat, sigma_hat, sigma_next, hat_batch, sigma_next_batch, cond, solver)

    return run_sampler(solver, step, x, sigmas, callback, return_trajectory)


def _edm_steps_for_nfe(nfe):
    """As sample_heun: n = nfe // 2 + 1 steps, the first one Euler when nfe is even."""
    return sample_heun.steps_for_nfe(check_nfe(nfe, "edm_stochastic"))


def _edm_options_for_nfe(nfe):
    return sample_heun.options_for_nfe(check_nfe(nfe, "edm_stochastic"))


sample_edm_stochastic.steps_for_nfe = _edm_steps_for_nfe
sample_edm_stochastic.options_for_nfe = _edm_options_for_nfe
