"""The multi-role loop: a role's parameters get gradients and optimiser steps only in its own phase, per-role
optimiser settings (declared by the objective, overridden by optim.<role>.*), exact resume with two roles, gradient
accumulation, and a 2-process gloo run."""
import pytest
import torch

from objectives import OBJECTIVES
from runs.checkpoint import load_checkpoint
from runs.train import main, make_config, parse_args, train
from tests.roles import changed, snapshot
from tests.test_train import assert_same_state
from tests.two_roles import TwoRoles

TOY = ["--objective", "two_roles", "--backbone", "mlp", "--data", "gmm", "data.n=256", "backbone.hidden=16",
       "backbone.num_blocks=1", "train.batch_size=32", "train.log_every=1", "train.ckpt_every=2",
       "train.warmup_steps=0", "train.seed=5"]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "two_roles", TwoRoles)


def config_for(*extra):
    return make_config(parse_args(TOY + list(extra)))[0]



def test_each_role_changes_and_gets_gradients_only_in_its_phases(tmp_path, monkeypatch):
    snapshots, teachers = [], []
    original = TwoRoles.after_step

    def record(self, role, step):
        snapshots.append((role, snapshot(self)))
        teachers.append(self.teacher.weight.detach().clone())
        original(self, role, step)

    monkeypatch.setattr(TwoRoles, "after_step", record)
    objective, _ = train(config_for("train.steps=4"), tmp_path / "run")
    assert [role for role, _ in snapshots] == ["denoiser", "critic", "critic", "denoiser", "critic", "critic"]
    for (_, before), (role, after) in zip(snapshots, snapshots[1:]):
        assert changed(before, after) == [role]
    assert all(torch.equal(t, teachers[0]) for t in teachers)
    assert objective.gradients and all(phase == role for phase, role in objective.gradients)
    assert {role for _, role in objective.gradients} == {"denoiser", "critic"}


def test_role_settings_come_from_train_then_the_objective_then_optim(tmp_path):
    objective, sampling = train(config_for("train.steps=2", "train.lr=3e-4", "optim.denoiser.optimizer=radam",
                                           "optim.critic.lr=5e-3"), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run")
    optim = state["config"]["optim"]
    assert optim["denoiser"]["optimizer"] == "radam" and optim["denoiser"]["lr"] == 3e-4
    assert optim["critic"]["optimizer"] == "adamw" and optim["critic"]["lr"] == 5e-3  # user over objective
    assert optim["critic"]["weight_decay"] == 0.01 and optim["critic"]["ema"] is False
    assert state["optimizers"]["critic"]["param_groups"][0]["weight_decay"] == 0.01
    assert state["optimizers"]["critic"]["param_groups"][0]["lr"] == 5e-3
    # EMA off: sampling (and the checkpoint's "ema") use the raw critic weights
    assert sampling["critic"] is objective.networks["critic"]
    for name, value in state["networks"]["critic"].items():
        assert torch.equal(value, state["ema"]["critic"][name])


def test_two_role_resume_is_bit_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config_for("train.steps=6", "optim.denoiser.optimizer=adamw"), straight)
    train(config_for("train.steps=2", "optim.denoiser.optimizer=adamw"), stopped)
    train(make_config(parse_args(["--resume", str(stopped), "train.steps=6"]))[0], stopped, resume=True)
    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a["step"] == b["step"] == 6
    assert_same_state(a, b)
    for role in ("denoiser", "critic"):
        assert a["optimizers"][role]["state"], role


def test_gradient_accumulation_matches_the_whole_batch(tmp_path, monkeypatch):
    # Deterministic loss (no fresh noise per call), so micro-batches of 8 must give the gradient of the batch of 32.
    def loss(self, role, batch, step):
        x0, _ = batch
        sigma = torch.full((x0.shape[0],), 0.7)
        out = self.networks[role](x0 * 1.3, sigma)
        value = (out - x0).square().mean()
        return value, {"loss": value.detach()}

    monkeypatch.setattr(TwoRoles, "loss", loss)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config_for("train.steps=3"), whole)
    train(config_for("train.steps=3", "train.micro_batch=8"), parts)
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    for role in a["networks"]:
        for name, value in a["networks"][role].items():
            torch.testing.assert_close(value, b["networks"][role][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("optim.fake_score.lr=1e-4", "names role(s) fake_score that objective TwoRoles does not have"),
    ("optim.critic.optimizer=sgd", "optim.critic.optimizer='sgd' is not accepted; it takes one of: adam"),
    ("optim.critic.lr=-1", "optim.critic.lr=-1.0 is not accepted"),
    ("optim.critic=1", "is not of the form optim.<role>.<key>=value"),
    ("train.micro_batch=5", "does not split into"),
])
def test_bad_role_settings_are_one_line_and_exit_2(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(TOY + ["train.steps=1", "--out", str(run), override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (run / "checkpoint.pt").exists()


def test_two_roles_under_torchrun_with_two_processes(tmp_path, run_cli):
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/two_roles.py",
                     *TOY, "train.steps=3", "--out", tmp_path / "ddp", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ddp")
    assert state["step"] == 3 and set(state["networks"]) == {"denoiser", "critic"}
    assert all(torch.isfinite(t).all() for net in state["networks"].values() for t in net.values())


def test_trajectories_for_an_objective_without_rollouts_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--objective", "sid", "--backbone", "mlp", "--data", "gmm", "--trajectories", str(tmp_path / "pairs"),
              "train.steps=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "learns from no teacher rollouts; drop --trajectories" in err
    assert not (tmp_path / "run").exists()
