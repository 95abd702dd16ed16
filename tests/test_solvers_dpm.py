"""DPM-Solver-1/2/3 and DPM-Solver++ (2S, 2M, 3M, 2M SDE), checked against the exact flow of a Gaussian N(mu, v I)."""
import math

import pytest
import torch

from solvers import sample_euler, sample_heun
from solvers.dpm_solver import (dpm_solver_step, fast_orders, sample_dpm_solver_1, sample_dpm_solver_2,
                                sample_dpm_solver_3)
from solvers.dpmpp import (dpmpp_2m_sde_step, dpmpp_2m_step, dpmpp_2s_step, dpmpp_3m_step, sample_dpmpp_2m,
                           sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m)
from solvers.schedules import karras, logsnr
from tests.gaussian import V, convergence_slope, exact_flow, gaussian_denoiser, problem

SAMPLERS = {
    "dpm_solver_1": sample_dpm_solver_1, "dpm_solver_2": sample_dpm_solver_2, "dpm_solver_3": sample_dpm_solver_3,
    "dpmpp_2s": sample_dpmpp_2s, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def seeded(name, seed=0):
    """Options that make a sampler reproducible: a fresh generator for the stochastic one."""
    return {"generator": torch.Generator().manual_seed(seed)} if name == "dpmpp_2m_sde" else {}


@pytest.mark.parametrize("name, options, grid, steps, order, tolerance", [
    ("dpm_solver_1", {}, karras, [16, 32, 64, 128, 256], 1.0, 0.15),
    ("dpm_solver_2", {}, karras, [16, 32, 64, 128, 256], 2.0, 0.2),
    ("dpm_solver_3", {}, logsnr, [32, 64, 128, 256], 3.0, 0.25),  # on karras the end error changes sign
    ("dpmpp_2s", {}, karras, [16, 32, 64, 128, 256], 2.0, 0.2),
    ("dpmpp_2m", {}, karras, [16, 32, 64, 128, 256], 2.0, 0.2),
    ("dpmpp_2m", {"solver_type": "heun"}, logsnr, [16, 32, 64, 128, 256], 2.0, 0.2),
    # the published 3M is second order (fact sheet A.6, measured 2.05 there); ~2.15 here, clearly not 3
    ("dpmpp_3m", {}, logsnr, [32, 64, 128, 256], 2.0, 0.3),
])
def test_convergence_order_on_gaussian(name, options, grid, steps, order, tolerance):
    mu, z = problem()
    denoiser, x = gaussian_denoiser(mu), 80.0 * z
    errors = []
    for n in steps:
        _, trajectory = SAMPLERS[name](denoiser, x, grid(n, 0.002, 80.0), return_trajectory=True, **options)
        errors.append((trajectory[-2] - exact_flow(x, mu, 80.0, 0.002)).abs().max().item())
    slope = convergence_slope(steps, errors)
    assert abs(slope + order) < tolerance, (name, slope, errors)


def test_fast_orders_allocation():
    assert fast_orders(10, 3) == [3, 3, 3, 1]
    assert fast_orders(9, 3) == [3, 3, 2, 1]  # NFE % 3 == 0: [3] * (K - 2) + [2, 1], K = 4
    assert fast_orders(8, 3) == [3, 3, 1, 1]  # the trailing 2 split: the last step goes to 0
    assert fast_orders(5, 2) == [2, 2, 1] and fast_orders(6, 2) == [2, 2, 1, 1]
    assert fast_orders(1, 3) == [1] and fast_orders(2, 3) == [1, 1] and fast_orders(4, 1) == [1] * 4
    for nfe in range(1, 30):
        for max_order in (1, 2, 3):
            orders = fast_orders(nfe, max_order)
            assert sum(orders) == nfe and orders[-1] == 1 and max(orders) <= max_order
    assert sample_dpm_solver_3.steps_for_nfe(10) == 4 and sample_dpm_solver_3.options_for_nfe(10) == {
        "orders": [3, 3, 3, 1]}
    assert sample_dpmpp_2m.steps_for_nfe(7) == 7 and sample_dpmpp_2m.options_for_nfe(7) == {}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_one_step_to_zero_returns_the_denoiser_output(name):
    mu, z = problem()
    denoiser, x = gaussian_denoiser(mu), 80.0 * z
    expected = denoiser(x, torch.full((x.shape[0],), 80.0, dtype=torch.float64))
    assert torch.equal(SAMPLERS[name](denoiser, x, torch.tensor([80.0, 0.0]), **seeded(name)), expected)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectory_callback_and_reproducibility(name):
    mu, z = problem(batch=3, dim=4)
    z = z.reshape(3, 2, 2)  # any trailing shape
    denoiser, sigmas = gaussian_denoiser(mu.reshape(2, 2)), karras(6)
    x, infos = sigmas[0] * z, []
    x0, trajectory = SAMPLERS[name](denoiser, x, sigmas, callback=infos.append, return_trajectory=True, **seeded(name))
    # the generic trajectory/callback contract is checked for every solver in test_solver_contract.py
    for info in infos:
        assert torch.equal(info["x"], trajectory[info["i"]])
        expected = denoiser(info["x"], torch.full((3,), info["sigma"], dtype=torch.float64))
        assert torch.equal(info["x0_hat"], expected)
    assert torch.equal(SAMPLERS[name](denoiser, x, sigmas, **seeded(name)), x0)


def test_first_order_everywhere_is_euler_and_r1_one_is_heun():
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), karras(7)
    x = 80.0 * z
    euler = sample_euler(denoiser, x, sigmas)
    assert torch.equal(sample_dpm_solver_1(denoiser, x, sigmas), euler)
    for sample in (sample_dpm_solver_2, sample_dpm_solver_3, sample_dpmpp_2s):
        assert torch.equal(sample(denoiser, x, sigmas, orders=[1] * 7), euler)
    assert torch.allclose(sample_dpm_solver_2(denoiser, x, sigmas, r1=1.0), sample_heun(denoiser, x, sigmas),
                          rtol=1e-12, atol=1e-12)
    # orders are honoured per step: an order-2 step in DPM-Solver-3 is DPM-Solver-2's midpoint step
    _, mixed = sample_dpm_solver_3(denoiser, x, sigmas, orders=[2, 3, 1, 1, 1, 1, 1], return_trajectory=True)
    assert torch.equal(mixed[1], dpm_solver_step(denoiser, x, sigmas[0].item(), sigmas[1].item(), order=2)[0])


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_with_zero_eta_is_2m_exactly_and_draws_no_noise(solver_type):
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), karras(9)
    generator = torch.Generator().manual_seed(3)
    sde = sample_dpmpp_2m_sde(denoiser, 80.0 * z, sigmas, eta=0.0, solver_type=solver_type, generator=generator)
    assert torch.equal(sde, sample_dpmpp_2m(denoiser, 80.0 * z, sigmas, solver_type=solver_type))
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())
    midpoint, heun = (sample_dpmpp_2m(denoiser, 80.0 * z, sigmas, solver_type=t) for t in ("midpoint", "heun"))
    assert not torch.allclose(midpoint, heun)


def test_3m_warm_up_is_first_order_then_taylor_2m():
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), karras(8)
    _, three = sample_dpmpp_3m(denoiser, 80.0 * z, sigmas, return_trajectory=True)
    _, two = sample_dpmpp_2m(denoiser, 80.0 * z, sigmas, solver_type="heun", return_trajectory=True)
    assert torch.allclose(three[:3], two[:3], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(three[3], two[3])


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta", [0.5, 1.5])
def test_sde_drift_is_second_order_for_the_exact_mean(solver_type, eta):
    # D is affine for a Gaussian, so the noiseless update is the SDE's mean, which solves
    # d(x - mu)/dlambda = (1 + eta)(D - x): x(s2) = mu + ((v + s2^2) / (v + s1^2))^((1 + eta) / 2) (x(s1) - mu)
    # (eta = 1 is no test: there even the first-order step is exact and D stays constant along the mean)
    mu, z = problem()
    x, steps, errors = 80.0 * z, [32, 64, 128, 256], []
    exact = mu + ((V + 0.002 ** 2) / (V + 80.0 ** 2)) ** ((1 + eta) / 2) * (x - mu)
    for n in steps:
        _, trajectory = sample_dpmpp_2m_sde(gaussian_denoiser(mu), x, logsnr(n), eta=eta, S_noise=0.0,
                                            solver_type=solver_type, return_trajectory=True)
        errors.append((trajectory[-2] - exact).abs().max().item())
    assert abs(convergence_slope(steps, errors) + 2) < 0.3, errors


def test_sde_samples_have_the_data_distribution_and_depend_on_the_seed():
    mu = torch.tensor([0.3, -1.0], dtype=torch.float64)
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoiser, sigmas = gaussian_denoiser(mu), karras(128)
    for eta in (1.0, 0.5):
        x0 = sample_dpmpp_2m_sde(denoiser, 80.0 * z, sigmas, eta=eta, generator=torch.Generator().manual_seed(1))
        assert (x0.mean(0) - mu).abs().max() < 4 * math.sqrt(V / len(z))
        assert ((x0.var(0) / V) - 1).abs().max() < 0.05, x0.var(0) / V
    a, b, c = (sample_dpmpp_2m_sde(denoiser, 80.0 * z[:8], karras(6), generator=torch.Generator().manual_seed(s))
               for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sample, step, options", [
    (sample_dpm_solver_2, dpm_solver_step, {"order": 2}), (sample_dpm_solver_3, dpm_solver_step, {"order": 3}),
    (sample_dpm_solver_2, dpm_solver_step, {"order": 2, "r1": 0.3}), (sample_dpmpp_2s, dpmpp_2s_step, {}),
    (sample_dpmpp_2s, dpmpp_2s_step, {"r1": 0.7})])
def test_singlestep_step_function_equals_one_step_of_the_sampler(sample, step, options):
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), torch.tensor([10.0, 3.0, 0.0], dtype=torch.float64)
    infos = []
    sample_options = {"r1": options["r1"]} if "r1" in options else {}
    _, trajectory = sample(denoiser, 10.0 * z, sigmas, callback=infos.append, return_trajectory=True, **sample_options)
    x1, x0_hat = step(denoiser, 10.0 * z, 10.0, 3.0, **options)
    assert torch.equal(x1, trajectory[1]) and torch.equal(x0_hat, infos[0]["x0_hat"])
    assert torch.equal(step(denoiser, x1, 3.0, 0.0, **options)[0], trajectory[2])


@pytest.mark.parametrize("sample, step, history_length, options", [
    (sample_dpmpp_2m, dpmpp_2m_step, 1, {}), (sample_dpmpp_2m, dpmpp_2m_step, 1, {"solver_type": "heun"}),
    (sample_dpmpp_3m, dpmpp_3m_step, 2, {}),
    (sample_dpmpp_2m_sde, dpmpp_2m_sde_step, 1, {"eta": 0.7, "solver_type": "heun"})])
def test_multistep_step_function_replays_the_sampler(sample, step, history_length, options):
    mu, z = problem()
    denoiser, sigmas = gaussian_denoiser(mu), karras(6, sigma_max=10.0)
    stochastic = sample is sample_dpmpp_2m_sde
    seed = {"generator": torch.Generator().manual_seed(2)} if stochastic else {}
    _, trajectory = sample(denoiser, 10.0 * z, sigmas, return_trajectory=True, **options, **seed)
    seed = {"generator": torch.Generator().manual_seed(2)} if stochastic else {}
    x, history, levels = 10.0 * z, [], sigmas.tolist()
    for i in range(len(levels) - 1):
        x, x0_hat = step(denoiser, x, levels[i], levels[i + 1], history=history, **options, **seed)
        assert torch.equal(x, trajectory[i + 1]), i
        history = [(levels[i], x0_hat)] + history[:history_length - 1]


ALL_STEPS = [(dpm_solver_step, {"order": 1}), (dpm_solver_step, {"order": 2}), (dpm_solver_step, {"order": 3}),
             (dpmpp_2s_step, {}), (dpmpp_2m_step, {}), (dpmpp_2m_step, {"solver_type": "heun"}), (dpmpp_3m_step, {}),
             (dpmpp_2m_sde_step, {"eta": 0.5, "S_noise": 0.0})]


def _history(step, levels, x):
    """A made-up history of earlier levels (2x and 3x sigma) and denoiser outputs for the multistep helpers."""
    depth = {dpmpp_3m_step: 2, dpmpp_2m_step: 1, dpmpp_2m_sde_step: 1}.get(step, 0)
    return [(levels * (k + 2), torch.sin(x * (k + 1))) for k in range(depth)]


@pytest.mark.parametrize("step, options", ALL_STEPS)
def test_step_with_per_sample_levels_matches_float_levels(step, options):
    mu, z = problem()
    denoiser, x = gaussian_denoiser(mu), 5.0 * z
    levels = torch.tensor([10.0, 3.0, 7.0, 1.0, 3.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    levels_next = torch.tensor([3.0, 0.0, 1.0, 0.0, 0.5, 0.1, 1.5, 3.0], dtype=torch.float64)
    extra = {"history": _history(step, levels, x)} if step not in (dpm_solver_step, dpmpp_2s_step) else {}
    batched = step(denoiser, x, levels, levels_next, **extra, **options)[0]
    for b in range(len(levels)):
        single_extra = {"history": [(s[b].item(), d[b:b + 1]) for s, d in extra["history"]]} if extra else {}
        single = step(denoiser, x[b:b + 1], levels[b].item(), levels_next[b].item(), **single_extra, **options)[0]
        assert torch.allclose(batched[b:b + 1], single, rtol=1e-12, atol=1e-12), b
    as_0dim = step(denoiser, x, torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.5), **options,
                   **({"history": [(s[0].item(), d) for s, d in extra["history"]]} if extra else {}))[0]
    as_float = step(denoiser, x, 3.0, 0.5, **options,
                    **({"history": [(s[0].item(), d) for s, d in extra["history"]]} if extra else {}))[0]
    assert torch.allclose(as_0dim, as_float, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step, options", ALL_STEPS)
def test_step_gradients_are_finite_with_a_per_sample_step_to_zero(step, options):
    mu, z = problem(batch=2, dim=3)
    x = (5.0 * z).requires_grad_()
    levels = torch.tensor([5.0, 5.0], dtype=torch.float64)
    extra = {"history": _history(step, levels, x.detach())} if step not in (dpm_solver_step, dpmpp_2s_step) else {}
    x_next, _ = step(gaussian_denoiser(mu), x, levels, torch.tensor([1.0, 0.0]), **extra, **options)
    x_next.sum().backward()
    assert torch.isfinite(x_next).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("call, name, text", [
    (lambda d, z: sample_dpm_solver_3(d, z, karras(3), orders=[3, 3]), "dpm_solver_3", "one integer"),
    (lambda d, z: sample_dpm_solver_2(d, z, karras(3), orders=[3, 2, 1]), "dpm_solver_2", "1..2"),
    (lambda d, z: sample_dpm_solver_3(d, z, karras(3), orders=[3, 3, 3]), "dpm_solver_3", "first order"),
    (lambda d, z: sample_dpmpp_2s(d, z, karras(2), orders=[2.0, 1]), "dpmpp_2s", "one integer"),
    (lambda d, z: sample_dpmpp_2s(d, z, karras(2), orders=5), "dpmpp_2s", "list"),
    (lambda d, z: sample_dpm_solver_2(d, z, karras(3), r1=0.0), "dpm_solver_2", "r1"),
    (lambda d, z: sample_dpmpp_2s(d, z, karras(3), r1=True), "dpmpp_2s", "r1"),
    (lambda d, z: sample_dpmpp_2m(d, z, karras(3), solver_type="taylor"), "dpmpp_2m", "midpoint, heun"),
    (lambda d, z: sample_dpmpp_2m_sde(d, z, karras(3), eta=-1.0), "dpmpp_2m_sde", "eta"),
    (lambda d, z: sample_dpmpp_2m_sde(d, z, karras(3), S_noise=float("nan")), "dpmpp_2m_sde", "S_noise"),
    (lambda d, z: sample_dpmpp_2m_sde(d, z, karras(3), generator=3), "dpmpp_2m_sde", "generator"),
    (lambda d, z: sample_dpmpp_3m(d, z, torch.tensor([3.0, 3.0, 0.0])), "dpmpp_3m", "decreasing"),
    (lambda d, z: sample_dpm_solver_3(d, z, torch.tensor([3.0, 1.0])), "dpm_solver_3", "end in 0"),
    (lambda d, z: sample_dpmpp_2s(lambda x, s: x[:, :4], z, karras(3)), "dpmpp_2s", "shape"),
    (lambda d, z: sample_dpmpp_2m(lambda x, s: x * float("nan"), z, karras(3)), "dpmpp_2m", "non-finite"),
    (lambda d, z: dpm_solver_step(d, z, 1.0, 0.5, order=4), "dpm_solver_step", "order"),
    (lambda d, z: dpm_solver_step(d, z, 0.0, 0.5), "dpm_solver_step", "sigma must be > 0"),
    (lambda d, z: dpmpp_2m_step(d, z, 1.0, 0.5, history=[(2.0, z[:, :2])]), "dpmpp_2m_step", "history"),
    (lambda d, z: dpmpp_3m_step(d, z, 1.0, 0.5, history=[(2.0, z)] * 3), "dpmpp_3m_step", "at most 2"),
    (lambda d, z: dpmpp_2m_sde_step(d, z, 1.0, 0.5, history=[3.0]), "dpmpp_2m_sde_step", "pairs"),
])
def test_bad_input_is_a_value_error_naming_the_solver(call, name, text):
    mu, z = problem()
    with pytest.raises(ValueError, match=f"{name}.*{text}"):
        call(gaussian_denoiser(mu), z)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("nfe", [0, -1, 2.0, True])
def test_bad_nfe_is_a_value_error_naming_the_solver(name, nfe):
    for companion in (SAMPLERS[name].steps_for_nfe, SAMPLERS[name].options_for_nfe):
        with pytest.raises(ValueError, match=name):
            companion(nfe)


def test_docstrings_have_a_short_first_line():
    for name, sample in SAMPLERS.items():
        first_line = (sample.__doc__ or "").strip().splitlines()[0]
        assert first_line and len(first_line) < 120, name
