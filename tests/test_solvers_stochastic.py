"""DDIM, Euler ancestral and the EDM stochastic sampler, checked against the Gaussian N(mu, v I) in closed form."""
import math

import pytest
import torch

from solvers.ddim import ddim_step, sample_ddim
from solvers.euler import sample_euler
from solvers.heun import sample_heun
from solvers.schedules import karras, logsnr, uniform_t
from solvers.stochastic import (edm_churn_gamma, edm_stochastic_step, euler_ancestral_step,
                                sample_edm_stochastic, sample_euler_ancestral)
from tests.gaussian import V, convergence_slope, gaussian_denoiser, problem

SAMPLERS = {"ddim": sample_ddim, "euler_ancestral": sample_euler_ancestral, "edm_stochastic": sample_edm_stochastic}
NOISY = {"ddim": {"eta": 0.7}, "euler_ancestral": {"eta": 1.0}, "edm_stochastic": {"S_churn": 5.0}}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- zero noise = the deterministic counterpart

@pytest.mark.parametrize("grid", [karras(7), uniform_t(7), uniform_t(5, sigma_min=0.002, sigma_max=80.0)])
def test_zero_noise_equals_the_deterministic_sampler_bitwise(grid):
    mu, z = problem()
    denoiser, x = gaussian_denoiser(mu), grid[0] * z
    euler = sample_euler(denoiser, x, grid, return_trajectory=True)[1]
    assert torch.equal(sample_ddim(denoiser, x, grid, return_trajectory=True)[1], euler)  # DDIM default eta = 0
    assert torch.equal(sample_euler_ancestral(denoiser, x, grid, eta=0.0, generator=seeded(1),
                                              return_trajectory=True)[1], euler)
    for first in (0, 1):
        heun = sample_heun(denoiser, x, grid, euler_first_steps=first, return_trajectory=True)[1]
        assert torch.equal(sample_edm_stochastic(denoiser, x, grid, euler_first_steps=first,
                                                 return_trajectory=True)[1], heun)
        # churn confined to a sigma window that no grid level falls in
        windowed = sample_edm_stochastic(denoiser, x, grid, S_churn=40.0, S_tmin=1e3, S_tmax=1e4,
                                         euler_first_steps=first, generator=seeded(1), return_trajectory=True)[1]
        assert torch.equal(windowed, heun)


def test_global_rng_is_untouched_without_noise():
    mu, z = problem()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    sample_ddim(gaussian_denoiser(mu), 80.0 * z, karras(5))
    sample_euler_ancestral(gaussian_denoiser(mu), 80.0 * z, karras(5), eta=0.0)
    sample_edm_stochastic(gaussian_denoiser(mu), 80.0 * z, karras(5))
    assert torch.equal(torch.rand(1), expected)


# ---------------------------------------------------------------- DDIM in VE = DDIM in VP

@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("sigma, sigma_next", [(80.0, 14.0), (1.5, 0.4), (0.3, 0.0)])
def test_ddim_step_equals_the_papers_vp_update(eta, sigma, sigma_next):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    x = mu + sigma * z
    # DDIM eq. 12/16 in VP coordinates, abar = 1 / (1 + sigma^2), written out independently
    abar, abar_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    x0_hat = denoiser(x, torch.full((8,), sigma, dtype=torch.float64))
    eps_hat = (x - x0_hat) / sigma
    s = eta * math.sqrt((1 - abar_next) / (1 - abar)) * math.sqrt(1 - abar / abar_next)
    noise = torch.randn(x.shape, generator=seeded(5), dtype=torch.float64)
    x_vp_next = (math.sqrt(abar_next) * x0_hat + math.sqrt(max(1 - abar_next - s ** 2, 0.0)) * eps_hat
                 + (s * noise if s > 0 else 0.0))
    x_next, x0_returned = ddim_step(denoiser, x, sigma, sigma_next, eta=eta, generator=seeded(5))
    assert torch.allclose(x_next, x_vp_next / math.sqrt(abar_next), rtol=1e-10, atol=1e-12)
    assert torch.equal(x0_returned, x0_hat)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_noise_is_euler_ancestral(eta):
    mu, z = problem()
    grid = uniform_t(6)
    a = sample_ddim(gaussian_denoiser(mu), grid[0] * z, grid, eta=eta, generator=seeded(2))
    b = sample_euler_ancestral(gaussian_denoiser(mu), grid[0] * z, grid, eta=eta, generator=seeded(2))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- the right marginal on the Gaussian

def ancestral_variance(levels, eta):
    """Exact output variance of Euler ancestral / DDIM on the Gaussian, started from its exact marginal."""
    var = V + levels[0] ** 2
    for s, s_next in zip(levels[:-1], levels[1:]):
        up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = math.sqrt(s_next ** 2 - up ** 2)
        gain = (V + down * s) / (V + s ** 2)  # x_next - mu = gain (x - mu) + up z
        var = gain ** 2 * var + up ** 2
    return var


def edm_variance(levels, S_churn, S_noise=1.0):
    """Exact output variance of EDM Algorithm 2 (churn + Heun, Euler into 0) on the Gaussian."""
    var, n = V + levels[0] ** 2, len(levels) - 1
    slope = lambda s: s / (V + s ** 2)  # d = slope(s) (x - mu)
    for s, s_next in zip(levels[:-1], levels[1:]):
        gamma = min(S_churn / n, math.sqrt(2) - 1)
        s_hat = s * (1 + gamma)
        var += S_noise ** 2 * (s_hat ** 2 - s ** 2)
        if s_next == 0:
            gain = V / (V + s_hat ** 2)
        else:
            gain = 1 + (s_next - s_hat) * 0.5 * (slope(s_hat) + slope(s_next) * (1 + (s_next - s_hat) * slope(s_hat)))
        var = gain ** 2 * var
    return var


MARGINAL_CASES = [
    ("euler_ancestral", logsnr(512), {"eta": 1.0}, ancestral_variance(logsnr(512).tolist(), 1.0)),
    ("ddim", uniform_t(512, sigma_min=0.002, sigma_max=80.0), {"eta": 1.0},
     ancestral_variance(uniform_t(512, sigma_min=0.002, sigma_max=80.0).tolist(), 1.0)),
    ("edm_stochastic", karras(128), {"S_churn": 40.0}, edm_variance(karras(128).tolist(), 40.0)),
    ("edm_stochastic", karras(128), {"S_churn": 80.0, "S_noise": 1.5}, edm_variance(karras(128).tolist(), 80.0, 1.5)),
]


@pytest.mark.parametrize("name, grid, options, exact_var", MARGINAL_CASES)
def test_samples_have_the_samplers_exact_mean_and_variance(name, grid, options, exact_var):
    # 20k scalars started from the exact marginal N(mu, v + sigma_max^2): mean mu, variance exact_var
    mu, _ = problem(dim=2)
    z = torch.randn(10_000, 2, dtype=torch.float64, generator=seeded(11))
    x = mu + math.sqrt(V + grid[0].item() ** 2) * z
    x0 = SAMPLERS[name](gaussian_denoiser(mu), x, grid, generator=seeded(12), **options)
    mean_error = (x0.mean(0) - mu).abs().max().item()
    var = x0.var(0).mean().item()
    assert mean_error < 4.5 * math.sqrt(exact_var / 10_000), (mean_error, exact_var)
    assert abs(var - exact_var) < 4.5 * exact_var * math.sqrt(2 / 20_000), (var, exact_var)
    if options.get("S_noise", 1.0) == 1.0:  # and that is the data's variance, up to the O(1/n) bias
        assert abs(exact_var - V) < 0.03 * V, exact_var


def test_discrete_variance_converges_to_the_datas():
    steps = [64, 128, 256, 512]
    ancestral = [abs(ancestral_variance(logsnr(n).tolist(), 1.0) - V) for n in steps]
    churned = [abs(edm_variance(karras(n).tolist(), 40.0) - V) for n in steps]
    assert abs(convergence_slope(steps, ancestral) + 1) < 0.15, ancestral  # first order, like Euler
    assert abs(convergence_slope(steps, churned) + 2) < 0.2, churned  # second order, like Heun


# ---------------------------------------------------------------- randomness

@pytest.mark.parametrize("name", SAMPLERS)
def test_reproducible_per_seed_and_seeds_differ(name):
    mu, z = problem()
    grid = karras(6)
    run = lambda generator: SAMPLERS[name](gaussian_denoiser(mu), grid[0] * z, grid, generator=generator,
                                           **NOISY[name])
    assert torch.equal(run(seeded(0)), run(seeded(0)))
    assert not torch.allclose(run(seeded(0)), run(seeded(1)))
    torch.manual_seed(4)
    first = run(None)
    torch.manual_seed(4)
    assert torch.equal(run(None), first)


@pytest.mark.parametrize("name", SAMPLERS)
def test_float32_state_stays_float32(name):
    mu, z = problem(batch=3, dim=2)
    grid = karras(4)
    x0, trajectory = SAMPLERS[name](gaussian_denoiser(mu.float()), (grid[0] * z).float(), grid,
                                    generator=seeded(0), return_trajectory=True, **NOISY[name])
    assert x0.dtype == torch.float32 and trajectory.dtype == torch.float32 and torch.isfinite(x0).all()


# ---------------------------------------------------------------- NFE, trajectory, callback, one step

def test_edm_stochastic_budgets_follow_heun():
    for nfe in range(1, 13):
        assert sample_edm_stochastic.steps_for_nfe(nfe) == sample_heun.steps_for_nfe(nfe)
        assert sample_edm_stochastic.options_for_nfe(nfe) == sample_heun.options_for_nfe(nfe)
    assert [sample_ddim.steps_for_nfe(n) for n in (1, 7)] == [1, 7] and sample_ddim.options_for_nfe(7) == {}
    assert sample_euler_ancestral.steps_for_nfe(7) == 7 and sample_euler_ancestral.options_for_nfe(7) == {}


@pytest.mark.parametrize("name", SAMPLERS)
def test_trajectory_and_callback(name):
    mu, z = problem(batch=3, dim=4)
    grid = karras(5)
    x = grid[0] * z.reshape(3, 2, 2)
    infos = []
    x0, trajectory = SAMPLERS[name](gaussian_denoiser(mu.reshape(2, 2)), x, grid, callback=infos.append,
                                    return_trajectory=True, generator=seeded(0), **NOISY[name])
    assert trajectory.shape == (6, 3, 2, 2) and torch.equal(trajectory[0], x) and torch.equal(trajectory[-1], x0)
    assert [info["i"] for info in infos] == list(range(5))
    assert [info["sigma"] for info in infos] == grid[:-1].tolist()
    assert [info["sigma_next"] for info in infos] == grid[1:].tolist()
    for info in infos:
        assert torch.equal(info["x"], trajectory[info["i"]]) and info["x0_hat"].shape == x.shape
    same = SAMPLERS[name](gaussian_denoiser(mu.reshape(2, 2)), x, grid, generator=seeded(0), **NOISY[name])
    assert torch.equal(same, x0)


def test_step_to_zero_returns_the_denoiser_output():
    mu, z = problem()
    denoiser, x = gaussian_denoiser(mu), 80.0 * z
    expected = denoiser(x, torch.full((8,), 80.0, dtype=torch.float64))
    for sample in SAMPLERS.values():
        assert torch.equal(sample(denoiser, x, torch.tensor([80.0, 0.0])), expected)
    assert torch.equal(sample_euler_ancestral(denoiser, x, torch.tensor([80.0, 0.0]), generator=seeded(0)), expected)


@pytest.mark.parametrize("name, step, options", [
    ("ddim", ddim_step, {"eta": 0.7}), ("euler_ancestral", euler_ancestral_step, {"eta": 0.9, "S_noise": 1.1})])
def test_ancestral_step_functions_equal_one_step_of_the_sampler(name, step, options):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    grid = torch.tensor([10.0, 3.0, 0.0], dtype=torch.float64)
    infos = []
    _, trajectory = SAMPLERS[name](denoiser, 10.0 * z, grid, callback=infos.append, return_trajectory=True,
                                   generator=seeded(7), **options)
    generator = seeded(7)
    x1, x0_hat = step(denoiser, 10.0 * z, 10.0, 3.0, generator=generator, **options)
    assert torch.equal(x1, trajectory[1]) and torch.equal(x0_hat, infos[0]["x0_hat"])
    assert torch.equal(step(denoiser, x1, 3.0, 0.0, generator=generator, **options)[0], trajectory[2])
    # 0-dim tensor levels draw the same noise; per-sample [B] levels match the float step row by row
    as_tensor = step(denoiser, 10.0 * z, torch.tensor(10.0, dtype=torch.float64), torch.tensor(3.0),
                     generator=seeded(7), **options)[0]
    assert torch.allclose(as_tensor, x1, rtol=1e-12, atol=1e-12)
    levels = torch.tensor([10.0, 3.0, 7.0, 1.0, 3.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    levels_next = torch.tensor([3.0, 0.0, 1.0, 0.0, 0.5, 0.1, 2.0, 3.0], dtype=torch.float64)
    batched = step(denoiser, 10.0 * z, levels, levels_next, generator=seeded(8), **options)[0]
    for b in range(len(levels)):
        single = step(denoiser, 10.0 * z, levels[b].item(), levels_next[b].item(), generator=seeded(8), **options)[0]
        assert torch.allclose(batched[b], single[b], rtol=1e-12, atol=1e-12), b


def test_edm_step_function_equals_one_step_of_the_sampler():
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    grid = torch.tensor([10.0, 3.0, 0.0], dtype=torch.float64)
    options = {"S_churn": 0.6, "S_noise": 1.2}
    _, trajectory = sample_edm_stochastic(denoiser, 10.0 * z, grid, return_trajectory=True, generator=seeded(7),
                                          **options)
    generator = seeded(7)
    gamma = edm_churn_gamma(10.0, 2, options["S_churn"])
    assert gamma == 0.3
    x1, _ = edm_stochastic_step(denoiser, 10.0 * z, 10.0, 3.0, gamma=gamma, S_noise=1.2, generator=generator)
    assert torch.equal(x1, trajectory[1])
    x2, _ = edm_stochastic_step(denoiser, x1, 3.0, 0.0, gamma=gamma, S_noise=1.2, generator=generator)
    assert torch.equal(x2, trajectory[2])
    assert edm_churn_gamma(10.0, 2, 100.0) == math.sqrt(2) - 1  # capped
    assert edm_churn_gamma(10.0, 2, 1.0, S_tmin=0.05, S_tmax=5.0) == 0.0  # outside the window


def test_churn_noise_has_the_stated_scale():
    # from x = 0 the churn gives x_hat = sqrt(sigma_hat^2 - sigma^2) S_noise z; with D = 0 (d = x / sigma) the Heun
    # step sigma_hat = 2.5 -> 1 then scales x_hat by 1 + (1 - 2.5) (1 / 2.5 + (1 + (1 - 2.5) / 2.5)) / 2
    x = torch.zeros(20_000, 1, dtype=torch.float64)
    zero = lambda x, sigma: torch.zeros_like(x)
    x_next, _ = edm_stochastic_step(zero, x, 2.0, 1.0, gamma=0.25, S_noise=1.5, generator=seeded(3))
    gain = 1 + (1 - 2.5) * 0.5 * (1 / 2.5 + (1 + (1 - 2.5) / 2.5))
    expected_std = abs(gain) * math.sqrt(2.5 ** 2 - 2.0 ** 2) * 1.5
    assert abs(x_next.std().item() / expected_std - 1) < 0.03


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, options, text", [
    ("ddim", {"eta": -0.1}, "eta"), ("ddim", {"eta": 1.5}, "eta"), ("ddim", {"eta": float("nan")}, "eta"),
    ("ddim", {"eta": "1"}, "eta"), ("ddim", {"generator": 42}, "generator"),
    ("euler_ancestral", {"eta": -1.0}, "eta"), ("euler_ancestral", {"S_noise": -1.0}, "S_noise"),
    ("euler_ancestral", {"S_noise": float("inf")}, "S_noise"), ("euler_ancestral", {"generator": 1}, "generator"),
    ("edm_stochastic", {"S_churn": -1.0}, "S_churn"), ("edm_stochastic", {"S_noise": True}, "S_noise"),
    ("edm_stochastic", {"S_tmin": 5.0, "S_tmax": 1.0}, "S_tmin"),
    ("edm_stochastic", {"S_tmax": float("nan")}, "S_tmax"),
    ("edm_stochastic", {"euler_first_steps": -1}, "euler_first_steps"),
    ("edm_stochastic", {"generator": "seed"}, "generator")])
def test_bad_options_are_value_errors_naming_the_solver(name, options, text):
    mu, z = problem()
    with pytest.raises(ValueError, match=f"{name}: .*{text}"):
        SAMPLERS[name](gaussian_denoiser(mu), z, karras(3), **options)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("nfe", [0, -2, 3.0, True])
def test_bad_nfe_is_a_value_error_naming_the_solver(name, nfe):
    for companion in (SAMPLERS[name].steps_for_nfe, SAMPLERS[name].options_for_nfe):
        with pytest.raises(ValueError, match=name):
            companion(nfe)


@pytest.mark.parametrize("name", SAMPLERS)
def test_bad_schedules_and_denoisers_are_value_errors_naming_the_solver(name):
    mu, z = problem()
    with pytest.raises(ValueError, match=f"{name}.*end in 0"):
        SAMPLERS[name](gaussian_denoiser(mu), z, torch.tensor([3.0, 1.0]), **NOISY[name])
    with pytest.raises(ValueError, match=f"{name}.*decreasing"):
        SAMPLERS[name](gaussian_denoiser(mu), z, torch.tensor([1.0, 3.0, 0.0]), **NOISY[name])
    with pytest.raises(ValueError, match=f"{name}.*non-finite"):
        SAMPLERS[name](lambda x, s: x * float("nan"), z, karras(3), **NOISY[name])


def test_bad_step_arguments_are_value_errors():
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    with pytest.raises(ValueError, match="euler_ancestral_step.*sigma_next <= sigma"):
        euler_ancestral_step(denoiser, z, 1.0, 2.0)
    with pytest.raises(ValueError, match="ddim_step.*sigma must be > 0"):
        ddim_step(denoiser, z, 0.0, 0.0, eta=0.5)
    with pytest.raises(ValueError, match="ddim_step: eta"):
        ddim_step(denoiser, z, 1.0, 0.5, eta=2.0)
    with pytest.raises(ValueError, match="edm_stochastic_step.*sigma > sigma_next"):
        edm_stochastic_step(denoiser, z, 1.0, 1.0, gamma=0.1)
    with pytest.raises(ValueError, match="edm_stochastic_step: gamma"):
        edm_stochastic_step(denoiser, z, 1.0, 0.5, gamma=-0.1)
    with pytest.raises(ValueError, match="edm_stochastic_step.*python floats"):
        edm_stochastic_step(denoiser, z, torch.tensor([1.0] * 8), 0.5)
