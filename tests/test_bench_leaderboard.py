"""The leaderboard bench (runs/bench_leaderboard.py) at tiny budgets: discovery from the registry (a newly registered
objective joins without editing the bench), cached stages (a rerun computes nothing and gives the same numbers, a
changed budget or a lost stage is measured again), a failing method as an error row, consistent Markdown / CSV /
JSON, and one-line errors for bad input."""
import csv
import json

import pytest
import torch

from objectives import OBJECTIVES
from objectives.base import Objective
from runs.bench_leaderboard import discover, is_few_step, known_methods, leaderboard_table, main

FEW_STEP = ["kd", "progressive", "reflow", "boot", "dsno", "cd", "ct", "ict", "ect", "tract", "scd", "sct", "ctm",
            "meanflow", "diff_instruct", "dmd", "dmd2", "sid", "diffratio", "add", "ufogen"]


class OneStepDummy(Objective):
    """A test objective registered only inside these tests: a one-step generator regressing data from noise."""

    few_step = True
    eval_nfe = 1

    def __init__(self, backbone, scale=1.0):
        super().__init__()
        self.networks = {"student": backbone}
        self.scale = scale

    def loss(self, role, batch, step):
        x = batch[0]
        z = torch.randn_like(x)
        return (self.generate(z, 1) - x).square().mean(), {}

    def generate(self, z, nfe, cond=None):
        if nfe != 1:
            raise ValueError(f"dummy samples in one step; got nfe={nfe}")
        return self.scale * self.networks["student"](z, torch.zeros(len(z), device=z.device))


class Skeleton(Objective):
    """A registered method whose construction fails (an objective still being written)."""

    few_step = True
    needs_teacher = True

    def __init__(self, backbone, teacher=None):
        super().__init__()
        raise ValueError("skeleton is not implemented yet")


def test_discovery_takes_every_few_step_objective_and_a_new_one(monkeypatch):
    found = discover()
    assert found == FEW_STEP  # registration order
    assert not {"dsm", "guidance_distill", "guidance_progressive"} & set(found)
    assert all(is_few_step(OBJECTIVES[name]) for name in found)
    assert {"dmd2_no_gan", "reflow_distill"} <= set(known_methods())  # bench_distill's variants may be named
    monkeypatch.setitem(OBJECTIVES, "dummy_onestep", OneStepDummy)
    assert discover()[-1] == "dummy_onestep" and "dummy_onestep" in known_methods()


def mixture_args(tmp_path, *extra):
    return ["--parts", "mixture", "--mixture-steps", "3", "--n-eval", "16", "--nfes", "1,2",
            "--out", str(tmp_path / "lb"), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", *extra]


def test_stages_are_cached_resumed_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "dummy_onestep", OneStepDummy)
    args = mixture_args(tmp_path, "--methods", "dummy_onestep,ct")
    main(args)
    first = json.loads((tmp_path / "lb.json").read_text())
    rows = {(r["method"], r["nfe"]): r for r in first["rows"]}
    assert rows[("dummy_onestep", 1)]["map_rmse"] > 0 and ("dummy_onestep", 2) not in rows  # joins, one NFE only
    assert rows[("ct", 1)]["map_rmse"] > 0 and rows[("ct", 2)]["map_rmse"] > 0
    assert rows[("teacher (heun)", 35)]["map_rmse"] < rows[("teacher (euler)", 1)]["map_rmse"]
    assert first["stages"]["computed"] and not first["stages"]["reused"]
    trained = sorted((tmp_path / "runs").glob("mixture/*/*/trained.json"))
    assert len(trained) == 2
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}

    main(args)  # a rerun: every stage reused, the same numbers
    second = json.loads((tmp_path / "lb.json").read_text())
    assert second["stages"]["computed"] == [] and len(second["stages"]["reused"]) == len(first["stages"]["computed"])
    assert second["rows"] == first["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # an interrupted bench: ct's training record and one of the dummy's scores lost; only they are redone
    ct_record = next(p for p in trained if p.parts[-3] == "ct")
    ct_record.unlink()
    next((tmp_path / "runs").glob("mixture/dummy_onestep/*/map_nfe1_*.json")).unlink()
    main(args)
    third = json.loads((tmp_path / "lb.json").read_text())
    computed = third["stages"]["computed"]
    assert any(name.startswith("mixture/ct/") and name.endswith("trained.json") for name in computed)
    assert any(name.startswith("mixture/dummy_onestep/") and "map_nfe1_" in name for name in computed)
    assert not any(name.startswith("mixture/dummy_onestep/") and name.endswith("trained.json") for name in computed)
    assert [r["map_rmse"] for r in third["rows"] if r["method"] == "dummy_onestep"] == \
        [r["map_rmse"] for r in first["rows"] if r["method"] == "dummy_onestep"]

    main(mixture_args(tmp_path, "--methods", "dummy_onestep", "--mixture-steps", "4"))  # a changed budget
    fourth = json.loads((tmp_path / "lb.json").read_text())
    assert any(name.endswith("trained.json") for name in fourth["stages"]["computed"])
    assert len(list((tmp_path / "runs").glob("mixture/dummy_onestep/*/trained.json"))) == 2  # both kept


def test_mnist_rows_error_rows_and_files(tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "skeleton", Skeleton)
    main(["--parts", "mnist", "--methods", "kd,skeleton", "--steps", "1", "--batch-size", "4", "--n", "8",
          "--pairs", "8", "--nfes", "1", "--out", str(tmp_path / "lb"), "--runs-dir", str(tmp_path / "runs"),
          "--device", "cpu"])
    summary = json.loads((tmp_path / "lb.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert [r["method"] for r in summary["rows"]][:3] == ["teacher (heun)", "teacher (euler)", "teacher (dpmpp_2m)"]
    assert rows["teacher (heun)"]["nfe"] == 35 and rows["teacher (heun)"]["fid_mnist"] > 0
    kd = rows["kd"]
    assert kd["nfe"] == 1 and kd["fid_mnist"] > 0 and 0 <= kd["precision"] <= 1 and kd["train_steps"] == 1
    assert kd["teacher_calls"] == 8 * 35 and kd["error"] == ""  # kd calls no teacher itself: the shared pairs
    assert "skeleton is not implemented yet" in rows["skeleton"]["error"] and rows["skeleton"]["fid_mnist"] == ""
    assert summary["provenance"]["git"] and summary["budget"]["steps"] == 1 and summary["seed"] == 0
    assert "--methods kd,skeleton" in summary["command"]
    text = (tmp_path / "lb.md").read_text()
    assert leaderboard_table(summary["rows"]) in text and "1 training steps at batch 4" in text
    assert "| skeleton (error: mnist: ValueError: skeleton is not implemented yet) |" in text
    with open(tmp_path / "lb.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r["method"] for r in summary["rows"]]
    assert float(table[[r["method"] for r in table].index("kd")]["fid_mnist"]) == kd["fid_mnist"]
    if summary["plots"]:
        assert (tmp_path / "lb_fid_vs_nfe.png").stat().st_size and (tmp_path / "lb_fid_vs_cost.png").stat().st_size


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method(s) nope; known: kd"),
    (["--methods", "kd", "--parts", "cifar"], "--parts takes mnist and/or mixture"),
    (["--methods", "kd", "--nfes", "1,x"], "--nfes takes comma-separated integers"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "lb"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lb.json").exists()


def test_a_missing_teacher_run_directory_is_trained_then_reused(tmp_path, monkeypatch):
    import runs.bench_leaderboard as leaderboard
    monkeypatch.setattr(leaderboard, "TEACHER_ARGS", [*leaderboard.TEACHER_ARGS, "train.steps=1",
                                                      "train.batch_size=4", "train.sample_every=0"])
    teacher = tmp_path / "teacher"
    path = leaderboard.ensure_teacher(teacher, "cpu")
    assert path == str(teacher.resolve()) and (teacher / "checkpoint.pt").is_file()
    stamp = (teacher / "checkpoint.pt").stat().st_mtime_ns
    assert leaderboard.ensure_teacher(teacher, "cpu") == path  # finished: reused, not trained again
    assert (teacher / "checkpoint.pt").stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="not found"):
        leaderboard.ensure_teacher(tmp_path / "missing.pt", "cpu")
