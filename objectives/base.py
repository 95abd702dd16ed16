"""The objective contract (see DESIGN.md): an objective declares its trainable networks by role and the loss of
each role; the training loop owns optimisers, EMA, AMP, clipping, DDP and checkpoints.

    networks: dict[str, nn.Module]                      trainable, by role
    phases(step) -> list[str]                           roles to update this step, in order
    loss(role, batch, step) -> (scalar Tensor, dict)    the loss of one role and what to log
    generate(z, nfe, cond=None) -> Tensor               how the trained model samples from unit noise z
    denoiser() -> D(x, sigma, **cond) or None           a denoiser any solver can sample, when the method has one
    after_step(role, step)                              after the role's optimiser step (a target EMA, say)
    fresh_optimizer(role, step) -> bool                 clear the role's optimiser state before this step

Objectives call their networks through `self.networks[role]` at call time, so the loop can swap in EMA weights,
DDP or compiled wrappers without the objective knowing; facts about a network (its parameterisation, whether it takes
labels) are recorded at construction, since a wrapper does not expose the module's attributes.
"""
import contextlib
import copy
import functools

import torch

from data.trajectories import saved_sigmas
from models.denoiser import Denoiser
from models.flow_map import FlowMap
from models.generator import TimeGenerator
from solvers import (SCHEDULES, SOLVERS, ddim_step, dpm_solver_step, dpmpp_2s_step, euler_step, heun_step,
                     schedule_kwargs, sigmas_for_nfe)


# One-step ODE updates an objective takes with its teacher (BOOT's signal step, consistency distillation's
# x_lo): (x_next, x0_hat) = step(teacher, x, sigma, sigma_next, cond=...), sigmas as floats or [B] tensors.
TEACHER_STEPS = {
    "euler": euler_step,
    "ddim": ddim_step,
    "heun": heun_step,
    "dpmpp_2s": dpmpp_2s_step,
    "dpm_solver_2": functools.partial(dpm_solver_step, order=2),
}


def pick(registry, name, what):
    """registry[name], or a one-line ValueError that lists the known names."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def choose(name, choices, what):
    """`name` if it is one of `choices`, else a one-line ValueError that lists them."""
    pick(dict.fromkeys(choices), name, what)
    return name


@contextlib.contextmanager
def using_networks(objective, networks):
    """Temporarily run `objective` with other modules for its roles (EMA weights for sampling, say)."""
    saved = objective.networks
    objective.networks = {**saved, **networks}
    try:
        yield objective
    finally:
        objective.networks = saved


class Objective:
    """Base class. Everything the training loop, the sampler and the reports read from an objective is declared here
    with its default; a subclass overrides what it needs (the loop never probes with hasattr)."""

    needs_teacher = False   # the loop builds a frozen teacher (--teacher RUN, or an analytic one) and passes teacher=
    needs_data = True       # the method learns from real data (False: teacher-only / data-free, e.g. BOOT, DMD)
    needs_labels = False    # class-conditional only (guidance distillation): train.conditional defaults to true
    rollouts = None         # dict(solver, nfe, schedule, sigma_min, sigma_max, rho, save_sigmas, n): learns from
    rollout_sigmas = None   # teacher rollouts, saved at these sigmas [K]; batches are then (z, xs, labels)
    eval_nfe = None         # NFE of the loop's sample grids and quality report; None: train.sample_nfe
    trained_steps = None    # set by the loop at the end of training: the steps actually trained (train.minutes may
                            # stop a run before train.steps)
    learns_teacher_map = True  # a student trained to reproduce its teacher's ODE map z -> x0 (False: it matches the
                               # data distribution instead, e.g. DMD, SiD; its report compares distributions only)
    few_step = False        # a one- or few-step generator, distilled or trained without a teacher, that `python -m
                            # runs.bench leaderboard` ranks (False: teacher training, guidance methods)

    def __init__(self):
        self.networks = {}

    def optimizer_settings(self):
        """Per-role optimisation defaults {role: {key: value}} over the loop's train.* values, e.g.
        {"fake_score": {"lr": 1e-4, "ema": False}}. Keys (runs.config.RoleSettings): optimizer ("adam", "adamw",
        "radam"), lr, betas, weight_decay, warmup_steps, grad_clip, ema, ema_halflife_kimg. The user's
        `optim.<role>.<key>=...` overrides win over these."""
        return {}

    def sampler(self):
        """(solver, schedule, schedule_kwargs) for a method that samples by integrating its denoiser (a diffusion
        teacher, rectified flow); None for methods that sample with their own `generate`."""
        return None

    def state_dict(self):
        """The objective's own training state (a curriculum's stage, a target network), saved in checkpoints."""
        return {}

    def load_state_dict(self, state):
        """Restore what state_dict() returned."""

    def phases(self, step):
        return list(self.networks)

    def after_step(self, role, step):
        """Called by the loop after `role`'s optimiser step at `step` (e.g. a consistency model's target EMA)."""

    def fresh_optimizer(self, role, step):
        """True where the loop should clear `role`'s optimiser state before this step (Adam's moments and step
        count start again), e.g. at a progressive-distillation stage boundary. A pure function of the step, so a
        resumed run clears at the same steps."""
        return False

    def loss(self, role, batch, step):
        raise NotImplementedError(f"{type(self).__name__} does not define loss() for role {role!r}")

    def generate(self, z, nfe, cond=None):
        raise NotImplementedError(f"{type(self).__name__} does not define generate()")

    def denoiser(self):
        return None

    def to(self, device):
        """Move every module and tensor the objective holds (teacher, frozen distance networks, constants such as
        saved sigmas) to `device`, so that a training step copies nothing from the host."""
        for name, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                value.to(device)
            elif isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


def unwrap(net):
    """The module inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(getattr(net, "module", None), torch.nn.Module):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), torch.nn.Module):
            net = net._orig_mod
        else:
            return net


def frozen_copy(net, state=None):
    """A frozen (requires_grad False, eval mode) copy of the module inside `net`'s wrappers, optionally loaded with
    `state`: a progressive stage's teacher, TRACT's phase teacher and self-teacher, a consistency model's target."""
    copied = copy.deepcopy(unwrap(net))
    if state is not None:
        copied.load_state_dict(state)
    return copied.requires_grad_(False).eval()


def init_from_teacher(student_backbone, teacher, allow_missing=()):
    """Copy a trained teacher's backbone weights into `student_backbone` (Luhman & Luhman 2021, Salimans & Ho 2022,
    DSNO and BOOT all start the student from the teacher). Parameters whose names start with a prefix in
    `allow_missing` (layers the student adds, e.g. fno's temporal layers) keep their own initialisation.

    Returns True when weights were copied, False when the teacher has no backbone (an analytic teacher: the student
    keeps its random initialisation). A student whose shapes cannot take the teacher's weights is a ValueError.
    """
    source = getattr(teacher, "backbone", None)
    if source is None:
        return False
    theirs, ours = source.state_dict(), student_backbone.state_dict()
    extra = [k for k in ours if k not in theirs and not k.startswith(tuple(allow_missing))]
    unused = [k for k in theirs if k not in ours]
    if extra or unused:
        raise ValueError(f"the student backbone ({type(student_backbone).__name__}) cannot take the teacher's weights "
                         f"({type(source).__name__}): " + "; ".join(
                             ([f"student has {len(extra)} parameters the teacher lacks, e.g. {extra[0]!r}"] if extra else [])
                             + ([f"teacher has {len(unused)} the student lacks, e.g. {unused[0]!r}"] if unused else []))
                         + ". Build the student with the teacher's backbone settings")
    for key, value in theirs.items():
        if ours[key].shape != value.shape:
            raise ValueError(f"the student backbone cannot take the teacher's weights: {key!r} has shape "
                             f"{list(ours[key].shape)} in the student and {list(value.shape)} in the teacher. "
                             "Build the student with the teacher's backbone settings")
    student_backbone.load_state_dict(theirs, strict=False)
    return True


def teacher_preconditioning(teacher, parameterisation, sigma_data, default="edm"):
    """(parameterisation, sigma_data) of a student Denoiser: "teacher" / None mean the trained teacher's own (its
    weights only mean something under its preconditioning), else `default` / 0.5 for an analytic teacher."""
    if parameterisation == "teacher":
        parameterisation = getattr(teacher, "parameterisation", default)
    if sigma_data is None:
        sigma_data = getattr(teacher, "sigma_data", 0.5) if hasattr(teacher, "backbone") else 0.5
    return parameterisation, float(sigma_data)


def student_denoiser(backbone, teacher, parameterisation="teacher", sigma_data=None, default="edm"):
    """(Denoiser over `backbone` with teacher_preconditioning's choice, whether it took the teacher's weights)."""
    parameterisation, sigma_data = teacher_preconditioning(teacher, parameterisation, sigma_data, default)
    initialised = init_from_teacher(backbone, teacher)
    return Denoiser(backbone, parameterisation, sigma_data), initialised


def flow_map_student(backbone, teacher, parameterisation="teacher", sigma_data=None, default="edm"):
    """(models.flow_map.FlowMap over `backbone` given a second time input, whether it took the teacher's weights):
    with them it computes the teacher's Euler step for every jump until it trains (CTM's initialisation)."""
    parameterisation, sigma_data = teacher_preconditioning(teacher, parameterisation, sigma_data, default)
    flow_map = FlowMap(backbone, parameterisation, sigma_data)
    initialised = init_from_teacher(flow_map.backbone, teacher,
                                    allow_missing=getattr(type(flow_map.backbone), "TARGET_PREFIXES", ()))
    return flow_map, initialised


def one_step_sample(denoiser, z, sigma_max, class_labels=None):
    """D(sigma_max z, sigma_max): one Euler step from sigma_max to 0 on unit noise z, the sample of a one-step
    student that is a denoiser (kd's Denoising Student, reflow's distilled flow)."""
    return denoiser(sigma_max * z, z.new_full((z.shape[0],), sigma_max), class_labels)


def renoising_chain(student, z, sigmas, labels=None):
    """The few-step sampler of a generator that denoises from any level (DMD2's sampling and backward simulation,
    ADD, UFOGen): x = s_0 z, then x = student(x, s_k) + s_{k+1} n_k with fresh noise n_k for k < K - 1. Returns
    (x, s_{K-1}), the input of the last step: the sample is student(x, s_{K-1}), left to the caller so that it can
    take that step on the graph (the steps here run under the caller's grad mode)."""
    x = sigmas[0] * z
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        x0_hat = student(x, z.new_full((z.shape[0],), float(sigma)), labels)
        x = x0_hat + sigma_next * torch.randn_like(x0_hat)
    return x, sigmas[-1]


def time_generator_student(backbone, teacher, sigma_max, sigma_min):
    """A models.generator.TimeGenerator over `backbone` (BOOT's g, DSNO's operator), started from the teacher's
    weights when it has any (a trajectory backbone's extra layers, its TEACHER_FREE_PREFIXES, keep their init)."""
    init_from_teacher(backbone, teacher, allow_missing=getattr(type(backbone), "TEACHER_FREE_PREFIXES", ()))
    parameterisation, sigma_data = teacher_preconditioning(teacher, "teacher", None)
    return TimeGenerator(backbone, sigma_max=float(sigma_max), sigma_min=float(sigma_min),
                         parameterisation=parameterisation, sigma_data=sigma_data)


def rollout_plan(solver, nfe, schedule, sigma_min, sigma_max, rho, save_sigmas, n):
    """(self.rollouts dict, self.rollout_sigmas [K]) for an objective that learns from teacher rollouts."""
    pick(SOLVERS, solver, "rollout solver")
    pick(SCHEDULES, schedule, "rollout schedule")
    grid = sigmas_for_nfe(solver, nfe, schedule, **schedule_kwargs(schedule, sigma_min, sigma_max, rho))
    rollouts = dict(solver=solver, nfe=int(nfe), schedule=schedule, sigma_min=float(sigma_min),
                    sigma_max=float(sigma_max), rho=float(rho), save_sigmas=save_sigmas, n=int(n))
    return rollouts, saved_sigmas(grid, save_sigmas)
