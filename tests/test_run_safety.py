"""Every command as a new user runs it: values checked like names (one line, exit 2, nothing written), a run
directory belongs to one run, nothing already done is lost on a kill, and the kept checkpoint is always finite."""
import os
import subprocess
import sys
import time

import pytest
import torch

from objectives.dsm import DSM
from runs import train as runs_train
from runs.checkpoint import load_checkpoint
from runs.train import make_config, parse_args, train

TOY = ["--backbone", "mlp", "--data", "moons", "data.n=256", "backbone.hidden=16", "backbone.num_blocks=1",
       "train.batch_size=32", "train.log_every=1", "train.warmup_steps=0"]


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runs_train.main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps='abc' is not accepted; it takes an integer >= 1"),
    ("train.steps=-5", "train.steps=-5 is not accepted; it takes an integer >= 1"),
    ("train.steps=20.5", "train.steps=20.5 is not accepted; it takes an integer >= 1"),
    ("train.batch_size=0", "train.batch_size=0 is not accepted"),
    ("train.ckpt_every=0", "train.ckpt_every=0 is not accepted"),
    ("train.lr=abc", "train.lr='abc' is not accepted; it takes a number >= 0"),
    ("backbone.hidden=abc", "backbone.hidden='abc' is not accepted; it takes an integer"),
    ("train.amp=fp8", "train.amp='fp8' is not accepted; it takes one of: auto, bf16, fp16, none"),
    ("objective.P_std=[1]", "objective.P_std=[1] is not accepted; it takes a number"),
    ("train.conditional=3", "train.conditional=3 is not accepted; it takes true or false"),
])
def test_bad_values_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    code, err = run_main(TOY + ["--out", str(run), override], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not run.exists()


def test_integral_floats_are_taken_as_integers():
    config = make_config(parse_args(TOY + ["train.steps=1e3"]))[0]
    assert config["train"]["steps"] == 1000 and isinstance(config["train"]["steps"], int)


@pytest.mark.parametrize("text, message", [
    ("train: {steps: 3\n", "is not a valid config file (line 2)"),
    ("train: !!python/object/apply:os.system [echo pwned]\n", "is not a valid config file"),
    ("- 1\n- 2\n", "a config is a mapping of sections"),
])
def test_bad_yaml_is_one_line(tmp_path, capsys, text, message):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    code, err = run_main(TOY + ["--config", str(preset), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_directory_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(run / 'lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); "
        "f.flush(); print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_main(TOY + ["--out", str(run), "train.steps=2"], capsys)
        assert code == 2 and f"is in use by another run (pid {holder.pid})" in err and err.count("\n") == 1
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    runs_train.main(TOY + ["--out", str(run), "train.steps=2"])  # the kernel dropped the dead holder's lock
    assert load_checkpoint(run)["step"] == 2


def test_a_second_run_into_a_finished_run_or_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    runs_train.main(TOY + ["--out", str(run), "train.steps=2"])
    code, err = run_main(TOY + ["--out", str(run), "train.steps=2"], capsys)
    assert code == 2 and "already holds a run: pass --resume" in err
    (run / "checkpoint.pt").unlink()  # as if killed before its first checkpoint
    code, err = run_main(TOY + ["--out", str(run), "train.steps=2", "train.lr=1e-3"], capsys)
    assert code == 2 and "holds another run's config.yaml" in err
    runs_train.main(TOY + ["--out", str(run), "train.steps=2"])  # the same run again: allowed
    assert load_checkpoint(run)["step"] == 2


def test_orphaned_temporary_checkpoints_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    orphan = run / ".checkpoint.pt.tmp12345"
    orphan.write_bytes(b"half a checkpoint")
    runs_train.main(TOY + ["--out", str(run), "train.steps=1"])
    assert not orphan.exists()


def test_checkpoints_by_wall_clock_as_well_as_by_step(tmp_path, monkeypatch):
    saved = []
    original = runs_train.save_checkpoint
    monkeypatch.setattr(runs_train, "save_checkpoint", lambda state, path: (saved.append(state["step"]),
                                                                           original(state, path)))
    clock = iter(range(0, 10_000, 31))  # each time.time() call advances the clock by 31 s
    monkeypatch.setattr(runs_train.time, "time", lambda: float(next(clock)))
    train(make_config(parse_args(TOY + ["train.steps=6", "train.ckpt_every=1000", "train.ckpt_minutes=1"]))[0],
          tmp_path / "run")
    assert saved[-1] == 6 and len(saved) >= 3 and saved[:-1] != []  # wall-clock ones before the final one


def test_resume_says_where_it_starts_and_refuses_without_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    runs_train.main(TOY + ["--out", str(run), "train.steps=2"])
    capsys.readouterr()
    runs_train.main(["--resume", str(run), "train.steps=3"])
    assert f"resuming {run} from step 2" in capsys.readouterr().out
    (run / "checkpoint.pt").unlink()
    code, err = run_main(["--resume", str(run), "train.steps=4"], capsys)
    assert code == 2 and "has no checkpoint yet" in err and f"--config {run / 'config.yaml'} --out {run}" in err
    runs_train.main(["--config", str(run / "config.yaml"), "--out", str(run)])  # the advice works
    assert load_checkpoint(run)["step"] == 3
    code, err = run_main(["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "has no checkpoint yet: it is not a run directory" in err


def test_the_kept_checkpoint_is_finite_when_weights_diverge_under_a_finite_loss(tmp_path, monkeypatch):
    def diverge(self, role, step):
        if step == 3:  # the step's loss was finite; its update blew the weights up
            with torch.no_grad():
                next(self.networks[role].parameters()).fill_(float("inf"))

    monkeypatch.setattr(DSM, "after_step", diverge)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="not finite.*step 2"):
        train(make_config(parse_args(TOY + ["train.steps=8", "train.ckpt_every=2"]))[0], run)
    state = load_checkpoint(run)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for part in ("networks", "ema") for t in state[part]["denoiser"].values())


def test_a_huge_learning_rate_stops_with_a_finite_checkpoint_that_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_main(TOY + ["--out", str(run), "train.steps=50", "train.ckpt_every=1", "train.lr=1e12",
                                "train.grad_clip=0"], capsys)
    assert code == 2 and "not finite" in err
    if (run / "checkpoint.pt").exists():
        state = load_checkpoint(run)
        assert all(torch.isfinite(t).all() for t in state["networks"]["denoiser"].values())
        runs_train.main(["--resume", str(run), f"train.steps={state['step'] + 1}", "train.lr=1e-4"])
        assert load_checkpoint(run)["step"] == state["step"] + 1


@pytest.mark.parametrize("module, args", [
    ("runs.sample", ["some_run", "--n", "0"]),
    ("runs.sample", ["some_run", "--n", "-4"]),
    ("runs.sample", ["some_run", "--nfe", "abc"]),
    ("runs.make_pairs", ["--teacher", "t.pt", "--n", "0", "--out", "pairs"]),
    ("runs.eval", ["samples.npz", "--n", "-4"]),
    ("runs.optimise_schedule", ["some_run", "--nfe", "0"]),
])
def test_counts_on_the_command_line_are_checked(module, args, capsys, tmp_path, monkeypatch):
    import importlib
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not an integer >= 1" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
