"""ODE samplers over a denoiser and a sigma schedule (EDM / k-diffusion variance-exploding convention).

    sigmas = sigmas_for_nfe("heun", nfe=9)                      # karras grid, 5 steps
    x0 = SOLVERS["heun"](denoiser, sigmas[0] * z, sigmas, **options_for_nfe("heun", 9))

A sampler is `sample(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False, **options)`
with x = sigmas[0] * z and sigmas strictly decreasing and ending in 0 (n steps = n + 1 entries). It
carries `steps_for_nfe(nfe)` and `options_for_nfe(nfe)`, so that a budget of NFE evaluations is met
exactly; wrap the denoiser in `CountingDenoiser` to measure it. Classifier-free guidance is a denoiser
wrapper, `guided(denoiser, w, interval)` (solvers/guidance.py), so every solver takes it unchanged.
Registries are plain dicts, open to users: SOLVERS["mine"] = my_sampler.
"""
import inspect

from .common import CountingDenoiser
from .consistency import consistency_step, sample_consistency
from .ddim import ddim_step, sample_ddim
from .dpm_solver import dpm_solver_step, sample_dpm_solver_1, sample_dpm_solver_2, sample_dpm_solver_3
from .dpmpp import (dpmpp_2m_sde_step, dpmpp_2m_step, dpmpp_2s_step, dpmpp_3m_step, sample_dpmpp_2m,
                    sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m)
from .euler import euler_step, sample_euler
from .flow_map import flow_map_levels, sample_flow_map
from .guidance import GuidedDenoiser, guided
from .heun import heun_step, sample_heun
from .multistep import deis_step, ipndm_step, lms_step, sample_deis, sample_ipndm, sample_lms
from .stochastic import edm_stochastic_step, euler_ancestral_step, sample_edm_stochastic, sample_euler_ancestral
from .unipc import sample_unipc, sample_unipc_bh1, sample_unipc_bh2, unipc_step
from .schedules import (SCHEDULES, explicit, from_file, karras, logsnr, polyexponential, schedule_kwargs, uniform_t,
                        vp_sigma, vp_t)

SOLVERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpm_solver_1": sample_dpm_solver_1,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "euler_ancestral": sample_euler_ancestral,
    "edm_stochastic": sample_edm_stochastic,
    "lms": sample_lms,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
    "unipc_bh1": sample_unipc_bh1,
    "unipc_bh2": sample_unipc_bh2,
}


def get_solver(solver):
    """A sampler by name from SOLVERS, or a sampler function passed through."""
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[solver]


def get_schedule(schedule):
    """A schedule by name from SCHEDULES, or a schedule function passed through."""
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[schedule]


def _nfe_companion(sample, attribute):
    companion = getattr(sample, attribute, None)
    if companion is None:
        raise ValueError(f"solver {getattr(sample, '__name__', sample)!r} has no {attribute}(nfe); "
                         f"attach one to the sampler function")
    return companion


def sigmas_for_nfe(solver, nfe, schedule="karras", **schedule_kwargs):
    """The schedule (n + 1 float64 sigmas ending in 0) for which `solver` spends exactly `nfe` evaluations,
    given the options from options_for_nfe(solver, nfe)."""
    n_steps = _nfe_companion(get_solver(solver), "steps_for_nfe")(nfe)
    schedule_fn = get_schedule(schedule)
    try:
        inspect.signature(schedule_fn).bind(n_steps, **schedule_kwargs)
    except TypeError as error:
        raise ValueError(f"schedule {getattr(schedule_fn, '__name__', schedule)!r}: {error}") from None
    return schedule_fn(n_steps, **schedule_kwargs)


def options_for_nfe(solver, nfe):
    """The sampler options that go with sigmas_for_nfe(solver, nfe) (e.g. heun's euler_first_steps)."""
    return dict(_nfe_companion(get_solver(solver), "options_for_nfe")(nfe))


__all__ = [
    "SOLVERS", "SCHEDULES", "schedule_kwargs", "CountingDenoiser", "sample_euler", "sample_heun", "euler_step", "heun_step",
    "sample_ddim", "ddim_step", "sample_euler_ancestral", "euler_ancestral_step", "sample_edm_stochastic",
    "edm_stochastic_step", "sample_lms", "lms_step", "sample_ipndm", "ipndm_step", "sample_deis", "deis_step",
    "sample_unipc", "sample_unipc_bh1", "sample_unipc_bh2", "unipc_step", "sample_dpm_solver_1",
    "sample_dpm_solver_2", "sample_dpm_solver_3", "dpm_solver_step", "sample_dpmpp_2s", "dpmpp_2s_step",
    "sample_dpmpp_2m", "dpmpp_2m_step", "sample_dpmpp_3m", "dpmpp_3m_step", "sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_step",
    "karras", "uniform_t", "logsnr", "polyexponential", "explicit", "from_file", "vp_sigma", "vp_t",
    "get_solver", "get_schedule", "sigmas_for_nfe", "options_for_nfe", "guided", "GuidedDenoiser",
]
