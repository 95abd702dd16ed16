"""The objective contract (see DESIGN.md): an objective declares its trainable networks by role and the loss of
each role; the training loop owns optimisers, EMA, AMP, clipping, DDP and checkpoints.

    networks: dict[str, nn.Module]                      trainable, by role
    phases(step) -> list[str]                           roles to update this step, in order
    loss(role, batch, step) -> (scalar Tensor, dict)    the loss of one role and what to log
    generate(z, nfe, cond=None) -> Tensor               how the trained model samples from unit noise z
    denoiser() -> D(x, sigma, **cond) or None           a denoiser any solver can sample, when the method has one

Objectives call their networks through `self.networks[role]` at call time, so the loop can swap in EMA weights,
DDP or compiled wrappers without the objective knowing; facts about a network (its parameterisation, whether it takes
labels) are recorded at construction, since a wrapper does not expose the module's attributes.
"""
import contextlib


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
    """Base class: one trainable role called "model" unless a subclass says otherwise."""

    needs_teacher = False

    def __init__(self):
        self.networks = {}

    def phases(self, step):
        return list(self.networks)

    def loss(self, role, batch, step):
        raise NotImplementedError(f"{type(self).__name__} does not define loss() for role {role!r}")

    def generate(self, z, nfe, cond=None):
        raise NotImplementedError(f"{type(self).__name__} does not define generate()")

    def denoiser(self):
        return None
