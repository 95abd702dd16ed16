"""What every ODE sampler shares: input checks, the denoiser call, the step loop and NFE counting.

Convention (EDM, Karras et al. 2022; k-diffusion): variance exploding, x = x0 + sigma * n, and the
probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma. A schedule `sigmas` is a 1-D strictly
decreasing tensor ending in 0, so n steps take n + 1 entries, and sampling starts from x = sigmas[0] * z.

The loop converts the schedule to python floats once (one host sync) for the step coefficients and
indexes a device copy of it for the sigma batch fed to the denoiser, so a step does no host syncs. The
result is checked for NaN/inf once, at the end.
"""
import math
import numbers

import torch


def sigma_dtype(x):
    """The dtype of the sigma batch given to the denoiser: float64 for a float64 state, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _brief(values, limit=6):
    shown = ", ".join(f"{v:.6g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} entries)"


def check_sigmas(sigmas, solver):
    """Validate a sampling schedule and return it as a list of python floats (one host sync)."""
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{solver}: sigmas must be a 1-D tensor of numbers, got {type(sigmas).__name__}") from None
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{solver}: sigmas must be a 1-D tensor with at least 2 entries "
                         f"(n steps = n + 1 sigmas ending in 0), got shape {list(sigmas.shape)}")
    if sigmas.is_complex() or not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{solver}: sigmas must be real numbers, got dtype {sigmas.dtype}")
    levels = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) for s in levels):
        raise ValueError(f"{solver}: sigmas must be finite, got {_brief(levels)}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"{solver}: sigmas must be strictly decreasing, got {_brief(levels)}")
    if levels[-1] != 0:
        raise ValueError(f"{solver}: sigmas must end in 0 (append 0 to the schedule), got {_brief(levels)}")
    return levels


def check_cond(cond, solver):
    """`cond` is a dict of extra keyword arguments for the denoiser (e.g. {"class_labels": y}) or None."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise ValueError(f"{solver}: cond must be a dict of denoiser keyword arguments or None, "
                         f"got {type(cond).__name__}")
    return cond


def check_state(x, solver):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        got = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{solver}: x must be a floating-point tensor with a batch dimension first, got {got}")


def call_denoiser(denoiser, x, sigma_batch, cond, solver):
    """x0_hat = D(x, sigma_batch, **cond), checked for shape (host side, free) and cast to x's dtype."""
    x0_hat = denoiser(x, sigma_batch, **cond)
    if not isinstance(x0_hat, torch.Tensor) or x0_hat.shape != x.shape:
        got = list(x0_hat.shape) if isinstance(x0_hat, torch.Tensor) else type(x0_hat).__name__
        raise ValueError(f"{solver}: denoiser returned shape {got}, expected the input's shape {list(x.shape)}")
    return x0_hat.to(x.dtype)


def step_level(sigma, x, solver):
    """A one-step helper's noise level as (coefficient, sigma batch for the denoiser).

    A python float stays a float (the batch is filled once). A tensor, 0-dim or one level per sample
    of shape [B], becomes a coefficient of shape [B, 1, ..., 1] in x's dtype, with no host sync.
    """
    batch = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim == 0 or tuple(sigma.shape) == (batch,):
            sigma_batch = sigma.to(device=x.device, dtype=sigma_dtype(x)).expand(batch)
            return sigma_batch.to(x.dtype).reshape(batch, *[1] * (x.ndim - 1)), sigma_batch
        raise ValueError(f"{solver}: a sigma tensor must be 0-dim or have one level per sample "
                         f"(shape [{batch}]), got shape {list(sigma.shape)}")
    try:
        level = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{solver}: sigma must be a number or a tensor, got {type(sigma).__name__}") from None
    if not math.isfinite(level) or level < 0:
        raise ValueError(f"{solver}: sigma must be finite and >= 0, got {level}")
    return level, torch.full((batch,), level, dtype=sigma_dtype(x), device=x.device)


def run_sampler(solver, step, x, sigmas, callback=None, return_trajectory=False):
    """Integrate from sigmas[0] to 0, one `step(i, x, sigma, sigma_next, sigma_batch, sigma_next_batch)
    -> (x_next, x0_hat)` per interval, where sigma/sigma_next are python floats and the batches [B] views
    of a device tensor. Returns x0, or (x0, trajectory [len(sigmas), B, ...]) with return_trajectory.
    """
    check_state(x, solver)
    levels = check_sigmas(sigmas, solver)
    device_sigmas = torch.as_tensor(sigmas, dtype=torch.float64).to(device=x.device, dtype=sigma_dtype(x))
    batch = x.shape[0]
    trajectory = None
    if return_trajectory:
        trajectory = x.new_empty((len(levels), *x.shape))
        trajectory[0] = x
    for i in range(len(levels) - 1):
        x_next, x0_hat = step(i, x, levels[i], levels[i + 1],
                              device_sigmas[i].expand(batch), device_sigmas[i + 1].expand(batch))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": levels[i], "sigma_next": levels[i + 1], "x0_hat": x0_hat})
        x = x_next
        if trajectory is not None:
            trajectory[i + 1] = x
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{solver}: denoiser produced non-finite values (the sample contains NaN or inf)")
    return (x, trajectory) if return_trajectory else x


class CountingDenoiser:
    """Wraps a denoiser and counts its calls in `.nfe` (one call on a batch is one function evaluation)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x, sigma, *levels, **cond):  # *levels: a flow map's sigma_to (solvers/flow_map.py)
        self.nfe += 1
        return self.denoiser(x, sigma, *levels, **cond)

    def reset(self):
        self.nfe = 0


def one_nfe_per_step(sample, name):
    """Attach the NFE budget of a solver that spends one evaluation per step: n steps for n NFE, no options."""
    def steps_for_nfe(nfe):
        """One evaluation per step: n steps for n NFE."""
        return check_nfe(nfe, name)

    def options_for_nfe(nfe):
        check_nfe(nfe, name)
        return {}

    sample.steps_for_nfe = steps_for_nfe
    sample.options_for_nfe = options_for_nfe
    return sample


def check_nfe(nfe, solver):
    """An NFE budget must be an integer >= 1."""
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"{solver}: nfe must be an integer >= 1, got {nfe!r}")
    return int(nfe)
