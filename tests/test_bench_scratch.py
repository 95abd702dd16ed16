"""The from-scratch bench end to end at toy size: equal-minute runs, rows per NFE, a failing method as a row."""
import json

from runs import bench_scratch

TINY = ["backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.attn_resolutions=[]", "data.limit=64"]


def test_scratch_bench_writes_rows_and_keeps_going_past_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_scratch, "COMMON", bench_scratch.COMMON + TINY)
    monkeypatch.setattr(bench_scratch, "METHODS", {
        "dsm": (["--objective", "dsm"], [("euler", 1), ("heun", 3)]),
        "broken": (["--objective", "dsm", "objective.sigma_data=-1"], [(None, 1)]),
    })
    out = tmp_path / "scratch"
    bench_scratch.main(["--minutes", "0.01", "--n", "20", "--methods", "dsm,broken", "--runs-dir",
                        str(tmp_path / "runs"), "--out", str(out), "--device", "cpu"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["method"], r.get("nfe")) for r in rows] == [("dsm", 1), ("dsm", 3), ("broken", None)]
    assert all(r["fid_mnist"] > 0 and 0 <= r["precision"] <= 1 and r["train_steps"] >= 1 for r in rows[:2])
    assert "sigma_data" in rows[2]["error"]
    text = out.with_suffix(".md").read_text()
    assert "| dsm | heun | 3 |" in text and "| broken | failed:" in text
