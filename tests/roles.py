"""Shared by the multi-role tests: train an objective through runs.train while recording, at every optimiser step,
which role's weights changed, and, for every gradient a parameter received, the phase being trained and the role
the parameter belongs to."""
import torch

import runs.train
from runs.build import build_objective
from runs.train import make_config, parse_args, train
from tests.test_distribution_matching import RUN, mlp_teacher


def snapshot(objective):
    return {role: [p.detach().clone() for p in net.parameters()] for role, net in objective.networks.items()}


def changed(before, after):
    return sorted(role for role in before if any(not torch.equal(a, b) for a, b in zip(before[role], after[role])))


def train_recording_roles(monkeypatch, run_dir, objective_class, name, steps=3, extra=()):
    """Train `name` (class `objective_class`) on the 2-D mixture with a small MLP teacher for `steps` steps. Returns
    (objective, config, teacher, its weights before, [(role stepped, snapshot after)], [(phase, role of the
    parameter that got a gradient)])."""
    teacher = mlp_teacher(32)
    frozen = [p.detach().clone() for p in teacher.parameters()]
    snapshots, gradients, phase = [], [], []

    def build(config, **injected):
        objective = build_objective(config, **injected)
        for role, net in objective.networks.items():
            for p in net.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p, role=role: gradients.append((phase[-1], role)))
        return objective

    loss, after_step = objective_class.loss, objective_class.after_step
    monkeypatch.setattr(runs.train, "build_objective", build)
    monkeypatch.setattr(objective_class, "loss", lambda self, role, *args: phase.append(role) or loss(self, role, *args))
    monkeypatch.setattr(objective_class, "after_step", lambda self, role, step: snapshots.append((role, snapshot(self)))
                        or after_step(self, role, step))
    config, dataset = make_config(parse_args(["--backbone", "mlp", "--objective", name, "--data", "gmm", *RUN,
                                              f"train.steps={steps}", "train.warmup_steps=0",
                                              f"train.ckpt_every={steps}", "train.log_every=1", *extra]))
    objective, _ = train(config, run_dir, teacher=teacher, dataset=dataset)
    return objective, config, teacher, frozen, snapshots, gradients


def assert_roles_change_only_in_their_phases(objective, teacher, frozen, snapshots, gradients, roles):
    for (_, before), (role, after) in zip(snapshots, snapshots[1:]):
        assert changed(before, after) == [role]
    assert gradients and all(phase == role for phase, role in gradients)
    assert {role for _, role in gradients} == set(roles)
    assert objective.teacher is teacher and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))
