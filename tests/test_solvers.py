"""Solvers and schedules, checked against the exact probability-flow ODE of a Gaussian N(mu, v I)."""
import json
import math

import numpy as np
import pytest
import torch

import solvers
from solvers import (SCHEDULES, SOLVERS, CountingDenoiser, euler_step, heun_step, karras, logsnr,
                     options_for_nfe, polyexponential, sample_euler, sample_heun, sigmas_for_nfe, uniform_t)
from solvers.schedules import explicit, from_file, vp_sigma, vp_t
from tests.gaussian import exact_flow, gaussian_denoiser, problem

@pytest.mark.parametrize("name, order, tolerance", [("euler", 1.0, 0.15), ("heun", 2.0, 0.2)])
def test_convergence_order_on_gaussian(name, order, tolerance):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    steps, errors = [16, 32, 64, 128, 256], []
    for n in steps:
        sigmas = karras(n, 0.002, 80.0)
        x = 80.0 * z
        _, trajectory = SOLVERS[name](denoiser, x, sigmas, return_trajectory=True)
        # the state at the last nonzero sigma; the final step to 0 is a separate Euler step
        errors.append((trajectory[-2] - exact_flow(x, mu, 80.0, 0.002)).abs().max().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + order) < tolerance, (name, slope, errors)


def test_heun_final_sample_is_close_to_exact_map():
    mu, z = problem()
    x0 = sample_heun(gaussian_denoiser(mu), 80.0 * z, karras(256))
    assert torch.allclose(x0, exact_flow(80.0 * z, mu, 80.0, 0.0), atol=1e-3)


def test_one_euler_step_to_zero_returns_the_denoiser_output():
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    x = 80.0 * z
    sigma = torch.full((x.shape[0],), 80.0, dtype=torch.float64)
    for sample in (sample_euler, sample_heun):
        assert torch.equal(sample(denoiser, x, torch.tensor([80.0, 0.0])), denoiser(x, sigma))


def test_heun_steps_for_nfe_uses_euler_first_only_for_even_budgets():
    assert [sample_heun.steps_for_nfe(n) for n in (1, 2, 3, 4, 9, 10)] == [1, 2, 2, 3, 5, 6]
    assert options_for_nfe("heun", 9) == {"euler_first_steps": 0}
    assert options_for_nfe("heun", 10) == {"euler_first_steps": 1}
    assert options_for_nfe("euler", 10) == {}
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), karras(4)
    _, trajectory = sample_heun(denoiser, 80.0 * z, sigmas, return_trajectory=True, euler_first_steps=1)
    euler_first, _ = euler_step(denoiser, 80.0 * z, sigmas[0].item(), sigmas[1].item())
    heun_first, _ = heun_step(denoiser, 80.0 * z, sigmas[0].item(), sigmas[1].item())
    assert torch.equal(trajectory[1], euler_first) and not torch.equal(trajectory[1], heun_first)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("nfe", [0, -1, 2.0, True])
def test_bad_nfe_is_a_value_error_naming_the_solver(name, nfe):
    with pytest.raises(ValueError, match=name):
        sigmas_for_nfe(name, nfe)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="euler"):
        sigmas_for_nfe("rk45", 3)
    with pytest.raises(ValueError, match="karras"):
        sigmas_for_nfe("euler", 3, schedule="cosine")
    with pytest.raises(ValueError, match="rh0"):
        sigmas_for_nfe("euler", 3, rh0=3.0)


@pytest.mark.parametrize("sample, step", [(sample_euler, euler_step), (sample_heun, heun_step)])
def test_step_function_equals_one_step_of_the_sampler(sample, step):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    sigmas = torch.tensor([10.0, 3.0, 0.0], dtype=torch.float64)
    infos = []
    _, trajectory = sample(denoiser, 10.0 * z, sigmas, callback=infos.append, return_trajectory=True)
    x1, x0_hat = step(denoiser, 10.0 * z, 10.0, 3.0)
    assert torch.equal(x1, trajectory[1]) and torch.equal(x0_hat, infos[0]["x0_hat"])
    assert torch.equal(step(denoiser, x1, 3.0, 0.0)[0], trajectory[2])
    # tensor levels (0-dim and one per sample) agree with float levels
    as_tensor = step(denoiser, 10.0 * z, torch.tensor(10.0, dtype=torch.float64), torch.tensor(3.0))[0]
    assert torch.allclose(as_tensor, x1, rtol=1e-12, atol=1e-12)
    levels = torch.tensor([10.0, 3.0, 7.0, 1.0, 3.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    levels_next = torch.tensor([3.0, 0.0, 1.0, 0.0, 0.5, 0.1, 2.5, 3.0], dtype=torch.float64)
    batched = step(denoiser, 10.0 * z, levels, levels_next)[0]
    for b in range(len(levels)):
        single = step(denoiser, 10.0 * z[b:b + 1], levels[b].item(), levels_next[b].item())[0]
        assert torch.allclose(batched[b:b + 1], single, rtol=1e-12, atol=1e-12)


def test_step_gradients_flow_and_stay_finite():
    mu, z = problem(batch=2, dim=3)
    x = (5.0 * z).requires_grad_()
    x_next, _ = heun_step(gaussian_denoiser(mu), x, torch.tensor([5.0, 5.0]), torch.tensor([1.0, 0.0]))
    x_next.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert sample_euler(gaussian_denoiser(mu), x, karras(3, sigma_max=5.0)).requires_grad


@pytest.mark.parametrize("sample", [sample_euler, sample_heun])
@pytest.mark.parametrize("bad, problem_text", [
    ([0.0, 1.0, 2.0], "decreasing"), ([3.0, 2.0, 1.0], "end in 0"), ([3.0, float("nan"), 0.0], "finite"),
    ([3.0, 3.0, 0.0], "decreasing"), ([0.0], "at least 2"), ([[2.0, 0.0]], "1-D")])
def test_bad_schedules_are_value_errors_naming_the_solver(sample, bad, problem_text):
    mu, z = problem()
    name = sample.__name__.removeprefix("sample_")
    with pytest.raises(ValueError, match=f"{name}.*{problem_text}"):
        sample(gaussian_denoiser(mu), z, torch.tensor(bad, dtype=torch.float64))


@pytest.mark.parametrize("sample", [sample_euler, sample_heun])
def test_bad_denoiser_outputs_are_value_errors(sample):
    mu, z = problem()
    name = sample.__name__.removeprefix("sample_")
    with pytest.raises(ValueError, match=rf"{name}.*\[8, 4\].*\[8, 5\]"):
        sample(lambda x, s: x[:, :4], z, karras(3))
    with pytest.raises(ValueError, match=f"{name}.*non-finite"):
        sample(lambda x, s: x * float("nan"), z, karras(3))
    with pytest.raises(ValueError, match=f"{name}.*cond"):
        sample(gaussian_denoiser(mu), z, karras(3), cond=[1])


def test_counting_denoiser_counts_and_resets():
    mu, z = problem()
    counter = CountingDenoiser(gaussian_denoiser(mu))
    sample_heun(counter, 80.0 * z, karras(5))
    assert counter.nfe == 9
    counter.reset()
    heun_step(counter, z, 1.0, 0.5)
    assert counter.nfe == 2


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", ["karras", "logsnr", "polyexponential", "flow_uniform"])
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_schedule_endpoints_and_monotonicity(name, n):
    sigmas = SCHEDULES[name](n, sigma_min=0.01, sigma_max=20.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0 and math.isclose(sigmas[0].item(), 20.0, rel_tol=1e-12)
    if n > 1:
        assert math.isclose(sigmas[-2].item(), 0.01, rel_tol=1e-12)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_schedule_closed_forms():
    n, rho = 10, 7.0
    i = 4
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert math.isclose(karras(n)[i].item(), expected, rel_tol=1e-12)
    log_steps = torch.diff(logsnr(n).log()[:-1])
    assert torch.allclose(log_steps, log_steps[0].expand(n - 1))
    assert torch.allclose(polyexponential(n, rho=1.0), logsnr(n), rtol=1e-12)
    assert torch.allclose(karras(n, rho=1e6), logsnr(n), rtol=1e-4)  # rho -> inf is log-uniform
    t = SCHEDULES["flow_uniform"](4, sigma_max=3.0)  # rectified flow's grid: t = s/(1+s) = 0.75, 0.5625, ..., 0
    assert torch.allclose(t / (1 + t), torch.tensor([0.75, 0.5625, 0.375, 0.1875, 0.0], dtype=torch.float64))


def test_uniform_t_matches_the_vp_formula_and_its_inverse():
    sigmas = uniform_t(5)
    t = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    formula = torch.sqrt(torch.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    assert torch.allclose(sigmas[:-1], formula, rtol=1e-10) and sigmas[-1] == 0
    assert math.isclose(sigmas[0].item(), 152.17, rel_tol=1e-4)
    assert math.isclose(sigmas[-2].item(), 0.010486, rel_tol=1e-4)
    ts = torch.linspace(1e-4, 1.5, 101, dtype=torch.float64)
    assert torch.allclose(vp_t(vp_sigma(ts)), ts, rtol=1e-10, atol=1e-12)
    fitted = uniform_t(6, sigma_min=0.002, sigma_max=80.0)
    assert math.isclose(fitted[0].item(), 80.0, rel_tol=1e-10) and math.isclose(fitted[-2].item(), 0.002, rel_tol=1e-8)
    t_fitted = vp_t(fitted[:-1])
    assert torch.allclose(torch.diff(t_fitted), torch.diff(t_fitted)[0].expand(5), rtol=1e-8)
    assert (fitted[1:] < fitted[:-1]).all()


@pytest.mark.parametrize("call", [
    lambda: karras(0), lambda: karras(3, sigma_min=1.0, sigma_max=0.5), lambda: karras(3, rho=0.0),
    lambda: logsnr(2.5), lambda: polyexponential(3, sigma_min=-1.0), lambda: uniform_t(3, sigma_min=200.0),
    lambda: uniform_t(3, eps_s=0.0), lambda: karras(3, sigma_max="80")])
def test_bad_schedule_arguments_are_value_errors(call):
    with pytest.raises(ValueError, match="schedule"):
        call()


def test_explicit_and_from_file(tmp_path):
    assert torch.equal(explicit([3.0, 1.0, 0.5]), torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(explicit(torch.tensor([3.0, 0.0])), torch.tensor([3.0, 0.0], dtype=torch.float64))
    for bad in ([1.0, 2.0], [1.0, -0.5], [2.0, float("nan")], [0.0], [], [[1.0]]):
        with pytest.raises(ValueError, match="explicit schedule"):
            explicit(bad)
    sigmas = karras(9)
    text = tmp_path / "sigmas.txt"
    text.write_text("# a karras grid\n" + "\n".join(repr(s) for s in sigmas[:-1].tolist()) + "\n")
    assert torch.equal(from_file(text), sigmas)
    as_json = tmp_path / "sigmas.json"
    as_json.write_text(json.dumps(sigmas.tolist()))
    assert torch.equal(from_file(as_json), sigmas)
    (tmp_path / "comma.txt").write_text("14.6, 2.0,0.5")
    assert from_file(tmp_path / "comma.txt").tolist() == [14.6, 2.0, 0.5, 0.0]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        from_file(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("3.0 two 0")
    with pytest.raises(ValueError, match="bad.txt.*'two'"):
        from_file(tmp_path / "bad.txt")
    (tmp_path / "up.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="up.txt.*decreasing"):
        from_file(tmp_path / "up.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        from_file(tmp_path / "bad.json")


def test_registries_have_one_line_docstrings():
    for registry in (SOLVERS, SCHEDULES):
        for name, entry in registry.items():
            first_line = (entry.__doc__ or "").strip().splitlines()[0]
            assert first_line and len(first_line) < 120, name
    assert {"euler", "heun"} <= set(SOLVERS) and solvers.get_solver("heun") is sample_heun
