"""Fit a sampling schedule to a teacher: the sigmas that minimise a solver's error to the exact ODE map.

Objective (fact sheet B.6): for a solver S at a fixed NFE, a batch of starting noises z and the converged
reference x_ref(z) (solvers.reference), minimise

    L(sigmas) = mean_z ||S(D, sigma_max z, sigmas) - x_ref(z)||^2 / dim.

Parametrisation. sigma_0 = sigma_max and the final 0 are fixed; the n - 1 interior levels (n = the solver's
steps for this NFE) live in u = log sigma on (log sigma_min, log sigma_max). With R = log(sigma_max /
sigma_min), g = min_gap * R / n and p = softmax(a) over n logits,

    u_0 - u_i = sum_{j <= i} (g + (1 - (n - 1) g) R p_j),  i = 1 .. n - 1,

and p_n is the slack between the last level and sigma_min. So every schedule is strictly decreasing by
construction, each log-step is at least g (knots cannot merge and waste an evaluation), and the last level
sigma_{n-1} is free in [sigma_min, sigma_max) - moving it up trades the final x = D(x, sigma_{n-1}) step
against the ODE steps. a_1 = 0 fixes softmax's shift, leaving n - 1 free numbers.

Search. Powell's derivative-free direction-set method (scipy) on a, minimising log L, started from Karras
rho = 7, from log-uniform (logsnr), and from the best of their copies that end higher (6 levels 1.3
e-folds apart): the loss has separate basins in the last level, and a local search from sigma_min alone
misses e.g. Heun's good few-step schedules. The best end point (or start) is kept. Derivative-free
because the solvers take their levels as python floats (one host sync per solve, see
solvers.common.run_sampler), so no gradient flows to the schedule; it then works for every registered
solver as it is (multistep, stochastic ones with a fixed generator, teachers in float32), and a loss
evaluation is one solve on the batch.

Files. save_schedule writes one sigma per line (repr, so the numbers round-trip exactly) after '#'
comment lines, the metadata as one JSON object on a "# meta: " line: solvers.schedules.from_file reads it
(it skips comments), load_schedule returns the metadata too.

Related work. Align Your Steps (AYS) minimises a KL upper bound of the SDE discretisation on
forward-noised data, one knot at a time; GITS builds a cost matrix of Euler jumps between points of a fine
teacher trajectory and picks knots by dynamic programming. Here the objective is the end-to-end error of
the very solver the schedule is for, measured against the exact ODE map (so it sees warm-up steps, the last
step to 0 and the multistep history), at the price of depending on the seed batch: evaluate on disjoint
noises (runs/bench_solvers.py does).
"""
import inspect
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from .common import CountingDenoiser
from .reference import reference_solution
from .schedules import explicit, from_file

META_PREFIX = "# meta: "


def _gap(min_gap, steps, log_range):
    return min_gap * log_range / steps


def schedule_from_logits(logits, sigma_min, sigma_max, min_gap=0.05):
    """n + 1 float64 sigmas [sigma_max, ..., 0] from n logits (see the module docstring)."""
    logits = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    steps = logits.numel()
    log_max, log_range = math.log(sigma_max), math.log(sigma_max / sigma_min)
    gap = _gap(min_gap, steps, log_range)
    increments = gap + (log_range - (steps - 1) * gap) * logits.softmax(0)[:-1]
    levels = (log_max - torch.cat([increments.new_zeros(1), increments.cumsum(0)])).exp().clamp_min(sigma_min)
    levels[0] = sigma_max
    return torch.cat([levels, levels.new_zeros(1)])


def logits_from_schedule(sigmas, sigma_min, sigma_max, min_gap=0.05, floor=1e-9):
    """The logits (first one 0) whose schedule is closest to `sigmas` (n + 1 levels ending in 0); a share of
    the log-range below `floor` (a log-step at the minimum gap, a last level at sigma_min) is raised to it."""
    levels = torch.as_tensor(sigmas, dtype=torch.float64)[:-1]
    steps = levels.numel()
    log_range = math.log(sigma_max / sigma_min)
    gap = _gap(min_gap, steps, log_range)
    u = levels.log()
    increments = torch.cat([u[:-1] - u[1:], (u[-1:] - math.log(sigma_min)).clamp_min(0)])
    p = ((increments - torch.cat([torch.full((steps - 1,), gap), torch.zeros(1)])) /
         (log_range - (steps - 1) * gap)).clamp_min(floor)
    logits = (p / p.sum()).log()
    return logits - logits[0]


def _takes_generator(sample):
    try:
        return "generator" in inspect.signature(sample).parameters
    except (TypeError, ValueError):
        return False


def solve_batched(denoiser, sample, sigmas, z, cond=None, options=None, batch_size=None, seed=0):
    """x0 = sample(denoiser, sigma_max z, sigmas) over z in chunks, without autograd; a stochastic sampler
    (one that takes `generator`) gets one generator seeded with `seed` for the whole batch."""
    options = dict(options or {})
    if _takes_generator(sample):
        options["generator"] = torch.Generator(device=z.device).manual_seed(seed)
    batch_size = batch_size or z.shape[0]
    sigmas = sigmas.to(z.device)
    out = []
    with torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            part = {k: v[start:start + batch_size] for k, v in (cond or {}).items()}
            z_part = z[start:start + batch_size]
            out.append(sample(denoiser, z_part * sigmas[0].to(z.dtype), sigmas, cond=part or None, **options))
    return torch.cat(out)


def schedule_mse(denoiser, solver, sigmas, z, reference, cond=None, options=None, batch_size=None, seed=0):
    """Mean squared error of the solver's samples from z to the reference samples (a python float)."""
    from . import get_solver
    x0 = solve_batched(denoiser, get_solver(solver), sigmas, z, cond, options, batch_size, seed)
    return float((x0.to(torch.float64) - reference.to(x0.device, torch.float64)).square().mean())


def _check(z, sigma_min, sigma_max, reference, iters, min_gap, inits):
    if not (isinstance(z, torch.Tensor) and z.ndim >= 2 and z.is_floating_point() and z.shape[0] >= 1):
        raise ValueError("optimise_schedule: z must be a floating-point batch of noises [N, *shape]")
    if not (isinstance(sigma_min, (int, float)) and isinstance(sigma_max, (int, float)) and
            0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"optimise_schedule: need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape != z.shape):
        got = list(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"optimise_schedule: reference must have z's shape {list(z.shape)}, got {got}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"optimise_schedule: iters must be an integer >= 0, got {iters!r}")
    if not (isinstance(min_gap, (int, float)) and 0 <= min_gap < 1):
        raise ValueError(f"optimise_schedule: min_gap must be in [0, 1), got {min_gap!r}")
    unknown = [name for name in inits if name not in ("karras", "logsnr")] if not isinstance(inits, str) else [inits]
    if not inits or unknown:
        raise ValueError(f"optimise_schedule: inits must be a non-empty subset of ('karras', 'logsnr'), got {inits!r}")


def optimise_schedule(denoiser, solver, nfe, z, sigma_min=0.002, sigma_max=80.0, reference=None, cond=None,
                      iters=200, min_gap=0.05, inits=("karras", "logsnr"), batch_size=None, seed=0,
                      return_info=False):
    """The schedule (float64 [n + 1], sigma_max first, ending in 0) minimising the solver's MSE at `nfe` to the
    reference x_ref(z); use it with options_for_nfe(solver, nfe) for exactly nfe evaluations.
    Never worse on z than the best initial schedule (that one is returned when nothing beats it).

    z: noises [N, *shape] (x starts at sigma_max z). reference: x_ref [N, *shape], or None to compute it
    with reference_solution (an exact ODE solve; needs a teacher cheap to call hundreds of times). iters:
    loss evaluations per start of Powell's search (3 starts; 14 more evaluations for the initial schedules
    and the scan). With return_info, returns (sigmas, info) with the losses of the initial schedules and of
    the result and the number of evaluations.
    """
    from . import get_solver, options_for_nfe, sigmas_for_nfe
    sample = get_solver(solver)
    name = solver if isinstance(solver, str) else getattr(solver, "__name__", "solver")
    _check(z, sigma_min, sigma_max, reference, iters, min_gap, inits)
    options = options_for_nfe(sample, nfe)
    starts = {init: sigmas_for_nfe(sample, nfe, init, sigma_min=sigma_min, sigma_max=sigma_max) for init in inits}
    if reference is None:
        reference = reference_solution(denoiser, z.to(torch.float64) * sigma_max, sigma_max, (0.0,),
                                       cond=cond)[0][0]
    counted = CountingDenoiser(denoiser)
    first = next(iter(starts.values()))
    schedule_mse(counted, sample, first, z[:1], reference[:1], {k: v[:1] for k, v in (cond or {}).items()},
                 options, seed=seed)
    if counted.nfe != nfe:
        raise ValueError(f"optimise_schedule: {name} spent {counted.nfe} evaluations at nfe={nfe}; its "
                         f"steps_for_nfe/options_for_nfe do not meet the budget")

    evaluations = 0

    def loss(sigmas):
        nonlocal evaluations
        evaluations += 1
        try:
            value = schedule_mse(denoiser, sample, sigmas, z, reference, cond, options, batch_size, seed)
        except ValueError as error:  # a schedule on which the solver overflows is just a bad schedule
            if "non-finite" not in str(error):
                raise
            return math.inf
        return value if math.isfinite(value) else math.inf

    def objective(free):  # log L, with a large finite penalty where the solver overflows (keeps Brent sane)
        value = loss(schedule_from_logits(np.concatenate([[0.0], free]), sigma_min, sigma_max, min_gap))
        return math.log(max(value, 1e-300)) if math.isfinite(value) else 1e3

    initial = {init: loss(sigmas) for init, sigmas in starts.items()}
    best_init = min(initial, key=initial.get)
    best, best_loss = starts[best_init], initial[best_init]
    steps = first.numel() - 1
    if steps > 1 and iters > 0:
        # The loss has separate basins in the last level (a second-order step into a tiny sigma_min blows up,
        # fact sheet E.5), so the local search also starts from the best copy of the initial schedules that
        # ends higher, at sigma_min (sigma_max / sigma_min)^(k / 8), k = 1 .. 6.
        raised = [sigmas_for_nfe(sample, nfe, init, sigma_min=sigma_min * (sigma_max / sigma_min) ** (k / 8),
                                 sigma_max=sigma_max) for init in inits for k in range(1, 7)]
        raised_loss, raised_best = min(((loss(sigmas), sigmas) for sigmas in raised), key=lambda pair: pair[0])
        if raised_loss < best_loss:
            best, best_loss = raised_best, raised_loss
        for start_sigmas in [starts[init] for init in inits] + [raised_best]:
            # every share >= 1%: where a schedule puts its last level at sigma_min, the slack logit would
            # otherwise start so low that the loss is flat in it and the line search could not move it
            start = logits_from_schedule(start_sigmas, sigma_min, sigma_max, min_gap, floor=0.01)[1:].numpy()
            result = minimize(objective, start, method="Powell",
                              options={"maxfev": iters, "xtol": 1e-3, "ftol": 1e-4})
            candidate = schedule_from_logits(np.concatenate([[0.0], result.x]), sigma_min, sigma_max, min_gap)
            candidate_loss = math.exp(result.fun)
            if candidate_loss < best_loss:
                best, best_loss = candidate, candidate_loss
    info = {"solver": name, "nfe": nfe, "steps": steps, "loss_init": initial, "init": best_init,
            "loss_before": initial[best_init], "loss_after": best_loss, "evaluations": evaluations}
    return (best, info) if return_info else best


def save_schedule(sigmas, path, meta=None):
    """Write a schedule as text that solvers.schedules.from_file reads: '#' comment lines, the JSON metadata
    on a '# meta: ' line, then one sigma per line (exact repr), ending in 0. Returns the path."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"save_schedule: {path}: a .json schedule file holds a bare list and no metadata; "
                         f"use a text file such as schedule.txt")
    sigmas = explicit(sigmas)
    meta = dict(meta or {})
    try:
        meta_line = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_schedule: meta must be JSON-serialisable ({error})") from None
    header = ["# fastdiff sampling schedule: sigmas, decreasing, ending in 0 (solvers.schedules.from_file)"]
    if "solver" in meta and "nfe" in meta:
        header.append(f"# use with solvers.options_for_nfe({meta['solver']!r}, {meta['nfe']}) for exactly "
                      f"{meta['nfe']} evaluations")
    header.append(META_PREFIX + meta_line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + [repr(s) for s in sigmas.tolist()]) + "\n")
    return path


def load_schedule(path):
    """(sigmas, meta) of a schedule file: sigmas as solvers.schedules.from_file reads them, meta the dict of
    its '# meta: ' line ({} when it has none)."""
    sigmas = from_file(path)
    meta = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith(META_PREFIX):
            try:
                meta = json.loads(line[len(META_PREFIX):])
            except json.JSONDecodeError as error:
                raise ValueError(f"schedule file {path}: unreadable metadata line ({error.msg})") from None
    return sigmas, meta
