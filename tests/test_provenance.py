"""Provenance: every run directory and bench result says what produced it."""
import json

from runs import train as runs_train
from runs.provenance import git_state, provenance

TOY = ["--backbone", "mlp", "--data", "moons", "data.n=64", "backbone.hidden=8", "backbone.num_blocks=1",
       "train.batch_size=16"]


def test_a_run_records_each_start(tmp_path):
    run = tmp_path / "run"
    runs_train.main(TOY + ["--out", str(run), "train.steps=1", "train.seed=7"])
    runs_train.main(["--resume", str(run), "train.steps=2"])
    records = json.loads((run / "provenance.json").read_text())
    assert len(records) == 2 and all(r["seed"] == 7 for r in records)
    first = records[0]
    assert first["versions"]["torch"] and first["versions"]["python"] and first["device"].startswith("cpu")
    assert "git" in first and "argv" in first and first["host"]


def test_git_state_names_the_commit_and_dirtiness_or_says_none(tmp_path):
    state = git_state()
    assert state["commit"] is None or (len(state["commit"]) == 40 and isinstance(state["dirty"], bool))
    assert git_state(tmp_path) == {"commit": None}  # not a checkout
    assert provenance(argv=["x", "--y"])["argv"] == ["x", "--y"]
