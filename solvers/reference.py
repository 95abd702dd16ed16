"""A converged reference solution of the probability-flow ODE, to measure solvers and fit schedules against.

The ODE dx/dsigma = (x - D(x, sigma)) / sigma is integrated in u = log sigma, where it reads

    dx/du = x - D(x, e^u),

with an adaptive 8th-order Runge-Kutta method (DOP853, scipy.integrate.solve_ivp) in float64 at tight
tolerances (rtol = atol = 1e-10 by default). In u the right-hand side is smooth at every scale: for
sigma >> data scale x grows like e^u, and for sigma << data scale x - D = -sigma^2 grad log p_sigma(x) is
O(sigma^2), so the tail costs few steps. All samples of the batch are integrated as one system (one denoiser
call on the whole batch per evaluation; the error norm is the RMS over all coordinates).

The last step to sigma = 0. The ODE in u needs infinite time to reach 0, so the solve stops at sigma_end and
takes x0 = D(x(sigma_end), sigma_end). For a smooth teacher (a Gaussian mixture, a network) the error is
|x0 - x(0)| ~ sigma_end^2 / 2 |grad log p| (with sigma_end = 1e-7 and a data std of 0.07 about 1e-13); for
the memorising empirical teacher, whose flow goes straight to the nearest point, D is exact there.
This is not the same target as a solver's final "x = D(x, sigma_min)" step from sigma_min = 0.002: that
step has its own error of the same form with sigma_min in place of sigma_end (see runs/bench_solvers.py).

Accuracy. `reference_tolerance_check` re-solves with both tolerances halved; the change of the result is
the reference's error estimate, and must be far below the smallest error the benchmark reports.
"""
import math

import numpy as np
import torch
from scipy.integrate import solve_ivp


def _levels(sigma_max, sigmas_out):
    """sigma_max and the output levels as python floats, checked: 0 <= levels <= sigma_max, decreasing."""
    try:
        start = float(sigma_max)
        levels = [float(s) for s in torch.as_tensor(sigmas_out, dtype=torch.float64).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"reference_solution: sigma_max must be a number and sigmas_out a 1-D list of numbers, "
                         f"got {sigma_max!r} and {sigmas_out!r}") from None
    if not (math.isfinite(start) and start > 0):
        raise ValueError(f"reference_solution: sigma_max must be finite and > 0, got {start}")
    if not levels:
        raise ValueError("reference_solution: sigmas_out is empty; give the levels to report, e.g. (0,)")
    if not all(math.isfinite(s) and 0 <= s <= start for s in levels):
        raise ValueError(f"reference_solution: sigmas_out must lie in [0, sigma_max={start:g}], got {levels[:8]}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"reference_solution: sigmas_out must be strictly decreasing, got {levels[:8]}")
    return start, levels


def reference_solution(denoiser, x, sigma_max, sigmas_out=(0.0,), rtol=1e-10, atol=1e-10, cond=None,
                       sigma_end=1e-7, max_nfe=200_000):
    """Solve the probability-flow ODE from x at sigma_max to each level in sigmas_out (decreasing; 0 allowed).

    Returns (states, info): states float64 [len(sigmas_out), *x.shape] on x's device, and info =
    {"nfe": denoiser calls on the batch, "sigma_end": the level the final x0 = D(x, sigma_end) is taken
    from (when 0 is requested), "rtol", "atol"}. Not differentiable.
    cond is a dict of extra denoiser keyword arguments (e.g. {"class_labels": y}).
    """
    start, levels = _levels(sigma_max, sigmas_out)
    if not (isinstance(x, torch.Tensor) and x.ndim >= 1 and x.is_floating_point()):
        raise ValueError("reference_solution: x must be a floating-point tensor with a batch dimension first")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"reference_solution: {name} must be a number in (0, 1), got {value!r}")
    if not (isinstance(sigma_end, (int, float)) and 0 < sigma_end < start):
        raise ValueError(f"reference_solution: sigma_end must be in (0, sigma_max), got {sigma_end!r}")
    if cond is not None and not isinstance(cond, dict):
        raise ValueError(f"reference_solution: cond must be a dict of denoiser keyword arguments or None, "
                         f"got {type(cond).__name__}")
    cond = cond or {}
    shape, device, batch = x.shape, x.device, x.shape[0]
    calls = 0

    def denoise(state, sigma):
        nonlocal calls
        calls += 1
        if calls > max_nfe:
            raise ValueError(f"reference_solution: no convergence within {max_nfe} denoiser calls "
                             f"(rtol={rtol}, atol={atol}); loosen the tolerances or check the denoiser")
        sigma_batch = torch.full((batch,), sigma, dtype=torch.float64, device=device)
        x0_hat = denoiser(state, sigma_batch, **cond)
        if not isinstance(x0_hat, torch.Tensor) or x0_hat.shape != shape:
            raise ValueError(f"reference_solution: denoiser returned shape "
                             f"{list(getattr(x0_hat, 'shape', []))}, expected {list(shape)}")
        return x0_hat.to(torch.float64)

    def rhs(u, y):  # dx/du = x - D(x, e^u)
        state = torch.from_numpy(y).reshape(shape).to(device)
        return (state - denoise(state, math.exp(u))).reshape(-1).cpu().numpy()

    positive = [s for s in levels if s > 0]
    u_out = [math.log(s) for s in positive]
    u_last = math.log(min(positive + [sigma_end] * (levels[-1] == 0)))  # where the integration stops
    t_eval = u_out + ([u_last] if not u_out or u_last < u_out[-1] else [])
    with torch.no_grad():
        if u_last < math.log(start):
            y0 = x.detach().to(torch.float64).reshape(-1).cpu().numpy()
            sol = solve_ivp(rhs, (math.log(start), u_last), y0, method="DOP853", t_eval=t_eval, rtol=rtol, atol=atol)
            if sol.status != 0 or not np.isfinite(sol.y).all():
                raise ValueError(f"reference_solution: the ODE solve failed ({sol.message})")
            solved = [torch.from_numpy(np.ascontiguousarray(sol.y[:, k])).reshape(shape).to(device)
                      for k in range(sol.y.shape[1])]
        else:  # only sigma_max itself was asked for
            solved = [x.detach().to(torch.float64)]
        states = solved[:len(positive)]
        if levels[-1] == 0:
            states.append(denoise(solved[-1], math.exp(u_last)))
    info = {"nfe": calls, "sigma_end": math.exp(u_last) if levels[-1] == 0 else None, "rtol": rtol, "atol": atol}
    return torch.stack(states), info


def reference_tolerance_check(denoiser, x, sigma_max, sigmas_out=(0.0,), rtol=1e-10, atol=1e-10, cond=None,
                              **kwargs):
    """(states, info) of reference_solution, with info["tolerance_change"] = the largest absolute change of
    any state when rtol and atol are both halved: the reference's own error estimate."""
    states, info = reference_solution(denoiser, x, sigma_max, sigmas_out, rtol, atol, cond, **kwargs)
    finer, finer_info = reference_solution(denoiser, x, sigma_max, sigmas_out, rtol / 2, atol / 2, cond, **kwargs)
    info["tolerance_change"] = float((finer - states).abs().max())
    info["nfe"] += finer_info["nfe"]
    return finer, info
