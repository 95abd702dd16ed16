"""The training loop: exact resume, NaN stop with the last good checkpoint kept, atomic checkpoints, config errors."""
import json

import pytest
import torch

import runs.checkpoint as checkpoint
from models import BACKBONES
from objectives.dsm import DSM
from runs.checkpoint import load_checkpoint, save_checkpoint
from runs.batches import BatchOrder
from runs.train import make_config, parse_args, train

TOY = ["--backbone", "mlp", "--data", "moons", "data.n=512", "backbone.hidden=32", "backbone.num_blocks=2",
       "train.batch_size=64", "train.log_every=1", "train.ckpt_every=3", "train.warmup_steps=2", "train.seed=3",
       "backbone.dropout=0.1"]


def config_for(*extra):
    return make_config(parse_args(TOY + list(extra)))[0]


def assert_same_state(a, b):
    for key in ("networks", "ema"):
        for role in a[key]:
            for name, tensor in a[key][role].items():
                assert torch.equal(tensor, b[key][role][name]), f"{key}/{role}/{name} differs"
    for role in a["optimizers"]:
        for index, state in a["optimizers"][role]["state"].items():
            for name, tensor in state.items():
                assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizers"][role]["state"][index][name]))


def test_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    train(config_for("train.steps=7"), straight)
    stopped = tmp_path / "stopped"
    train(config_for("train.steps=3"), stopped)
    assert load_checkpoint(stopped)["step"] == 3
    train(make_config(parse_args(["--resume", str(stopped), "train.steps=7"]))[0], stopped, resume=True)
    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a["step"] == b["step"] == 7
    assert_same_state(a, b)
    lines = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))


def test_time_budget_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    """train.minutes stops the run at the first step boundary past the budget, checkpoints there, and a resume
    continues exactly as a run never stopped. The loop's clock is faked: each reading advances one minute."""
    import runs.train
    straight = tmp_path / "straight"
    train(config_for("train.steps=7"), straight)
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr(runs.train.time, "time", lambda: float(next(clock)))
    budget = tmp_path / "budget"
    objective, _ = train(config_for("train.steps=7", "train.minutes=4", "train.ckpt_every=100"), budget)
    monkeypatch.undo()
    stopped_at = load_checkpoint(budget)["step"]
    assert objective.trained_steps == stopped_at and 1 <= stopped_at < 7
    train(make_config(parse_args(["--resume", str(budget), "train.minutes=0"]))[0], budget, resume=True)
    assert_same_state(load_checkpoint(straight), load_checkpoint(budget))


def test_resume_truncates_log_lines_written_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(config_for("train.steps=4"), run)  # checkpoint at 3 and 4, logs 1..4
    state = load_checkpoint(run)
    state["step"] = 3
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, run / "checkpoint.pt")
    train(make_config(parse_args(["--resume", str(run), "train.steps=5"]))[0], run, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = DSM.loss

    def poisoned(self, role, batch, step):
        loss, logs = original(self, role, batch, step)
        return (loss * float("nan"), logs) if step >= 4 else (loss, logs)

    monkeypatch.setattr(DSM, "loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="at step 4.*step 3"):
        train(config_for("train.steps=10"), run)
    state = load_checkpoint(run)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["networks"]["denoiser"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_truncated_or_foreign_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="not a fastdiff-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": BatchOrder}, path)  # a class, as pickled modules would be
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_batch_order_is_a_function_of_the_step_and_splits_across_ranks():
    order = BatchOrder(100, 20, seed=1)
    first = [order(k) for k in range(12)]
    assert sorted(sum(first[:5], [])) == list(range(100))  # an epoch covers the data once
    assert first[5] != first[0]  # a new permutation each epoch
    fresh = BatchOrder(100, 20, seed=1)
    assert fresh(7) == first[7]
    ranks = [BatchOrder(100, 20, seed=1, rank=r, world=4)(7) for r in range(4)]
    assert sum(ranks, []) == first[7]
    with pytest.raises(ValueError, match="not divisible"):
        BatchOrder(100, 10, seed=0, world=3)


@pytest.mark.parametrize("args, message", [
    (["--backbone", "resnet"], "unknown backbone 'resnet'; known: " + ", ".join(sorted(BACKBONES))),
    (["--objective", "gan"], "unknown objective 'gan'; known: add, boot, cd, ct, "),
    (["backbone.chanels=3"], "takes no argument"),
    (["train.stepz=3"], "train takes no setting"),
    (["objective.parameterisation=score"], "unknown parameterisation"),
    (["data.path=/does/not/exist"], "/does/not/exist"),
    (["backbone.in_channels=3"], "does not match the data"),
    (["nonsense"], "section.key=value"),
    (["model.x=1"], "unknown section 'model'"),
])
def test_bad_configs_are_one_line_errors(args, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        config = make_config(parse_args(args))[0]
        from runs.build import build_objective
        build_objective(config)


@pytest.mark.parametrize("setting", ["train.amp=bf16", "train.compile=eager", "train.lr_decay=cosine"])
def test_loop_options_run_and_checkpoint_plain_weights(tmp_path, setting):
    run = tmp_path / "run"
    objective, ema = train(config_for("train.steps=2", setting), run)
    state = load_checkpoint(run)
    assert state["step"] == 2
    assert set(state["networks"]["denoiser"]) == set(objective.networks["denoiser"].state_dict())  # no wrapper prefixes
    assert all(torch.isfinite(t).all() for t in state["networks"]["denoiser"].values())


def test_distributed_data_parallel_on_cpu(tmp_path, run_cli):
    """torchrun with 2 processes (gloo): both ranks train on their half of each batch; rank 0 checkpoints."""
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "runs.train",
                     *TOY, "train.steps=3", "--out", tmp_path / "ddp", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(tmp_path / "ddp")
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["networks"]["denoiser"].values())
