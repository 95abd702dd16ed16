"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16) in VE coordinates.

DDIM in VP coordinates, with abar = alpha^2 = 1 / (1 + sigma^2) and ' marking the next level:
    x'_vp = sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps_hat + s z,
    s = eta * sqrt((1 - abar') / (1 - abar)) * sqrt(1 - abar / abar')              (eq. 16)
where eps_hat = (x - x0_hat) / sigma is the same in VP and VE. Dividing by sqrt(abar') (x_ve = x_vp / alpha)
and using (1 - abar') / abar' = sigma'^2, 1 - abar / abar' = (sigma^2 - sigma'^2) / (1 + sigma^2):
    x' = x0_hat + sigma_down * eps_hat + sigma_up * z,
    sigma_up = s / sqrt(abar') = eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),
    sigma_down = sqrt(sigma'^2 - sigma_up^2).
So eta = 0 is exactly the Euler step (fact sheet A.1) and eta in (0, 1] is k-diffusion's ancestral split:
an Euler step to sigma_down plus noise sigma_up (solvers.stochastic). eta = 1 is the DDPM posterior variance.
For eta <= 1, sigma_up <= sigma' always; larger eta would make DDIM's sqrt(1 - abar' - s^2) imaginary, so it
is rejected (sample_euler_ancestral clamps instead). One NFE per step: n steps = n NFE; the step to
sigma = 0 (abar' = 1) returns x0_hat.

Schedule. DDIM's own grid is uniform in VP time t (its "uniform" skip over the DDPM steps): pass
solvers.schedules.uniform_t(n) (t from 1 to 1e-3, sigma 152 -> 0.0105; sigma_min/sigma_max refit the ends),
e.g. sigmas_for_nfe("ddim", nfe, schedule="uniform_t"). Any other decreasing grid works as well.
"""
from .common import check_cond, one_nfe_per_step, run_sampler
from .euler import euler_update
from .stochastic import ancestral_one_step, ancestral_update, check_generator, check_real


def ddim_step(denoiser, x, sigma, sigma_next, cond=None, eta=0.0, generator=None):
    """One DDIM step from sigma to sigma_next -> (x_next, x0_hat at sigma); eta = 0 is the Euler step.

    sigma and sigma_next are python floats, 0-dim tensors or [B] tensors (one level per sample).
    """
    eta = check_real(eta, "eta", "ddim_step", high=1.0)
    return ancestral_one_step(denoiser, x, sigma, sigma_next, cond, eta, 1.0, generator, "ddim_step")


def sample_ddim(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, eta=0.0, generator=None):
    """DDIM (Song et al. 2021): eta = 0 is the Euler step in VE; eta in (0, 1] adds DDIM's noise. 1 NFE per step.

    Meant for the uniform-in-VP-time grid solvers.schedules.uniform_t (DDIM's own). x = sigmas[0] * z;
    sigmas strictly decreasing, ending in 0. generator (torch.Generator) seeds the noise when eta > 0.
    Returns x0, or (x0, trajectory) with return_trajectory. callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step, x and x0_hat taken at sigma.
    """
    cond = check_cond(cond, "ddim")
    eta = check_real(eta, "eta", "ddim", high=1.0)
    check_generator(generator, "ddim")

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        if eta == 0:
            return euler_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, "ddim")
        return ancestral_update(denoiser, x, sigma, sigma_next, sigma_batch, cond, eta, 1.0, generator, "ddim")

    return run_sampler("ddim", step, x, sigmas, callback, return_trajectory)


one_nfe_per_step(sample_ddim, "ddim")
