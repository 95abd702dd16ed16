"""The defaults bench: a run in a fresh process, its wall time, its own peak memory and its closing lines."""
import json

from runs import bench_defaults


def test_a_default_run_is_measured_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_defaults, "command_for", lambda name: [
        "--objective", name, "--backbone", "mlp", "--data", "moons", "data.n=64", "backbone.hidden=8",
        "backbone.num_blocks=1", "train.steps=2"])
    out = tmp_path / "defaults"
    bench_defaults.main(["--objectives", "dsm", "--out", str(out)])
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["exit"] == 0 and row["report"].startswith("trained 2 steps in")
    assert 0.05 < row["peak_rss_gib"] < 8 and row["wall_min"] > 0
    assert "| `python -m runs.train --objective dsm --backbone mlp" in out.with_suffix(".md").read_text()


def test_a_failing_run_records_its_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_defaults, "command_for", lambda name: ["--objective", name, "train.steps=abc"])
    out = tmp_path / "defaults"
    bench_defaults.main(["--objectives", "dsm", "--out", str(out)])
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["exit"] == 2 and row["error"] == "error: train.steps='abc' is not accepted; it takes an integer >= 1"
