"""Multistep samplers (LMS, iPNDM, DEIS tAB, UniPC bh1/bh2) against the exact probability-flow ODE of a Gaussian."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from solvers import sigmas_for_nfe
from solvers.common import CountingDenoiser
from solvers.euler import euler_step
from solvers.multistep import (deis_step, deis_weights, ipndm_step, ipndm_weights, lms_step, lms_weights,
                               sample_deis, sample_ipndm, sample_lms)
from solvers.schedules import explicit, karras
from solvers.unipc import sample_unipc, sample_unipc_bh1, sample_unipc_bh2, step_orders, unipc_step
from tests.gaussian import convergence_slope, exact_flow, gaussian_denoiser, problem

SAMPLERS = {"lms": sample_lms, "ipndm": sample_ipndm, "deis": sample_deis, "unipc_bh1": sample_unipc_bh1,
            "unipc_bh2": sample_unipc_bh2}
BETA_MIN, BETA_D = 0.1, 19.9


def vp_t_of(sigma):
    return (math.sqrt(BETA_MIN ** 2 + 2 * BETA_D * math.log1p(sigma ** 2)) - BETA_MIN) / BETA_D


def sigma_dot(t):
    """d sigma / dt of the linear-beta VP process, written out independently of the code under test."""
    sigma = math.sqrt(math.expm1(0.5 * BETA_D * t * t + BETA_MIN * t))
    return 0.5 * (BETA_MIN + BETA_D * t) * (sigma + 1 / sigma)


def sigma_dot_sqrt_t(t):
    """sigma'(t) sqrt(t), smooth down to t = 0 (where sqrt(t) / sigma -> 1 / sqrt(beta_min))."""
    growth = math.expm1(0.5 * BETA_D * t * t + BETA_MIN * t)
    sqrt_t_over_sigma = math.sqrt(t / growth) if t > 0 else 1 / math.sqrt(BETA_MIN)
    return 0.5 * (BETA_MIN + BETA_D * t) * (math.sqrt(growth * t) + sqrt_t_over_sigma)


def lagrange(nodes, j, t):
    return math.prod((t - other) / (nodes[j] - other) for m, other in enumerate(nodes) if m != j)


# measured slopes over 32..256 Karras steps (float64, error at the last nonzero sigma) in the comments
@pytest.mark.parametrize("sample, options, order, tolerance", [
    (sample_lms, {"order": 2}, 2.0, 0.15),      # 1.93
    (sample_lms, {"order": 3}, 3.0, 0.25),      # 2.84
    (sample_lms, {}, 4.0, 0.35),                # 3.71 (fact sheet: 3.7-3.8)
    (sample_ipndm, {}, 2.0, 0.2),               # 2.09: equal-step weights give ~2 on Karras (fact sheet A.8)
    (sample_ipndm, {"order": 3}, 2.0, 0.2),     # 2.01
    (sample_deis, {"order": 2}, 2.0, 0.15),     # 1.94
    (sample_deis, {}, 3.0, 0.2),                # 2.90 (fact sheet: tAB3 2.9)
    (sample_deis, {"order": 4}, 4.0, 0.25),     # 3.87
    (sample_unipc_bh1, {"order": 1}, 2.0, 0.2),  # 2.11: UniC raises p = 1 to order 2
    (sample_unipc_bh2, {"order": 1}, 2.0, 0.2),  # 2.00
    (sample_unipc_bh1, {}, 3.0, 0.25),          # 3.15
    (sample_unipc_bh2, {}, 3.0, 0.2),           # 3.06
    (sample_unipc_bh2, {"order": 3}, 4.0, 0.2),  # 4.04
    (sample_unipc_bh2, {"corrector": False}, 2.0, 0.2),  # 2.09: UniP-2 alone
])
def test_convergence_order_on_gaussian(sample, options, order, tolerance):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    steps, errors = [32, 64, 128, 256], []
    for n in steps:
        x = 80.0 * z
        _, trajectory = sample(denoiser, x, karras(n), return_trajectory=True, **options)
        errors.append((trajectory[-2] - exact_flow(x, mu, 80.0, 0.002)).abs().max().item())
    assert min(errors) > 1e-9  # far above float64 round-off
    slope = convergence_slope(steps, errors)
    assert abs(slope + order) < tolerance, (sample.__name__, options, slope, errors)


def test_lms_weights_integrate_polynomials_exactly_on_uneven_steps():
    nodes = [0.7, 1.3, 2.9, 3.4]  # newest first
    rng = np.random.default_rng(0)
    for k in range(1, 5):
        for sigma_next in (0.2, 0.0):
            polynomial = np.poly1d(rng.standard_normal(k))  # degree k - 1
            weights = lms_weights(nodes[:k], sigma_next)
            exact = polynomial.integ()(sigma_next) - polynomial.integ()(nodes[0])
            assert math.isclose(sum(w * polynomial(s) for w, s in zip(weights, nodes)), exact, rel_tol=1e-12)


def test_lms_reduces_to_ipndm_on_equal_steps():
    for k in range(1, 5):
        nodes = [2.0 + 0.5 * j for j in range(k)]
        assert np.allclose(lms_weights(nodes, 1.5), ipndm_weights(nodes, 1.5), rtol=1e-13, atol=1e-15)
    mu, z = problem()
    sigmas = explicit(torch.linspace(2.0, 0.5, 9, dtype=torch.float64))
    _, lms = sample_lms(gaussian_denoiser(mu), 2.0 * z, sigmas, return_trajectory=True)
    _, ipndm = sample_ipndm(gaussian_denoiser(mu), 2.0 * z, sigmas, return_trajectory=True)
    assert torch.allclose(lms[:-1], ipndm[:-1], rtol=1e-12, atol=1e-12)  # the last step to 0 is shorter


def test_deis_weights_match_adaptive_quadrature():
    sigmas = [3.0, 5.0, 9.0, 20.0]  # newest first
    t_nodes = [vp_t_of(s) for s in sigmas]
    t_start, t_end = t_nodes[0], vp_t_of(1.2)
    for k in range(1, 5):
        weights = deis_weights(sigmas[:k], 1.2)
        for j in range(k):
            reference = integrate.quad(lambda t: sigma_dot(t) * lagrange(t_nodes[:k], j, t), t_start, t_end,
                                       epsabs=0, epsrel=1e-13)[0]
            assert math.isclose(weights[j], reference, rel_tol=1e-11), (k, j)
    # to sigma = 0 (t = 0), where sigma'(t) ~ t^(-1/2): the weights still sum to -sigma and match quad's
    # algebraic-singularity rule; a single long interval 80 -> 0.002 is integrated as accurately
    weights = deis_weights(sigmas, 0.0)
    assert math.isclose(sum(weights), -3.0, rel_tol=1e-12)
    for j in range(4):
        reference = -integrate.quad(lambda t: sigma_dot_sqrt_t(t) * lagrange(t_nodes, j, t), 0, t_start,
                                    weight="alg", wvar=(-0.5, 0.0), epsabs=0, epsrel=1e-13)[0]
        assert math.isclose(weights[j], reference, rel_tol=1e-10, abs_tol=1e-12), j
    assert math.isclose(deis_weights([80.0], 0.002)[0], 0.002 - 80.0, rel_tol=1e-13)


@pytest.mark.parametrize("name", ["lms", "ipndm", "deis"])
def test_adams_warm_up_starts_with_euler_then_order_two(name):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    sigmas = karras(6, sigma_max=20.0)
    s0, s1, s2 = sigmas[:3].tolist()
    x0 = 20.0 * z
    _, trajectory = SAMPLERS[name](denoiser, x0, sigmas, return_trajectory=True)
    assert torch.allclose(trajectory[1], euler_step(denoiser, x0, s0, s1)[0], rtol=1e-13, atol=1e-13)
    x1 = trajectory[1]
    d0 = (x0 - denoiser(x0, torch.full((8,), s0, dtype=torch.float64))) / s0
    d1 = (x1 - denoiser(x1, torch.full((8,), s1, dtype=torch.float64))) / s1
    h1, h2 = s1 - s0, s2 - s1
    if name == "lms":  # variable-step Adams-Bashforth 2
        expected = x1 + h2 * d1 + h2 ** 2 / (2 * h1) * (d1 - d0)
    elif name == "ipndm":
        expected = x1 + h2 * (3 * d1 - d0) / 2
    else:  # eps linear in VP time t
        t = [vp_t_of(s1), vp_t_of(s0)]
        w1, w0 = (integrate.quad(lambda u: sigma_dot(u) * lagrange(t, j, u), t[0], vp_t_of(s2), epsrel=1e-13)[0]
                  for j in (0, 1))
        expected = x1 + w1 * d1 + w0 * d0
    assert torch.allclose(trajectory[2], expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_first_two_steps_follow_the_formulas(variant):
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    inputs = []

    def recording(x, sigma):
        inputs.append(x.clone())
        return denoiser(x, sigma)

    sigmas = karras(5, sigma_max=20.0)
    s0, s1, s2 = sigmas[:3].tolist()
    x0 = 20.0 * z
    _, trajectory = sample_unipc(recording, x0, sigmas, variant=variant, return_trajectory=True)
    assert len(inputs) == 5
    m = [denoiser(inputs[i], torch.full((8,), s, dtype=torch.float64)) for i, s in enumerate((s0, s1, s2))]

    def B(h):
        return -h if variant == "bh1" else math.expm1(-h)

    # step 1: UniP-1 is the Euler step; D is then evaluated at that predicted point, and UniC-1 (c = 1/2) corrects
    h = math.log(s0 / s1)
    x_pred = euler_step(denoiser, x0, s0, s1)[0]
    assert torch.allclose(inputs[1], x_pred, rtol=1e-13, atol=1e-13)
    x_tilde = (s1 / s0) * x0 - math.expm1(-h) * m[0]
    assert torch.allclose(trajectory[1], x_tilde - B(h) * 0.5 * (m[1] - m[0]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(trajectory[1], x_pred)  # the state continues from the corrected point
    # step 2: UniP-2 (a = 1/2) from m1 (taken at the predicted point) and m0, then UniC-2 by Cramer's rule
    h_prev, h = h, math.log(s1 / s2)
    r = -h_prev / h
    D1 = (m[0] - m[1]) / r
    x_tilde = (s2 / s1) * trajectory[1] - math.expm1(-h) * m[1]
    assert torch.allclose(inputs[2], x_tilde - B(h) * 0.5 * D1, rtol=1e-12, atol=1e-12)
    g1 = math.expm1(-h) / -h - 1
    g2 = g1 / -h - 0.5
    b1, b2 = g1 / B(h), 2 * g2 / B(h)
    c1, c2 = (b1 - b2) / (1 - r), (b2 - r * b1) / (1 - r)
    assert torch.allclose(trajectory[2], x_tilde - B(h) * (c1 * D1 + c2 * (m[2] - m[1])), rtol=1e-12, atol=1e-12)


def test_unipc_step_orders_warm_up_and_lower_order_final():
    assert step_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert step_orders(6, 3, lower_order_final=False) == [1, 2, 3, 3, 3, 1]
    assert step_orders(2, 3) == [1, 1] and step_orders(1, 2) == [1]


@pytest.mark.parametrize("sample, step, options", [
    (sample_lms, lms_step, {}), (sample_ipndm, ipndm_step, {"order": 3}), (sample_deis, deis_step, {}),
    (sample_unipc, unipc_step, {"variant": "bh1"}), (sample_unipc, unipc_step, {"order": 3})])
def test_step_function_with_history_continues_the_sampler(sample, step, options):
    mu, z = problem()
    sigmas = karras(6, sigma_max=20.0)
    infos = []
    _, trajectory = sample(gaussian_denoiser(mu), 20.0 * z, sigmas, callback=infos.append, return_trajectory=True,
                           **options)
    counter = CountingDenoiser(gaussian_denoiser(mu))
    levels, history, x = sigmas.tolist(), [], 20.0 * z
    orders = step_orders(6, options.get("order", 2))
    for i in range(6):
        step_options = dict(options, order=orders[i]) if step is unipc_step else options
        x, x0_hat = step(counter, x, levels[i], levels[i + 1], history=history, **step_options)
        assert torch.equal(x, trajectory[i + 1]) and torch.equal(x0_hat, infos[i]["x0_hat"]), i
    assert counter.nfe == 6


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_trajectory_callback_and_a_single_step_to_zero(name):
    sample = SAMPLERS[name]
    mu, z = problem(batch=3, dim=4)
    denoiser = gaussian_denoiser(mu.reshape(2, 2))
    sigmas = karras(6)
    x = sigmas[0] * z.reshape(3, 2, 2)
    infos = []
    x0, trajectory = sample(denoiser, x, sigmas, callback=infos.append, return_trajectory=True)
    # the generic trajectory/callback contract is checked for every solver in test_solver_contract.py
    for info in infos:
        assert torch.equal(info["x"], trajectory[info["i"]]) and info["x0_hat"].shape == x.shape
    assert torch.equal(sample(denoiser, x, sigmas), x0)
    one_step = sample(denoiser, x, torch.tensor([80.0, 0.0]))
    assert torch.allclose(one_step, denoiser(x, torch.full((3,), 80.0, dtype=torch.float64)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["lms", "unipc_bh2"])
def test_gradients_flow_through_the_sampler(name):
    mu, z = problem(batch=2, dim=3)
    x = (5.0 * z).requires_grad_()
    SAMPLERS[name](gaussian_denoiser(mu), x, karras(4, sigma_max=5.0)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_input_is_a_value_error_naming_the_solver(name):
    sample = SAMPLERS[name]
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    for order in (0, 5, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"{name}.*order"):
            sample(denoiser, 80.0 * z, karras(3), order=order)
    for nfe in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=name):
            sigmas_for_nfe(sample, nfe)
    with pytest.raises(ValueError, match=f"{name}.*end in 0"):
        sample(denoiser, z, torch.tensor([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=rf"{name}.*\[8, 4\].*\[8, 5\]"):
        sample(lambda x, s: x[:, :4], z, karras(3))
    with pytest.raises(ValueError, match=f"{name}.*non-finite"):
        sample(lambda x, s: x * float("nan"), z, karras(3))


def test_bad_unipc_options_and_step_arguments():
    mu, z = problem()
    denoiser = gaussian_denoiser(mu)
    with pytest.raises(ValueError, match="unipc.*variant.*bh1, bh2"):
        sample_unipc(denoiser, z, karras(3), variant="bh3")
    with pytest.raises(ValueError, match="unipc_bh2.*lower_order_final"):
        sample_unipc_bh2(denoiser, z, karras(3), lower_order_final="yes")
    for step in (lms_step, ipndm_step, deis_step, unipc_step):
        solver = step.__name__
        with pytest.raises(ValueError, match=f"{solver}.*sigma"):
            step(denoiser, z, 0.0, 0.0)
        with pytest.raises(ValueError, match=f"{solver}.*one level"):
            step(denoiser, z, torch.full((8,), 2.0), 1.0)
        with pytest.raises(ValueError, match=f"{solver}.*history"):
            step(denoiser, z, 2.0, 1.0, history={})
        with pytest.raises(ValueError, match=f"{solver}.*history levels"):
            step(denoiser, z, 2.0, 1.0, history=[(1.5, z)])
