"""The guidance bench end to end at toy size: two conditional teachers, the sweep, the distilled student, the files."""
import json

from runs import bench_guidance

TINY = ["backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.attn_resolutions=[]"]


def test_guidance_bench_writes_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_guidance, "TEACHERS", {"unet": ["--backbone", "unet", *TINY],
                                                     "dit": ["--backbone", "dit", "backbone.depth=1",
                                                             "backbone.hidden_size=16", "backbone.num_heads=1"]})
    monkeypatch.setattr(bench_guidance, "COMMON", bench_guidance.COMMON + ["data.limit=64"])
    out = tmp_path / "guidance"
    bench_guidance.main(["--minutes", "0.01", "--n", "20", "--nfe", "3", "--ws", "1", "2", "--progressive-steps", "4", "--runs-dir",
                         str(tmp_path / "runs"), "--out", str(out), "--device", "cpu"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["w"]) for r in rows] == [("unet teacher", 1.0), ("unet teacher", 2.0), ("dit teacher", 1.0),
                                                    ("dit teacher", 2.0), ("guidance_distill student (unet)", 1.0),
                                                    ("guidance_distill student (unet)", 2.0),
                                                    ("guidance_progressive student (4 steps)", 1.0),
                                                    ("guidance_progressive student (4 steps)", 2.0)]
    assert [r["nfe"] for r in rows] == [3] * 6 + [4] * 2
    assert all(0 <= r["class_accuracy"] <= 1 and r["fid_mnist"] > 0 and r["train_steps"] >= 1
               for r in rows)
    assert "| dit teacher | 2 |" in out.with_suffix(".md").read_text()
