"""DPM-Solver-1/2/3, singlestep, noise (eps) form (Lu et al. 2022, "DPM-Solver", Algorithms 1 and 2, eqs. 3.7-3.10;
dpm-solver `singlestep_dpm_solver_{second,third}_update`, k-diffusion `DPMSolver`), in VE sigma space.

With lambda = -ln sigma, h = ln(sigma_s / sigma_t) and eps = d = (x - D(x, sigma)) / sigma, the linear part of
the ODE vanishes in VE (alpha = 1), and sigma_t (e^h - 1) = sigma_s - sigma_t, so the updates read
    order 1:  x_t = x_s + (sigma_t - sigma_s) eps_s                                   (= Euler = DDIM)
    order 2:  u = x_s + (sigma_1 - sigma_s) eps_s,
              x_t = x_s + (sigma_t - sigma_s) [eps_s + (eps(u, sigma_1) - eps_s) / (2 r1)]     (r1 = 1: Heun)
    order 3:  u1 = x_s + (sigma_1 - sigma_s) eps_s,
              u2 = x_s + (sigma_2 - sigma_s) eps_s - sigma_2 (r2 / r1) phi_22 (eps(u1, sigma_1) - eps_s),
              x_t = x_s + (sigma_t - sigma_s) eps_s - (sigma_t / r2) phi_2 (eps(u2, sigma_2) - eps_s),
with intermediate levels uniform in lambda, sigma_k = sigma_s^(1 - r_k) sigma_t^r_k, r1 = 1/3 and r2 = 2/3 for
order 3 (r2 = 2/3 is what makes this form third order), phi_22 = (e^(r2 h) - 1) / (r2 h) - 1 and
phi_2 = (e^h - 1) / h - 1. The step to sigma = 0 (h = inf) is always first order, which gives x = D.

NFE. A step of order k costs k evaluations, so a sampler takes per-step `orders`; by default every step has
the sampler's order except the step to 0 (DPM-Solver-2: n steps = 2n - 1 NFE; DPM-Solver-3: 3n - 2).
`steps_for_nfe` / `options_for_nfe` meet a budget N exactly with the "DPM-Solver-fast" allocation (Lu et al.
Sec. 3.4; dpm-solver `get_orders_and_timesteps_for_singlestep_solver`): order 3 gives
[3] * (K - 2) + [2, 1] if N % 3 == 0, else [3] * (K - 1) + [N % 3], with K = N // 3 + 1; order 2 gives
[2] * (N // 2) (+ [1] if N is odd). A trailing 2 is split into [1, 1] (same NFE, one more step), because
here the last step goes to sigma = 0. The paper pairs it with the `logsnr` schedule.
Caveat (fact sheet E.5): in eps form one large high-order step that ends at a tiny sigma_min overshoots (at
NFE 3-4 on [80, 0.002, 0] the sample is ~100x the data scale off); the data-form DPM-Solver++ does not.
"""
import math
import numbers

import torch

from .common import (call_denoiser, check_cond, check_nfe, check_sigmas, check_state, run_sampler, sigma_dtype,
                     step_level)

THIRD_ORDER_FRACTIONS = (1 / 3, 2 / 3)


def _log(value):
    return torch.log(value) if isinstance(value, torch.Tensor) else math.log(value)


def _expm1(value):
    return torch.expm1(value) if isinstance(value, torch.Tensor) else math.expm1(value)


def fast_orders(nfe, max_order, solver="dpm_solver"):
    """Per-step orders spending exactly `nfe` evaluations (DPM-Solver-fast), ending with a first-order step."""
    nfe = check_nfe(nfe, solver)
    if max_order == 1:
        return [1] * nfe
    if max_order == 2:
        orders = [2] * (nfe // 2) + [1] * (nfe % 2)
    elif nfe % 3 == 0:
        orders = [3] * (nfe // 3 - 1) + [2, 1]
    else:
        orders = [3] * (nfe // 3) + [nfe % 3]
    return orders[:-1] + [1, 1] if orders[-1] == 2 else orders


def check_orders(orders, n_steps, max_order, solver):
    """Per-step orders: None -> max_order everywhere but the final step to 0; else validated as a list."""
    if orders is None:
        return [max_order] * (n_steps - 1) + [1]
    try:
        orders = list(orders)
    except TypeError:
        raise ValueError(f"{solver}: orders must be a list of per-step orders, got {type(orders).__name__}") from None
    if len(orders) != n_steps or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                         and 1 <= k <= max_order for k in orders):
        raise ValueError(f"{solver}: orders must list one integer in 1..{max_order} per step "
                         f"({n_steps} steps), got {orders}")
    if orders[-1] != 1:
        raise ValueError(f"{solver}: the last step goes to sigma = 0 and must be first order, got orders {orders}")
    return [int(k) for k in orders]


def check_fraction(r1, solver):
    """The intermediate-level fraction r1 of a second-order singlestep method, in (0, 1]."""
    if isinstance(r1, bool) or not isinstance(r1, numbers.Real) or not 0 < r1 <= 1:
        raise ValueError(f"{solver}: r1 must be a number in (0, 1], got {r1!r}")
    return float(r1)


def stage_fractions(order, r1):
    """Where the intermediate evaluations of a step of this order sit, as fractions of h."""
    return {1: (), 2: (r1,), 3: THIRD_ORDER_FRACTIONS}[order]


def dpm_solver_update(denoiser, x, x0_hat, sigma, sigma_next, order, stages, cond, solver, r1=0.5):
    """One DPM-Solver step of `order` given x0_hat = D(x, sigma): the formulas in the module docstring.

    sigma/sigma_next are floats or [B, 1, ...] tensors, sigma_next > 0 for order > 1; stages holds one
    (level, sigma batch) pair per intermediate evaluation, at the levels from `stage_fractions`.
    """
    if order == 1:
        return x0_hat + (sigma_next / sigma) * (x - x0_hat)  # so that sigma_next = 0 gives x0_hat exactly
    eps = (x - x0_hat) / sigma
    (sigma_1, batch_1) = stages[0]
    u1 = x + (sigma_1 - sigma) * eps
    eps_1 = (u1 - call_denoiser(denoiser, u1, batch_1, cond, solver)) / sigma_1
    if order == 2:
        return x + (sigma_next - sigma) * (eps + (eps_1 - eps) / (2 * r1))
    r1, r2 = THIRD_ORDER_FRACTIONS
    (sigma_2, batch_2) = stages[1]
    h = _log(sigma / sigma_next)
    phi_22 = _expm1(r2 * h) / (r2 * h) - 1
    phi_2 = _expm1(h) / h - 1
    u2 = x + (sigma_2 - sigma) * eps - (sigma_2 * (r2 / r1) * phi_22) * (eps_1 - eps)
    eps_2 = (u2 - call_denoiser(denoiser, u2, batch_2, cond, solver)) / sigma_2
    return x + (sigma_next - sigma) * eps - (sigma_next / r2 * phi_2) * (eps_2 - eps)


def singlestep_levels(x, sigma, sigma_next, solver):
    """A step helper's levels: (sigma, sigma_next, target, sigma batch, target batch, final mask or None).

    Float levels pass through. With a tensor sigma_next, samples that step to 0 get a stand-in target
    sigma / 2 (their higher-order result is computed finite and then replaced, see `finish_singlestep`).
    """
    s, sigma_batch = step_level(sigma, x, solver)
    s_next, next_batch = step_level(sigma_next, x, solver)
    if not isinstance(s, torch.Tensor) and s == 0:
        raise ValueError(f"{solver}: sigma must be > 0 (the ODE's d = (x - D) / sigma is undefined at 0)")
    if not isinstance(s_next, torch.Tensor):
        return s, s_next, s_next, sigma_batch, next_batch, None
    final = s_next == 0
    target_batch = torch.where(next_batch > 0, next_batch, 0.5 * sigma_batch)
    return s, s_next, torch.where(final, 0.5 * s, s_next), sigma_batch, target_batch, final


def stages_at(x, s, s_next, sigma_batch, next_batch, fractions):
    """(level, sigma batch) of each intermediate evaluation, sigma^(1 - r) sigma_next^r, for floats or tensors."""
    stages = []
    for r in fractions:
        if isinstance(s, torch.Tensor) or isinstance(s_next, torch.Tensor):
            batch = sigma_batch ** (1 - r) * next_batch ** r
            stages.append((batch.to(x.dtype).reshape(x.shape[0], *[1] * (x.ndim - 1)), batch))
        else:
            level = s ** (1 - r) * s_next ** r
            stages.append((level, torch.full((x.shape[0],), level, dtype=sigma_dtype(x), device=x.device)))
    return stages


def finish_singlestep(x, x0_hat, x_next, sigma, sigma_next, final):
    """Where a per-sample sigma_next is 0, the first-order result x0_hat replaces the higher-order one."""
    if final is None:
        return x_next
    return torch.where(final, x0_hat + (sigma_next / sigma) * (x - x0_hat), x_next)


def dpm_solver_step(denoiser, x, sigma, sigma_next, order=2, cond=None, r1=0.5):
    """One DPM-Solver step of `order` (1, 2 or 3) from sigma to sigma_next -> (x_next, x0_hat at sigma).

    sigma and sigma_next are python floats, 0-dim tensors or [B] tensors (one level per sample, no host
    sync). A step to sigma_next = 0 is first order (x_next = x0_hat, 1 NFE with float levels).
    """
    solver = "dpm_solver_step"
    check_state(x, solver)
    cond = check_cond(cond, solver)
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"{solver}: order must be 1, 2 or 3, got {order!r}")
    r1 = check_fraction(r1, solver)
    s, s_next, target, sigma_batch, target_batch, final = singlestep_levels(x, sigma, sigma_next, solver)
    if final is None and target == 0:
        order = 1
    x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
    stages = stages_at(x, s, target, sigma_batch, target_batch, stage_fractions(order, r1))
    x_next = dpm_solver_update(denoiser, x, x0_hat, s, target, order, stages, cond, solver, r1)
    return finish_singlestep(x, x0_hat, x_next, s, s_next, final), x0_hat


def run_singlestep(solver, update, max_order, denoiser, x, sigmas, cond, callback, return_trajectory, orders, r1):
    """The sampling loop of a singlestep method: `update(denoiser, x, x0_hat, sigma, sigma_next, order, stages,
    cond, solver, r1)` per step, with every intermediate level computed once, on the host, up front."""
    check_state(x, solver)
    cond = check_cond(cond, solver)
    levels = check_sigmas(sigmas, solver)
    orders = check_orders(orders, len(levels) - 1, max_order, solver)
    stage_levels = [[levels[i] ** (1 - r) * levels[i + 1] ** r for r in stage_fractions(k, r1)]
                    for i, k in enumerate(orders)]
    padded = [row + [0.0] * (2 - len(row)) for row in stage_levels]  # one device tensor [n, 2] for all steps
    device_stages = torch.tensor(padded, dtype=torch.float64).to(device=x.device, dtype=sigma_dtype(x))
    stages = [[(level, device_stages[i, j].expand(x.shape[0])) for j, level in enumerate(row)]
              for i, row in enumerate(stage_levels)]

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        x0_hat = call_denoiser(denoiser, x, sigma_batch, cond, solver)
        return update(denoiser, x, x0_hat, sigma, sigma_next, orders[i], stages[i], cond, solver, r1), x0_hat

    return run_sampler(solver, step, x, sigmas, callback, return_trajectory)


def sample_dpm_solver_1(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False):
    """DPM-Solver-1 (= Euler = DDIM eta=0): first order, 1 NFE per step."""
    return run_singlestep("dpm_solver_1", dpm_solver_update, 1, denoiser, x, sigmas, cond, callback,
                          return_trajectory, None, 0.5)


def sample_dpm_solver_2(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, orders=None, r1=0.5):
    """DPM-Solver-2 singlestep (eps form, midpoint r1 = 1/2 in lambda): second order, 2 NFE per step.

    orders: per-step orders in {1, 2} (last = 1, the step to 0); default [2, ..., 2, 1], i.e. n steps =
    2n - 1 NFE. r1 = 1 is Heun. Returns x0, or (x0, trajectory) with return_trajectory; callback(info)
    gets {"i", "x", "sigma", "sigma_next", "x0_hat"} per step.
    """
    r1 = check_fraction(r1, "dpm_solver_2")
    return run_singlestep("dpm_solver_2", dpm_solver_update, 2, denoiser, x, sigmas, cond, callback,
                          return_trajectory, orders, r1)


def sample_dpm_solver_3(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, orders=None):
    """DPM-Solver-3 singlestep (eps form, r1 = 1/3, r2 = 2/3): third order, 3 NFE per step.

    orders: per-step orders in {1, 2, 3} (last = 1, the step to 0; order-2 steps use r1 = 1/2); default
    [3, ..., 3, 1], i.e. n steps = 3n - 2 NFE. Returns x0, or (x0, trajectory) with return_trajectory.
    """
    return run_singlestep("dpm_solver_3", dpm_solver_update, 3, denoiser, x, sigmas, cond, callback,
                          return_trajectory, orders, 0.5)


def _attach_nfe_budget(sample, name, max_order):
    def options_for_nfe(nfe):
        orders = fast_orders(nfe, max_order, name)
        return {} if max_order == 1 else {"orders": orders}

    sample.steps_for_nfe = lambda nfe: len(fast_orders(nfe, max_order, name))
    sample.options_for_nfe = options_for_nfe


_attach_nfe_budget(sample_dpm_solver_1, "dpm_solver_1", 1)
_attach_nfe_budget(sample_dpm_solver_2, "dpm_solver_2", 2)
_attach_nfe_budget(sample_dpm_solver_3, "dpm_solver_3", 3)
