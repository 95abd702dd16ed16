"""DPM-Solver++ in data (x0) form, VE sigma space (Lu et al. 2022b, "DPM-Solver++", Algorithms 1-2 and App. B):
singlestep 2S, multistep 2M and 3M, and the stochastic DPM-Solver++(2M) SDE (k-diffusion `sample_dpmpp_2m_sde`).

With h = ln(sigma_s / sigma_t), the exact solution is x_t = e^-h x_s + int_0^h e^-(h - tau) D(lambda_s + tau) dtau
(e^-h = sigma_t / sigma_s); expanding D gives the coefficients 1 - e^-h (of D), h phi_2 (of D') and -h^2 phi_3
(of D''), with phi_2 = (e^-h - 1) / h + 1 and phi_3 = phi_2 / h - 1/2. Every update below is written as
x_t = D~ + (sigma_t / sigma_s)(x_s - D~) [+ corrections], so that the first-order step to sigma = 0 gives D.

- 2S (singlestep, 2 NFE): u = D_s + (sigma_1 / sigma_s)(x_s - D_s) at sigma_1 = sigma_s^(1-r1) sigma_t^r1,
  D~ = D_s + (D(u, sigma_1) - D_s) / (2 r1); r1 = 1/2 gives D~ = D(u, sigma_mid). NFE as DPM-Solver-2
  (`solvers.dpm_solver.fast_orders`): n steps = 2n - 1 by default, per-step `orders` to meet a budget.
- 2M (multistep, 1 NFE): r = h_prev / h; "midpoint" (k-diffusion, the default) D~ = D_i + (D_i - D_{i-1}) / (2r);
  "heun" (Taylor) adds phi_2 (D_i - D_{i-1}) / r to the first-order step instead.
- 3M (multistep, 1 NFE), as in dpm-solver `multistep_dpm_solver_third_update`, diffusers and k-diffusion
  `sample_dpmpp_3m_sde` (eta = 0): r0 = h_{i-1} / h, r1 = h_{i-2} / h, d1_0 = (D_i - D_{i-1}) / r0,
  d1_1 = (D_{i-1} - D_{i-2}) / r1, d1 = d1_0 + r0 (d1_0 - d1_1) / (r0 + r1), d2 = (d1_0 - d1_1) / (r0 + r1),
  x_t = e^-h x_s + (1 - e^-h) D_i + phi_2 d1 - phi_3 d2. Warm-up as k-diffusion: step 1 first order, step 2
  the Taylor 2M update. NOTE: d2 ~ (h^2 / 2) D'' while the exact term is -h^2 phi_3 D'', so this published
  update is only SECOND order (fact sheet A.6 measured 2.05 / 1.78; tests/test_solvers_dpm.py asserts ~2).
  It is kept as published, for parity with those libraries.
- 2M SDE (eta >= 0): with A = 1 - e^-(1+eta)h, x_t = D_i + e^-(1+eta)h (x_s - D_i) + correction
  (midpoint: A (D_i - D_{i-1}) / (2r); heun: (1 - A / ((1+eta) h)) (D_i - D_{i-1}) / r)
  + sigma_t sqrt(1 - e^-2 eta h) S_noise z, z ~ N(0, I) drawn from `generator` (independent per step, not
  k-diffusion's Brownian tree). eta = 0 performs exactly the 2M operations, so it equals 2M bit for bit.
Multistep methods: the first step and the step to sigma = 0 are first order (h = inf there); n steps = n NFE.
"""
import math
import numbers

import torch

from .common import call_denoiser, check_cond, one_nfe_per_step, check_state, run_sampler, step_level
from .dpm_solver import (check_fraction, fast_orders, finish_singlestep, run_singlestep, singlestep_levels,
                         stage_fractions, stages_at)

SOLVER_TYPES = ("midpoint", "heun")


def _log(value):
    return torch.log(value) if isinstance(value, torch.Tensor) else math.log(value)


def _exp(value):
    return torch.exp(value) if isinstance(value, torch.Tensor) else math.exp(value)


def _expm1(value):
    return torch.expm1(value) if isinstance(value, torch.Tensor) else math.expm1(value)


def _is_zero(level):
    return not isinstance(level, torch.Tensor) and level == 0


# ------------------------------------------------------------------------------------------- updates

def dpmpp_2s_update(denoiser, x, x0_hat, sigma, sigma_next, order, stages, cond, solver, r1=0.5):
    """One DPM-Solver++(2S) step of order 1 or 2 given x0_hat = D(x, sigma); stages as in dpm_solver_update."""
    if order == 1:
        return x0_hat + (sigma_next / sigma) * (x - x0_hat)
    (sigma_1, batch_1) = stages[0]
    u = x0_hat + (sigma_1 / sigma) * (x - x0_hat)
    x0_mixed = x0_hat + (call_denoiser(denoiser, u, batch_1, cond, solver) - x0_hat) / (2 * r1)
    return x0_mixed + (sigma_next / sigma) * (x - x0_mixed)


def dpmpp_2m_update(x, x0_hat, sigma, sigma_next, history, eta=0.0, solver_type="midpoint"):
    """The deterministic part of a DPM-Solver++(2M) (SDE) step; history = [(sigma_prev, x0_hat_prev)] or [].

    Levels are floats or [B, 1, ...] tensors (sigma_next > 0 when a tensor). eta = 0 is 2M.
    """
    if _is_zero(sigma_next):
        return x0_hat + (sigma_next / sigma) * (x - x0_hat)
    h = _log(sigma / sigma_next)
    h_eta = (1 + eta) * h
    decay = (sigma_next / sigma) * _exp(-eta * h)  # e^-(1+eta)h, exactly sigma_next / sigma at eta = 0
    if not history:
        return x0_hat + decay * (x - x0_hat)
    sigma_prev, x0_hat_prev = history[0]
    r = _log(sigma_prev / sigma) / h
    if solver_type == "midpoint":  # decay x + A D~ with A = 1 - decay: the A (D_i - D_{i-1}) / (2r) correction
        x0_mixed = x0_hat + (x0_hat - x0_hat_prev) / (2 * r)
        return x0_mixed + decay * (x - x0_mixed)
    a = -_expm1(-h_eta)
    return x0_hat + decay * (x - x0_hat) + ((1 - a / h_eta) / r) * (x0_hat - x0_hat_prev)


def dpmpp_3m_update(x, x0_hat, sigma, sigma_next, history):
    """A DPM-Solver++(3M) step with up to two earlier (sigma, x0_hat) pairs in history, newest first."""
    if _is_zero(sigma_next) or not history:
        return x0_hat + (sigma_next / sigma) * (x - x0_hat)
    h = _log(sigma / sigma_next)
    phi_2 = _expm1(-h) / h + 1
    first_order = x0_hat + (sigma_next / sigma) * (x - x0_hat)
    sigma_1, x0_hat_1 = history[0]
    r0 = _log(sigma_1 / sigma) / h
    d1_0 = (x0_hat - x0_hat_1) / r0
    if len(history) == 1:
        return first_order + phi_2 * d1_0
    sigma_2, x0_hat_2 = history[1]
    r1 = _log(sigma_2 / sigma_1) / h
    d1_1 = (x0_hat_1 - x0_hat_2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h - 0.5
    return first_order + phi_2 * d1 - phi_3 * d2


def add_sde_noise(x_next, sigma, sigma_next, eta, S_noise, generator):
    """+ sigma_next sqrt(1 - e^(-2 eta h)) S_noise z; nothing (and no draw) when eta, S_noise or sigma_next is 0."""
    if eta == 0 or S_noise == 0 or _is_zero(sigma_next):
        return x_next
    noise = torch.randn(x_next.shape, generator=generator, device=x_next.device, dtype=x_next.dtype)
    scale = sigma_next * (-_expm1(-2 * eta * _log(sigma / sigma_next))) ** 0.5 * S_noise
    return x_next + scale * noise


# ------------------------------------------------------------------------------------------- option checks

def _check_solver_type(solver_type, solver):
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{solver}: solver_type must be one of {', '.join(SOLVER_TYPES)}, got {solver_type!r}")
    return solver_type


def _check_nonnegative(value, what, solver):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{solver}: {what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_generator(generator, solver):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{solver}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_history(history, x, max_len, solver):
    """history: up to max_len (sigma, x0_hat) pairs of earlier steps, newest first; levels as step_level."""
    try:
        pairs = list(history)
        checked = [(step_level(sigma, x, solver)[0], x0_hat) for sigma, x0_hat in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"{solver}: history must be a list of (sigma, x0_hat) pairs, newest first") from None
    if len(checked) > max_len or any(not isinstance(d, torch.Tensor) or d.shape != x.shape for _, d in checked):
        raise ValueError(f"{solver}: history must hold at most {max_len} (sigma, x0_hat) pairs with x0_hat of "
                         f"shape {list(x.shape)}")
    return [(sigma, d.to(x.dtype)) for sigma, d in checked]


# ------------------------------------------------------------------------------------------- 2S

def dpmpp_2s_step(denoiser, x, sigma, sigma_next, cond=None, r1=0.5):
    """One DPM-Solver++(2S) step from sigma to sigma_next -> (x_next, x0_hat at sigma); first order to 0.

    Levels are python floats, 0-dim tensors or [B] tensors (one per sample, no host sync).
    """
    solver = "dpmpp_2s_step"
    check_state(x, solver)
    cond = check_cond(cond, solver)
    r1 = check_fraction(r1, solver)
    s, s_next, target, sigma_batch, target_batch, final = singlestep_levels(x, sigma, sigma_next, solver)
    order = 1 if final is None and target == 0 else 2
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    stages = stages_at(x, s, target, sigma_batch, target_batch, stage_fractions(order, r1))
    x_next = dpmpp_2s_update(denoiser, x, x0_hat, s, target, order, stages, cond, solver, r1)
    return finish_singlestep(x, x0_hat, x_next, s, s_next, final), x0_hat


def sample_dpmpp_2s(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, orders=None, r1=0.5):
    """DPM-Solver++(2S) singlestep, data form: second order, 2 NFE per step.

    orders: per-step orders in {1, 2} (last = 1, the step to 0); default [2, ..., 2, 1], i.e. n steps =
    2n - 1 NFE. Returns x0, or (x0, trajectory) with return_trajectory; callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step.
    """
    r1 = check_fraction(r1, "dpmpp_2s")
    return run_singlestep("dpmpp_2s", dpmpp_2s_update, 2, denoiser, x, sigmas, cond, callback,
                          return_trajectory, orders, r1)


# ------------------------------------------------------------------------------------------- multistep

def _multistep_step(solver, denoiser, x, sigma, sigma_next, history, cond, max_history, update):
    """A multistep step helper: update(x, x0_hat, sigma, target, history) with per-sample zeros handled."""
    check_state(x, solver)
    cond = check_cond(cond, solver)
    history = _check_history(history, x, max_history, solver)
    s, s_next, target, sigma_batch, _, final = singlestep_levels(x, sigma, sigma_next, solver)
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    return finish_singlestep(x, x0_hat, update(x, x0_hat, s, target, history), s, s_next, final), x0_hat


def dpmpp_2m_step(denoiser, x, sigma, sigma_next, history=(), cond=None, solver_type="midpoint"):
    """One DPM-Solver++(2M) step -> (x_next, x0_hat at sigma); history = [(sigma_prev, x0_hat_prev)] or ().

    Without history, or to sigma_next = 0, the step is first order. Levels as in dpmpp_2s_step.
    """
    solver_type = _check_solver_type(solver_type, "dpmpp_2m_step")
    return _multistep_step("dpmpp_2m_step", denoiser, x, sigma, sigma_next, history, cond, 1,
                           lambda x, d, s, t, past: dpmpp_2m_update(x, d, s, t, past, 0.0, solver_type))


def dpmpp_3m_step(denoiser, x, sigma, sigma_next, history=(), cond=None):
    """One DPM-Solver++(3M) step -> (x_next, x0_hat); history = up to 2 earlier (sigma, x0_hat), newest first."""
    return _multistep_step("dpmpp_3m_step", denoiser, x, sigma, sigma_next, history, cond, 2, dpmpp_3m_update)


def dpmpp_2m_sde_step(denoiser, x, sigma, sigma_next, history=(), cond=None, eta=1.0, S_noise=1.0,
                      solver_type="midpoint", generator=None):
    """One DPM-Solver++(2M) SDE step -> (x_next, x0_hat at sigma); eta = 0 is dpmpp_2m_step."""
    solver = "dpmpp_2m_sde_step"
    eta, S_noise = _check_nonnegative(eta, "eta", solver), _check_nonnegative(S_noise, "S_noise", solver)
    solver_type, generator = _check_solver_type(solver_type, solver), _check_generator(generator, solver)

    def update(x, x0_hat, s, target, past):  # samples with a per-sample sigma_next = 0 are replaced by x0_hat
        x_next = dpmpp_2m_update(x, x0_hat, s, target, past, eta, solver_type)
        return add_sde_noise(x_next, s, target, eta, S_noise, generator)

    return _multistep_step(solver, denoiser, x, sigma, sigma_next, history, cond, 1, update)


def run_multistep(solver, update, history_length, denoiser, x, sigmas, cond, callback, return_trajectory):
    """The loop of a multistep method: update(x, x0_hat, sigma, sigma_next, history) with float levels."""
    cond = check_cond(cond, solver)
    history = []  # (sigma, x0_hat) of the last steps, newest first

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
        x_next = update(x, x0_hat, sigma, sigma_next, history)
        history.insert(0, (sigma, x0_hat))
        del history[history_length:]
        return x_next, x0_hat

    return run_sampler(solver, step, x, sigmas, callback, return_trajectory)


def sample_dpmpp_2m(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, solver_type="midpoint"):
    """DPM-Solver++(2M) multistep, data form: second order, 1 NFE per step.

    solver_type "midpoint" (k-diffusion) or "heun" (Taylor). The first step and the step to 0 are first
    order. Returns x0, or (x0, trajectory) with return_trajectory; callback(info) gets
    {"i", "x", "sigma", "sigma_next", "x0_hat"} per step.
    """
    solver_type = _check_solver_type(solver_type, "dpmpp_2m")
    return run_multistep("dpmpp_2m", lambda x, d, s, t, past: dpmpp_2m_update(x, d, s, t, past, 0.0, solver_type),
                         1, denoiser, x, sigmas, cond, callback, return_trajectory)


def sample_dpmpp_3m(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False):
    """DPM-Solver++(3M) multistep as published (dpm-solver/diffusers/k-diffusion): 1 NFE per step, order ~2.

    Warm-up: first order, then Taylor 2M, then 3M; the step to 0 is first order. Returns x0, or
    (x0, trajectory) with return_trajectory. See the module docstring for why the order is 2, not 3.
    """
    return run_multistep("dpmpp_3m", dpmpp_3m_update, 2, denoiser, x, sigmas, cond, callback, return_trajectory)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, eta=1.0,
                        S_noise=1.0, solver_type="midpoint", generator=None):
    """DPM-Solver++(2M) SDE (k-diffusion): stochastic, 1 NFE per step; eta = 0 is DPM-Solver++(2M) exactly.

    eta scales the noise injected per step (1 = the reverse SDE), S_noise multiplies it; generator is a
    torch.Generator for the per-step Gaussian noise (same seed, same samples). Returns x0, or
    (x0, trajectory) with return_trajectory.
    """
    solver = "dpmpp_2m_sde"
    eta, S_noise = _check_nonnegative(eta, "eta", solver), _check_nonnegative(S_noise, "S_noise", solver)
    solver_type, generator = _check_solver_type(solver_type, solver), _check_generator(generator, solver)

    def update(x, x0_hat, sigma, sigma_next, history):
        x_next = dpmpp_2m_update(x, x0_hat, sigma, sigma_next, history, eta, solver_type)
        return add_sde_noise(x_next, sigma, sigma_next, eta, S_noise, generator)

    return run_multistep(solver, update, 1, denoiser, x, sigmas, cond, callback, return_trajectory)


sample_dpmpp_2s.steps_for_nfe = lambda nfe: len(fast_orders(nfe, 2, "dpmpp_2s"))
sample_dpmpp_2s.options_for_nfe = lambda nfe: {"orders": fast_orders(nfe, 2, "dpmpp_2s")}
one_nfe_per_step(sample_dpmpp_2m, "dpmpp_2m")  # multistep: one evaluation per step
one_nfe_per_step(sample_dpmpp_3m, "dpmpp_3m")
one_nfe_per_step(sample_dpmpp_2m_sde, "dpmpp_2m_sde")
