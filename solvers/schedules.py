"""Noise-level schedules: n solver steps -> n + 1 float64 sigmas, strictly decreasing, ending in 0.

- karras: EDM (Karras et al. 2022, eq. 5), sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho, built on linspace(0, 1, n) as k-diffusion does, so n = 1 gives [sigma_max, 0].
- uniform_t: the VP process with linear beta (Song et al. 2021), uniform in t, with
  sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and its inverse
  t(sigma) = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d.
- logsnr: uniform in log sigma (DPM-Solver's "logSNR" grid; log-SNR = -2 log sigma).
- polyexponential: k-diffusion's, sigma = exp(u^rho (log sigma_max - log sigma_min) + log sigma_min),
  u = linspace(1, 0, n); rho = 1 is logsnr.
- flow_uniform: rectified flow's Euler grid (Liu et al. 2023), uniform in t = sigma / (1 + sigma) from t(sigma_max)
  down to t(sigma_min); with the default sigma_min = 0 the n steps end exactly at t = 0, as RF samples.
- explicit(values) / from_file(path): a given list, validated, with 0 appended when missing.
"""
import json
import math
import numbers
import re
from pathlib import Path

import torch

from models.noise import flow_sigma, flow_t, vp_sigma, vp_t  # the shared process math lives once, in models.noise


def _check_steps(n, name):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} schedule: the number of steps n must be an integer >= 1, got {n!r}")


def _number(value, what, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} schedule: {what} must be a number, got {value!r}")
    return float(value)


def _check_range(sigma_min, sigma_max, name):
    sigma_min, sigma_max = _number(sigma_min, "sigma_min", name), _number(sigma_max, "sigma_max", name)
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"{name} schedule: need 0 < sigma_min < sigma_max (finite), "
                         f"got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _check_positive(value, what, name):
    value = _number(value, what, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} schedule: {what} must be finite and > 0, got {value}")


def _append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM/Karras: uniform in sigma^(1/rho), rho = 7 by default (dense near sigma_min)."""
    _check_steps(n, "karras")
    _check_range(sigma_min, sigma_max, "karras")
    _check_positive(rho, "rho", "karras")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def uniform_t(n, sigma_min=None, sigma_max=None, beta_min=0.1, beta_d=19.9, eps_s=1e-3):
    """VP (linear beta) uniform in t; by default t from 1 to eps_s (sigma 152.17 to 0.0105).

    A given sigma_max / sigma_min replaces the t end it sets: t runs uniformly from t(sigma_max) to
    t(sigma_min), with the process's own beta_min/beta_d (unlike EDM, which refits beta to the range).
    """
    _check_steps(n, "uniform_t")
    _check_positive(beta_d, "beta_d", "uniform_t")
    if not (math.isfinite(_number(beta_min, "beta_min", "uniform_t")) and beta_min >= 0):
        raise ValueError(f"uniform_t schedule: beta_min must be finite and >= 0, got {beta_min}")
    if not 0 < _number(eps_s, "eps_s", "uniform_t") < 1:
        raise ValueError(f"uniform_t schedule: eps_s must be in (0, 1), got {eps_s}")
    for what, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None:
            _check_positive(value, what, "uniform_t")
    t_max = 1.0 if sigma_max is None else vp_t(sigma_max, beta_min, beta_d).item()
    t_min = eps_s if sigma_min is None else vp_t(sigma_min, beta_min, beta_d).item()
    if not t_min < t_max:
        low = sigma_min if sigma_min is not None else vp_sigma(eps_s, beta_min, beta_d).item()
        high = sigma_max if sigma_max is not None else vp_sigma(1.0, beta_min, beta_d).item()
        raise ValueError(f"uniform_t schedule: need sigma_min < sigma_max, got {low:.6g} and {high:.6g}")
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    return _append_zero(vp_sigma(t, beta_min, beta_d))


def logsnr(n, sigma_min=0.002, sigma_max=80.0):
    """Uniform in log sigma (= uniform in log-SNR)."""
    _check_steps(n, "logsnr")
    _check_range(sigma_min, sigma_max, "logsnr")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def flow_uniform(n, sigma_min=0.0, sigma_max=80.0):
    """Uniform in rectified-flow time t = sigma / (1 + sigma); sigma_min = 0 puts the n steps' end at t = 0."""
    _check_steps(n, "flow_uniform")
    if sigma_min == 0:
        _check_positive(sigma_max, "sigma_max", "flow_uniform")
        sigmas = flow_sigma(torch.linspace(flow_t(float(sigma_max)), 0, n + 1, dtype=torch.float64))
    else:
        _check_range(sigma_min, sigma_max, "flow_uniform")
        t = torch.linspace(flow_t(float(sigma_max)), flow_t(float(sigma_min)), n, dtype=torch.float64)
        sigmas = _append_zero(flow_sigma(t))
    sigmas[0] = sigma_max  # exactly, not t(sigma_max) / (1 - t(sigma_max)) rounded
    return sigmas


def polyexponential(n, sigma_min=0.002, sigma_max=80.0, rho=1.0):
    """k-diffusion's polyexponential: log sigma follows u^rho; rho = 1 is uniform in log sigma."""
    _check_steps(n, "polyexponential")
    _check_range(sigma_min, sigma_max, "polyexponential")
    _check_positive(rho, "rho", "polyexponential")
    u = torch.linspace(1, 0, n, dtype=torch.float64)
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((u ** rho * (log_max - log_min) + log_min).exp())


def explicit(values):
    """A given list of sigmas, checked (finite, > 0, strictly decreasing), with 0 appended if missing."""
    try:
        sigmas = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"explicit schedule: expected a 1-D list of numbers, got {type(values).__name__}") from None
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(f"explicit schedule: expected a non-empty 1-D list of sigmas, got shape {list(sigmas.shape)}")
    if sigmas[-1] == 0:
        sigmas = sigmas[:-1]
    if not torch.isfinite(sigmas).all() or not (sigmas > 0).all():
        raise ValueError(f"explicit schedule: sigmas must be finite and > 0 (a final 0 is allowed), "
                         f"got {sigmas.tolist()[:8]}")
    if sigmas.numel() == 0:
        raise ValueError("explicit schedule: need at least one sigma > 0 before the final 0")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"explicit schedule: sigmas must be strictly decreasing, got {sigmas.tolist()[:8]}")
    return _append_zero(sigmas)


def from_file(path):
    """Sigmas read from a text file (numbers separated by whitespace or commas, '#' comments) or a
    .json list; validated as by `explicit`, with 0 appended if missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"schedule file {path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError(f"schedule file {path}: expected a JSON list of numbers")
    else:
        tokens = re.split(r"[\s,]+", re.sub(r"#[^\n]*", "", text).strip())
        values = []
        for token in filter(None, tokens):
            try:
                values.append(float(token))
            except ValueError:
                raise ValueError(f"schedule file {path}: {token!r} is not a number") from None
    try:
        return explicit(values)
    except ValueError as error:
        raise ValueError(f"schedule file {path}: {error}") from None


def schedule_kwargs(schedule, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The keyword arguments a run's (sigma_min, sigma_max, rho) settings give `schedule`: rho goes to karras only
    (polyexponential keeps its own rho = 1 default unless called directly). One convention for sampling, rollouts
    and objectives, so a store's grid equals the one an objective computes from the same settings."""
    kwargs = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max))
    return {**kwargs, "rho": float(rho)} if schedule in ("karras", karras) else kwargs


SCHEDULES = {
    "karras": karras,
    "uniform_t": uniform_t,
    "logsnr": logsnr,
    "polyexponential": polyexponential,
    "flow_uniform": flow_uniform,
}
