"""Linear multistep (Adams-Bashforth) samplers: LMS, iPNDM and DEIS tAB, one denoiser evaluation per step.

All three integrate the probability-flow ODE dx/dsigma = d(sigma), d = (x - D(x, sigma)) / sigma (= eps_hat),
from the derivatives at the last k levels, newest first:  x_{i+1} = x_i + sum_{j<k} w_{ij} d_{i-j},
with k = min(i + 1, order) (a lower-order warm-up: the first step is Euler). They differ in the weights:

- LMS (k-diffusion `sample_lms`; = DEIS rhoAB, fact sheet A.7): variable-step Adams-Bashforth in sigma,
  w_{ij} = int_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau with l_j the Lagrange basis on sigma_i, ..., sigma_{i-k+1}.
  Computed once per call on the host with a 4-point Gauss-Legendre rule (exact for these polynomials of
  degree <= 3), where k-diffusion calls scipy quad per step. Order `order`; measured 3.7-3.8 for order 4.
- iPNDM (Zhang & Chen 2023, DEIS repo `get_sampler_ipndm`; A.8): the fixed equal-step AB weights
  w_{ij} = (sigma_{i+1} - sigma_i) beta_j, beta = [1], [3, -1]/2, [23, -16, 5]/12, [55, -59, 37, -9]/24.
  Order 4 on grids uniform in sigma, but only about 2 on Karras or log-uniform grids (the weights assume
  equal steps; the fact sheet measured 2.0 for orders 2-4), which is what tests/test_solvers_multistep.py asserts.
- DEIS tAB-k (Zhang & Chen 2023, A.9): eps interpolated in VP time t = vp_t(sigma) (linear beta, beta_min 0.1,
  beta_d 19.9) instead of sigma: w_{ij} = int_{t_i}^{t_{i+1}} sigma'(tau) l_j(tau) dtau, with
  sigma'(t) = (beta_min + beta_d t)(sigma + 1 / sigma) / 2. sigma'(t) ~ t^(-1/2) at t = 0, so the integral is
  taken in u = sqrt(t), where it is smooth, by composite Gauss-Legendre (8 panels x 16 points; relative
  error ~1e-15 even on the single interval 80 -> 0.002). Order k; measured 2.9 for tAB3.

The step to sigma = 0 integrates the interpolating polynomial down to 0 (k-diffusion, DEIS): d is only ever
evaluated at sigma > 0, so nothing is undefined there. NFE: n steps cost n evaluations, for every order.
"""
import math
import numbers
from collections import deque

import numpy as np
import torch

from models.noise import VP_BETA_D, VP_BETA_MIN, vp_sigma, vp_t

from .common import call_denoiser, check_cond, one_nfe_per_step, check_sigmas, check_state, run_sampler, step_level

MAX_ORDER = 4
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(4)  # exact up to degree 7
_GAUSS_NODES_16, _GAUSS_WEIGHTS_16 = np.polynomial.legendre.leggauss(16)
_DEIS_PANELS = 8
_ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _lagrange_basis(nodes, points):
    """l_j(points) for every node j: an array [len(nodes), len(points)]."""
    basis = np.ones((len(nodes), len(points)))
    for j, node in enumerate(nodes):
        for m, other in enumerate(nodes):
            if m != j:
                basis[j] *= (points - other) / (node - other)
    return basis


def lms_weights(sigmas, sigma_next):
    """Adams weights in sigma: int_{sigmas[0]}^{sigma_next} l_j(tau) dtau for the levels `sigmas`, newest first."""
    start = sigmas[0]
    half = (sigma_next - start) / 2
    tau = start + half * (1 + _GAUSS_NODES)
    return (half * _lagrange_basis(sigmas, tau) @ _GAUSS_WEIGHTS).tolist()


def ipndm_weights(sigmas, sigma_next):
    """iPNDM's fixed weights (sigma_next - sigma) beta for len(sigmas) = k past levels (only their count matters)."""
    return [(sigma_next - sigmas[0]) * beta for beta in _ADAMS_BASHFORTH[len(sigmas) - 1]]


def deis_weights(sigmas, sigma_next):
    """DEIS tAB weights: int_{t_i}^{t_next} sigma'(tau) l_j(tau) dtau, Lagrange basis on t = vp_t(sigmas)."""
    t_nodes = vp_t(torch.tensor(sigmas, dtype=torch.float64)).numpy()
    u_start, u_end = float(np.sqrt(t_nodes[0])), float(np.sqrt(vp_t(float(sigma_next)).item()))
    edges = np.linspace(u_start, u_end, _DEIS_PANELS + 1)
    half = (edges[1:] - edges[:-1]) / 2
    u = ((edges[:-1] + edges[1:]) / 2)[:, None] + half[:, None] * _GAUSS_NODES_16  # [panels, 16]
    t = u * u
    sigma = vp_sigma(torch.from_numpy(t)).numpy()
    # sigma'(t) dt/du = (beta_min + beta_d t)(sigma + 1/sigma)/2 * 2u; u / sigma stays finite as u -> 0
    integrand = (VP_BETA_MIN + VP_BETA_D * t) * (sigma * sigma + 1) * (u / sigma)
    quadrature = (half[:, None] * _GAUSS_WEIGHTS_16 * integrand).ravel()
    return (_lagrange_basis(t_nodes, t.ravel()) @ quadrature).tolist()


def adams_update(x, ds, weights):
    """x + sum_j weights[j] * ds[j] (ds newest first; only the first len(weights) are used), one allocation."""
    terms = zip(weights, ds)
    weight, d = next(terms)
    x_next = x.add(d, alpha=weight)
    for weight, d in terms:
        x_next.add_(d, alpha=weight)
    return x_next


_WEIGHTS = {"lms": lms_weights, "ipndm": ipndm_weights, "deis": deis_weights}


def check_order(order, solver):
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"{solver}: order must be an integer from 1 to {MAX_ORDER}, got {order!r}")
    return int(order)


def weight_table(method, levels, order):
    """The weights of every step of a schedule (python floats, levels ending in 0), computed once per call."""
    table = []
    for i in range(len(levels) - 1):
        k = min(i + 1, order)
        table.append(_WEIGHTS[method](levels[i::-1][:k], levels[i + 1]))
    return table


def check_level(value, what, solver):
    """A one-step helper's level as a python float (one level for the whole batch)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # a host sync; multistep weights are host-side numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{solver}: {what} must be a finite number >= 0 (one level for the batch), got {value!r}")
    return float(value)


def _adams_step(method, denoiser, x, sigma, sigma_next, history, order, cond):
    solver = f"{method}_step"
    check_state(x, solver)
    cond = check_cond(cond, solver)
    order = check_order(order, solver)
    sigma, sigma_next = check_level(sigma, "sigma", solver), check_level(sigma_next, "sigma_next", solver)
    if sigma == 0:
        raise ValueError(f"{solver}: sigma must be > 0 (the ODE's d = (x - D) / sigma is undefined at 0)")
    history = [] if history is None else history
    if not isinstance(history, list) or any(not (isinstance(h, tuple) and len(h) == 2) for h in history):
        raise ValueError(f"{solver}: history must be a list of (sigma, d) pairs from earlier steps, or None")
    if any(level <= sigma for level, _ in history):
        raise ValueError(f"{solver}: history levels must all be above sigma = {sigma} (earlier steps)")
    _, sigma_batch = step_level(sigma, x, solver)
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    history.append((sigma, (x - x0_hat) / sigma))
    del history[:-order]
    levels = [level for level, _ in reversed(history)]
    ds = [d for _, d in reversed(history)]
    return adams_update(x, ds, _WEIGHTS[method](levels, sigma_next)), x0_hat


def _sample_adams(method, denoiser, x, sigmas, cond, callback, return_trajectory, order):
    cond = check_cond(cond, method)
    order = check_order(order, method)
    check_state(x, method)
    table = weight_table(method, check_sigmas(sigmas, method), order)
    ds = deque(maxlen=order)  # d at the last `order` levels, newest first

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, method)
        ds.appendleft((x - x0_hat) / sigma)
        return adams_update(x, ds, table[i]), x0_hat

    return run_sampler(method, step, x, sigmas, callback, return_trajectory)


def lms_step(denoiser, x, sigma, sigma_next, history=None, order=4, cond=None):
    """One LMS step from sigma to sigma_next -> (x_next, x0_hat at sigma); Euler when history is empty.

    history: a list of (sigma, d) from earlier steps, oldest first, or None. The step appends its own
    (sigma, d) and keeps the last `order`; pass the same list to the next call to continue a trajectory.
    Levels are numbers (a 1-element tensor costs one host sync).
    """
    return _adams_step("lms", denoiser, x, sigma, sigma_next, history, order, cond)


def ipndm_step(denoiser, x, sigma, sigma_next, history=None, order=4, cond=None):
    """One iPNDM step -> (x_next, x0_hat at sigma); history as in lms_step."""
    return _adams_step("ipndm", denoiser, x, sigma, sigma_next, history, order, cond)


def deis_step(denoiser, x, sigma, sigma_next, history=None, order=3, cond=None):
    """One DEIS tAB step -> (x_next, x0_hat at sigma); history as in lms_step."""
    return _adams_step("deis", denoiser, x, sigma, sigma_next, history, order, cond)


def sample_lms(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=4):
    """Linear multistep (variable-step Adams-Bashforth in sigma, k-diffusion LMS), order 1-4, 1 NFE per step.

    x = sigmas[0] * z; sigmas strictly decreasing, ending in 0. The first steps use orders 1, 2, ... up to
    `order`. Returns x0, or (x0, trajectory) with return_trajectory; callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step, x and x0_hat taken at sigma.
    """
    return _sample_adams("lms", denoiser, x, sigmas, cond, callback, return_trajectory, order)


def sample_ipndm(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=4):
    """iPNDM (fixed Adams-Bashforth weights, lower-order warm-up), order 1-4, 1 NFE per step.

    Exact order only on grids uniform in sigma; about second order on Karras / log-uniform grids.
    Arguments and returns as sample_lms.
    """
    return _sample_adams("ipndm", denoiser, x, sigmas, cond, callback, return_trajectory, order)


def sample_deis(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=3):
    """DEIS tAB-k (eps interpolated in VP time t), order 1-4 (default 3), 1 NFE per step.

    Arguments and returns as sample_lms.
    """
    return _sample_adams("deis", denoiser, x, sigmas, cond, callback, return_trajectory, order)


one_nfe_per_step(sample_lms, "lms")
one_nfe_per_step(sample_ipndm, "ipndm")
one_nfe_per_step(sample_deis, "deis")
