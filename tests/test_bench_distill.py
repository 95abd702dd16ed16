"""The distillation bench's mixture part end to end with tiny budgets: rows for the teacher and each method, files
written, --append re-measures only the methods it names, consistency methods with and without a teacher."""
import csv
import json

import pytest
import torch

from runs.bench_distill import bench_mixture, main


def test_mixture_bench_writes_rows_and_appends(tmp_path):
    out, cpu = tmp_path / "mix", torch.device("cpu")
    common = dict(runs_dir=tmp_path / "runs", settings=["train.batch_size=8"])
    summary = bench_mixture(out, {"cd": 2, "ct": 2}, 16, cpu, ["cd", "ct"], **common)
    methods = [r["method"] for r in summary["rows"]]
    assert methods.count("teacher") == 5 and methods[-2:] == ["cd", "ct"]
    assert all(r["map_rmse"] > 0 for r in summary["rows"])
    bench_mixture(out, {"ict": 2}, 16, cpu, ["ict"], append=True, **common)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in saved["rows"]][-3:] == ["cd", "ct", "ict"]
    assert saved["appended"][0]["methods"] == ["ict"]
    text = out.with_suffix(".md").read_text()
    assert "| ict | 1 |" in text and "no teacher" in text and "Measured in a later invocation: ict" in text
    # rows written by an older version (no "objective" field) still go into the csv with the new ones
    for row in saved["rows"][:3]:
        row.pop("objective", None)
    out.with_suffix(".json").write_text(json.dumps(saved))
    bench_mixture(out, {"ict": 2}, 16, cpu, ["ict"], append=True, **common)
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows][-3:] == ["cd", "ct", "ict"] and rows[0]["objective"] == ""
    with pytest.raises(ValueError, match="n=16"):
        bench_mixture(out, {"ict": 2}, 8, cpu, ["ict"], append=True, **common)


def test_mnist_part_refuses_methods_without_a_teacher(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mnist", "--methods", "kd", "ict", "--steps", "1"])
    assert exit_info.value.code == 2 and "ict take no teacher" in capsys.readouterr().err
