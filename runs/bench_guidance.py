"""python -m runs.bench guidance: class-conditional MNIST teachers with the U-Net and the DiT at matched parameter
count and equal training minutes, a classifier-free guidance sweep, and a guidance-distilled student.

    python -m runs.bench guidance                              # CPU defaults: 6 minutes per network, ~25 minutes
    python -m runs.bench guidance --minutes 60 --n 2000 --nfe 35 --device cuda

For each teacher (U-Net, the 16-channel default: 344k parameters; DiT depth 4, width 64, 2 heads, patch 4: 331k),
trained by EDM's DSM for `--minutes` at batch 32 with label dropout 0.1 (the null class classifier-free guidance
needs): MNIST-FID, precision and recall of `--n` samples (balanced classes) against `--n` real digits, and the MNIST
classifier's accuracy on the samples' intended classes (the conditioning check), for each guidance weight in `--ws`
(EDM2's convention: w = 1 is the conditional model, one batched 2B call per evaluation = 1 NFE), Heun at `--nfe`.
Then `guidance_distill` trains a w-conditioned student from the U-Net teacher for `--minutes` and samples at the
same w with one B-sized call per evaluation (Heun at `--nfe`), and `guidance_progressive` (stage two) distils that
student's steps progressively, 16 -> 8 -> 4 DDIM steps in `--progressive-steps` steps, sampled at 4 NFE. Writes <out>.md / .json / .csv; the training runs go under --runs-dir
and are reused when present (a finished run directory with a checkpoint at its budget).
"""
import time
from pathlib import Path

import numpy as np
import torch

from metrics.mnist_net import accuracy, load_metric_net
from runs.bench_distill import write
from runs.build import load_run
from runs.checkpoint import load_checkpoint
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.eval import mnist_report
from runs.images import to_uint8
from runs.provenance import provenance
from runs.sample import sample
from runs.train import make_config, parse_args, train

TEACHERS = {
    "unet": ["--backbone", "unet"],
    "dit": ["--backbone", "dit", "backbone.depth=4", "backbone.hidden_size=64", "backbone.num_heads=2",
            "backbone.patch_size=4"],
}
COMMON = ["--data", "mnist", "train.conditional=true", "train.batch_size=32", "train.steps=1000000",
          "train.sample_every=0", "train.log_every=200"]
TEACHER = ["backbone.label_dropout=0.1"]  # the null class classifier-free guidance needs (not for the student: its
                                          # target is the guided teacher for the sample's own class)


def trained(run_dir, args, minutes, device, steps=None):
    """Train `args` for `minutes` (or exactly `steps` steps) into run_dir (reused when a finished run is there);
    returns (parameters, seconds, steps, images/s in training) of its student or denoiser."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").exists():
        budget = [f"train.minutes={minutes}"] if steps is None else [f"train.steps={steps}"]
        config = make_config(parse_args([*args, *COMMON, *budget, f"train.device={device.type}",
                                         "--out", str(run_dir)]))[0]
        train(config, run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    net = next(iter(load_run(run_dir)[1].networks.values()))
    params = sum(p.numel() for p in net.parameters())
    seconds = float(state.get("elapsed_sec", 0.0))
    steps = int(state["step"])
    return params, seconds, steps, steps * state["config"]["train"]["batch_size"] / max(seconds, 1e-9)


def training_columns(params, seconds, steps, rate):
    """A row's training-cost columns from what `trained` returns."""
    return {"parameters": params, "train_minutes": round(seconds / 60, 2), "train_steps": steps,
            "train_images_per_sec": round(rate, 1)}


def scored(run_dir, n, nfe, w, device, net, student_w=False, solver="heun"):
    """One row's measurements: samples of the run at guidance w (a distilled student: its own w input; solver None:
    the student's own `generate`)."""
    config, objective = load_run(run_dir, device=device)
    labels = torch.arange(n) % 10  # balanced classes
    if student_w:
        objective.sample_w = float(w)
        samples, labels, calls, rate = sample(objective, config, n, nfe, solver=solver, labels=labels, device=device)
    else:
        samples, labels, calls, rate = sample(objective, config, n, nfe, solver="heun", labels=labels, device=device,
                                              guidance=None if w == 1 else float(w))
    images = to_uint8(samples)
    report = mnist_report(images, n=n, net=net)
    return {"fid_mnist": round(report["fid_mnist"], 2), "precision": round(report["precision"], 3),
            "recall": round(report["recall"], 3), "class_accuracy": round(accuracy(net, images, labels.numpy()), 4),
            "nfe": round(calls, 1), "images_per_sec": round(rate, 1)}


def bench_guidance(minutes, n, nfe, ws, runs_dir, out, device, progressive_steps=600):
    net = load_metric_net(device=device)
    rows, runs_dir = [], Path(runs_dir)
    for name, args in TEACHERS.items():
        params, seconds, steps, rate = trained(runs_dir / name, ["--objective", "dsm", *args, *TEACHER], minutes, device)
        for w in ws:
            rows.append({"model": f"{name} teacher", "w": w, **scored(runs_dir / name, n, nfe, w, device, net),
                         **training_columns(params, seconds, steps, rate)})
            print(rows[-1], flush=True)
    params, seconds, steps, rate = trained(
        runs_dir / "guidance_distill", ["--objective", "guidance_distill", "--teacher", str(runs_dir / "unet"),
                                        "--backbone", "unet", f"objective.w_max={max(ws)}", "teacher.eval_n=0"], minutes,
        device)  # its end-of-run report is the rows below
    for w in ws:
        rows.append({"model": "guidance_distill student (unet)", "w": w,
                     **scored(runs_dir / "guidance_distill", n, nfe, w, device, net, student_w=True),
                     **training_columns(params, seconds, steps, rate)})
        print(rows[-1], flush=True)
    params, seconds, steps, rate = trained(
        runs_dir / "guidance_progressive", ["--objective", "guidance_progressive", "--teacher",
                                            str(runs_dir / "guidance_distill"), "--backbone", "unet",
                                            f"objective.w_max={max(ws)}", "objective.start_steps=16",
                                            "objective.end_steps=4", "teacher.eval_n=0"], minutes, device,
        steps=progressive_steps)
    for w in ws:
        rows.append({"model": "guidance_progressive student (4 steps)", "w": w,
                     **scored(runs_dir / "guidance_progressive", n, 4, w, device, net, student_w=True, solver=None),
                     **training_columns(params, seconds, steps, rate)})
        print(rows[-1], flush=True)
    summary = {"minutes": minutes, "progressive_steps": progressive_steps, "n": n, "solver": "heun", "nfe": nfe, "ws": ws, "device": str(device),
               "provenance": provenance(device), "rows": rows}
    write(out, summary, markdown(summary))
    return summary


def markdown(s):
    lines = ["# Class-conditional MNIST: U-Net vs DiT teachers, guidance sweep, guidance distillation", "",
             f"Each network trained {s['minutes']} minutes (EDM DSM, batch 32, label dropout 0.1) on {s['device']}; "
             f"{s['n']} samples with balanced classes, Heun at {s['nfe']} NFE (a guided evaluation is one batched 2B "
             f"call = 1 NFE; the distilled student takes w as an input: one B call; the guidance_progressive student samples "
             f"its own 4-step DDIM grid after {s.get('progressive_steps', '?')} steps), MNIST-FID / precision / recall "
             f"against {s['n']} real digits, and the MNIST classifier's accuracy on the intended classes.", "",
             "| model | w | MNIST-FID | precision | recall | class accuracy | NFE | images/s | parameters | "
             "train min | train steps | train images/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['w']:g} | {r['fid_mnist']} | {r['precision']} | {r['recall']} | "
              f"{r['class_accuracy']} | {r['nfe']} | {r['images_per_sec']} | {r['parameters']:,} | "
              f"{r['train_minutes']} | {r['train_steps']} | {r['train_images_per_sec']} |" for r in s["rows"]]
    for note in s.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.bench guidance", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per network")
    p.add_argument("--n", type=positive_int, default=500)
    p.add_argument("--nfe", type=positive_int, default=15)
    p.add_argument("--progressive-steps", type=positive_int, default=600,
                   help="training steps of guidance_progressive (two stages: 16 -> 8 -> 4 steps)")
    p.add_argument("--ws", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="guidance weights (1: none)")
    p.add_argument("--runs-dir", default="out/bench_guidance")
    p.add_argument("--out", default="bench/guidance_mnist")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        if not args.minutes > 0 or any(w < 0 for w in args.ws):
            raise ValueError("--minutes must be > 0 and every --ws >= 0")
        tic = time.time()
        bench_guidance(args.minutes, args.n, args.nfe, sorted(args.ws), args.runs_dir, args.out,
                       pick_device(args.device), args.progressive_steps)
        print(f"wrote {args.out}.md ({(time.time() - tic) / 60:.1f} min)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
