"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), multistep, data prediction,
variants bh1 and bh2; the reference is uni_pc.py `multistep_uni_pc_bh_update` (fact sheet A.10).

In VE with lambda = -ln sigma, a step from s (sigma_s) to t (sigma_t), h = ln(sigma_s / sigma_t) > 0, the model
values m_k = D(., sigma_k) at the current and past levels, r_k = (lambda_k - lambda_s) / h < 0 and
D_k = (m_k - m_s) / r_k for the k = 1..p-1 past levels:

    x_tilde = (sigma_t / sigma_s) x_s + (1 - e^-h) m_s                       (DPM-Solver++ first order)
    UniP-p:  x_t^P = x_tilde - B(h) sum_k a_k D_k,  a = [1/2] for p = 2, else R[:p-1, :p-1] a = b[:p-1]
    UniC-p:  m_t = D(x_t^P, sigma_t),  x_t^C = x_tilde - B(h) (sum_k c_k D_k + c_p (m_t - m_s)),  R c = b
             (c = [1/2] for p = 1)

with hh = -h, B(h) = hh (bh1) or e^hh - 1 (bh2), g_1 = (e^hh - 1) / hh - 1, g_{k+1} = g_k / hh - 1 / (k+1)!,
b_k = k! g_k / B(h), and R the p x p matrix with rows r^(k-1), its columns the past r's and then 1.

Rules (fact sheet A.10, E.2, E.10): m_t from the PREDICTED point is kept as history while the state
continues from x_t^C, so the corrector costs no evaluation; there is no corrector on the last step. Step i
(0-based, n steps) has order min(p, i + 1) (warm-up), and with lower_order_final (default, as in the UniPC
repo at any step count) min(p, i + 1, n - i). The final step to sigma = 0 is first order without corrector,
x = m_s (higher orders there have r = 0 and, for bh1, B = -inf). UniC-p raises the order to p + 1: the
default p = 2 converges at order 3 (measured 3.0; p = 3 gives 3.9-4.0).

NFE: one evaluation per step, n steps for n NFE (D at sigma_0, then one corrector/next-step evaluation at
each of sigma_1 .. sigma_{n-1}).
"""
import math

import numpy as np

from .common import call_denoiser, check_cond, one_nfe_per_step, check_sigmas, check_state, run_sampler, step_level
from .multistep import check_level, check_order

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(sigmas, sigma_next, order, variant):
    """Weights of one UniPC step as plain floats.

    sigmas: the levels of the model values used, newest (= the current level s) first, len(sigmas) >= order;
    sigma_next > 0.
    Returns (predictor, corrector): x_t^P = predictor[0] x_s + sum_k predictor[k+1] m_k over m_s, m_1..m_{p-1},
    and x_t^C = corrector[0] x_s + sum_k corrector[k+1] m_k over m_s, m_1..m_{p-1}, m_t.
    """
    sigma = sigmas[0]
    h = math.log(sigma / sigma_next)
    hh = -h
    ratio, one_minus = sigma_next / sigma, -math.expm1(hh)  # e^-h and 1 - e^-h
    rs = [math.log(sigma / past) / h for past in sigmas[1:order]]  # r_k = (lambda_k - lambda_s) / h < 0
    B = hh if variant == "bh1" else math.expm1(hh)
    b, g, factorial = [], math.expm1(hh) / hh - 1, 1
    for k in range(1, order + 1):
        b.append(factorial * g / B)
        factorial *= k + 1
        g = g / hh - 1 / factorial
    R = np.vander(rs + [1.0], order, increasing=True).T  # rows r^(k-1); columns the past r's, then 1
    b = np.array(b)
    if order == 1:
        a = []
    elif order == 2:
        a = [0.5]
    else:
        a = np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    c = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()

    def weights(coefficients, ds_nodes):
        # x_tilde - B sum_k coef_k (m_k - m_s) / r_k, written as weights on x_s, m_s and each m_k
        on_m = [-B * coef / r for coef, r in zip(coefficients, ds_nodes)]
        return [ratio, one_minus - sum(on_m)] + on_m

    return weights(a, rs), weights(c, rs + [1.0])


def check_variant(variant, solver):
    if variant not in VARIANTS:
        raise ValueError(f"{solver}: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


def _weighted_sum(weights, tensors):
    """sum_j weights[j] * tensors[j] with one allocation."""
    out = tensors[0] * weights[0]
    for weight, tensor in zip(weights[1:], tensors[1:]):
        out.add_(tensor, alpha=weight)
    return out


def unipc_update(denoiser, x, ms, coefficients, sigma_next, sigma_next_batch, corrector, cond, solver):
    """One UniPC step from the model values `ms` (newest = current level first) with the weights
    `coefficients` = unipc_coefficients(...), or None for the step to sigma = 0.

    Returns (x_next, m_next): m_next = D(x_t^P, sigma_next) when the corrector ran, else None.
    """
    if coefficients is None:
        return ms[0], None  # first order to sigma = 0 is x = D
    predictor, corrected = coefficients
    order = len(predictor) - 1
    x_pred = _weighted_sum(predictor, [x, *ms[:order]])
    if not corrector:
        return x_pred, None
    m_next = call_denoiser(denoiser, x_pred, sigma_next_batch, cond, solver)
    return _weighted_sum(corrected, [x, *ms[:order], m_next]), m_next


def step_orders(n_steps, order, lower_order_final=True):
    """The order of each step: warm-up min(p, i + 1), lower_order_final min(.., n - i), 1 for the step to 0."""
    orders = [min(order, i + 1, n_steps - i if lower_order_final else order) for i in range(n_steps)]
    orders[-1] = 1
    return orders


def unipc_step(denoiser, x, sigma, sigma_next, history=None, order=2, variant="bh2", corrector=True, cond=None):
    """One UniPC step -> (x_next, x0_hat at sigma); with an empty history UniP-1 + UniC-1.

    history: a list of (sigma, m) model values from earlier steps, oldest first, or None. If its last entry
    is at sigma (left there by the previous step's corrector) it is used as m_s; otherwise D(x, sigma) is
    evaluated and appended. The corrector (when on and sigma_next > 0) appends (sigma_next, m_t), so the
    next call spends no evaluation on it; the list keeps the last `order` entries (+ the new one).
    Levels are numbers (a 1-element tensor costs one host sync).
    """
    solver = "unipc_step"
    check_state(x, solver)
    cond = check_cond(cond, solver)
    order = check_order(order, solver)
    variant = check_variant(variant, solver)
    sigma, sigma_next = check_level(sigma, "sigma", solver), check_level(sigma_next, "sigma_next", solver)
    if not sigma > sigma_next:
        raise ValueError(f"{solver}: need sigma > sigma_next, got {sigma} and {sigma_next}")
    history = [] if history is None else history
    if not isinstance(history, list) or any(not (isinstance(h, tuple) and len(h) == 2) for h in history):
        raise ValueError(f"{solver}: history must be a list of (sigma, m) pairs from earlier steps, or None")
    if not history or history[-1][0] != sigma:
        _, sigma_batch = step_level(sigma, x, solver)
        history.append((sigma, call_denoiser(denoiser, x, sigma_batch, cond, solver)))
    if any(level <= sigma for level, _ in history[:-1]):
        raise ValueError(f"{solver}: history levels must be above sigma = {sigma} (earlier steps)")
    del history[:-order]
    sigmas = [level for level, _ in reversed(history)]
    ms = [m for _, m in reversed(history)]
    coefficients = None if sigma_next == 0 else unipc_coefficients(sigmas, sigma_next, len(ms), variant)
    _, sigma_next_batch = step_level(sigma_next, x, solver)
    x_next, m_next = unipc_update(denoiser, x, ms, coefficients, sigma_next, sigma_next_batch, corrector, cond,
                                  solver)
    if m_next is not None:
        history.append((sigma_next, m_next))
    return x_next, ms[0]


def sample_unipc(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=2, variant="bh2",
                 lower_order_final=True, corrector=True):
    """UniPC (UniP-p + UniC-p, data prediction), order p + 1, 1 NFE per step; variant "bh1" or "bh2".

    x = sigmas[0] * z; sigmas strictly decreasing, ending in 0. corrector=False gives UniP-p alone.
    Returns x0, or (x0, trajectory) with return_trajectory; trajectory holds the corrected states.
    callback(info) gets {"i", "x", "sigma", "sigma_next", "x0_hat"} per step; x0_hat is the model value
    used at sigma, which after the first step was evaluated at the predicted (uncorrected) point.
    """
    solver = f"unipc_{variant}" if variant in VARIANTS else "unipc"
    cond = check_cond(cond, solver)
    order = check_order(order, solver)
    variant = check_variant(variant, solver)
    check_state(x, solver)
    if not isinstance(lower_order_final, bool) or not isinstance(corrector, bool):
        raise ValueError(f"{solver}: lower_order_final and corrector must be True or False, "
                         f"got {lower_order_final!r} and {corrector!r}")
    levels = check_sigmas(sigmas, solver)
    orders = step_orders(len(levels) - 1, order, lower_order_final)
    table = [None if levels[i + 1] == 0 else unipc_coefficients(levels[i::-1][:k], levels[i + 1], k, variant)
             for i, k in enumerate(orders)]  # host-side weights, once per call
    ms = []  # model values at the current and past levels, newest first

    def step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch):
        if i == 0 or not corrector:  # otherwise the previous corrector left D at sigma in ms[0]
            ms.insert(0, call_denoiser(denoiser, x, sigma_batch, cond, solver))
        del ms[order:]
        x_next, m_next = unipc_update(denoiser, x, ms, table[i], sigma_next, sigma_next_batch, corrector, cond,
                                      solver)
        x0_hat = ms[0]
        if m_next is not None:
            ms.insert(0, m_next)
        return x_next, x0_hat

    return run_sampler(solver, step, x, sigmas, callback, return_trajectory)


def sample_unipc_bh1(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=2,
                     lower_order_final=True, corrector=True):
    """UniPC-bh1 (B = -h here; suggested for unconditional sampling in < 10 steps): order p + 1, 1 NFE per step.

    Options and returns as sample_unipc (order = p, default 2).
    """
    return sample_unipc(denoiser, x, sigmas, cond, callback, return_trajectory, order, "bh1", lower_order_final,
                        corrector)


def sample_unipc_bh2(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, order=2,
                     lower_order_final=True, corrector=True):
    """UniPC-bh2 (B = e^-h - 1 here; the usual default): order p + 1, 1 NFE per step.

    Options and returns as sample_unipc (order = p, default 2).
    """
    return sample_unipc(denoiser, x, sigmas, cond, callback, return_trajectory, order, "bh2", lower_order_final,
                        corrector)


# one evaluation per step: the corrector reuses the next step's evaluation
one_nfe_per_step(sample_unipc, "unipc")
one_nfe_per_step(sample_unipc_bh1, "unipc_bh1")
one_nfe_per_step(sample_unipc_bh2, "unipc_bh2")
