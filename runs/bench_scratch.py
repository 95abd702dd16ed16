"""python -m runs.bench scratch: "do we need a teacher?" One- and few-step models trained from scratch on MNIST
(sct, meanflow) next to a diffusion teacher (dsm) trained for the same minutes on the same data, backbone and batch.

    python -m runs.bench scratch                                 # CPU defaults: 4 minutes per method, ~15 minutes
    python -m runs.bench scratch --minutes 30 --n 2000 --device cuda

Each method trains `--minutes` (train.minutes: a wall-clock budget, so a slower step costs steps, not time) with the
default U-Net at batch 32, then samples `--n` images at each NFE of its row set: the from-scratch one-step models
at 1 and 2 NFE with their own `generate`; the teacher with Euler at 1 and 2 NFE (its one- and two-step samples) and
Heun at 35 (what the minutes bought it with a full solver). Every row gives MNIST-FID, precision, recall and classes
covered against `--n` real digits (runs.eval.mnist_report, the shipped feature net), images/s, training steps and
minutes. Runs go under --runs-dir and are reused when a finished run is there; a method whose run fails becomes a row
with its error. Writes <out>.md / .json / .csv with provenance.
"""
import time
from pathlib import Path

import torch

from metrics.mnist_net import load_metric_net
from runs.bench_distill import write
from runs.bench_guidance import trained, training_columns
from runs.build import load_run
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.eval import mnist_report
from runs.images import to_uint8
from runs.provenance import provenance
from runs.sample import sample

# method: (its training arguments, [(solver or None for the method's own generate, NFE), ...])
METHODS = {
    "dsm": (["--objective", "dsm"], [("euler", 1), ("euler", 2), ("heun", 35)]),
    "sct": (["--objective", "sct"], [(None, 1), (None, 2)]),
    "meanflow": (["--objective", "meanflow"], [(None, 1), (None, 2)]),
}
COMMON = ["--data", "mnist", "--backbone", "unet", "train.batch_size=32", "train.steps=1000000",
          "train.sample_every=0", "train.log_every=200"]


def scored(run_dir, solver, nfe, n, device, net):
    config, objective = load_run(run_dir, device=device)
    samples, _, calls, rate = sample(objective, config, n, nfe, solver=solver, device=device)
    report = mnist_report(to_uint8(samples), n=n, net=net)
    return {"fid_mnist": round(report["fid_mnist"], 2), "fid_mnist_std": round(report.get("fid_mnist_std", 0.0), 2),
            "precision": round(report["precision"], 3),
            "recall": round(report["recall"], 3), "classes_covered": report["classes_covered"],
            "nfe": round(calls, 1), "images_per_sec": round(rate, 1)}


def bench_scratch(minutes, n, runs_dir, out, device, methods):
    net = load_metric_net(device=device)
    rows = []
    for name in methods:
        args, evaluations = METHODS[name]
        try:
            params, seconds, steps, rate = trained(Path(runs_dir) / name, [*args, *COMMON], minutes, device)
        except Exception as error:  # a failing method is a row, not the end of the bench
            rows.append({"method": name, "sampler": "", "error": f"{type(error).__name__}: {error}"})
            continue
        for solver, nfe in evaluations:
            rows.append({"method": name, "sampler": solver or "own", **scored(Path(runs_dir) / name, solver, nfe, n,
                                                                              device, net),
                         **training_columns(params, seconds, steps, rate)})
            print(rows[-1], flush=True)
    summary = {"minutes": minutes, "n": n, "batch_size": 32, "device": str(device), "provenance": provenance(device),
               "rows": rows}
    write(out, summary, markdown(summary))
    return summary


def markdown(s):
    lines = ["# Do we need a teacher? One-step models from scratch vs a diffusion teacher, equal minutes (MNIST)", "",
             f"Each method trained {s['minutes']} minutes from scratch (default U-Net, batch {s['batch_size']}) on "
             f"{s['device']}; {s['n']} samples per row, MNIST-FID / precision / recall / classes covered against "
             f"{s['n']} real digits (the default feature net; FID ± its spread over 5 real splits). `own`: the method's own "
             "one- or two-step sampler.", "",
             "| method | sampler | NFE | MNIST-FID | precision | recall | classes | images/s | train min | "
             "train steps | train images/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |||||||||")
            continue
        fid = f"{r['fid_mnist']}" + (f" ± {r['fid_mnist_std']}" if "fid_mnist_std" in r else "")
        lines.append(f"| {r['method']} | {r['sampler']} | {r['nfe']:g} | {fid} | {r['precision']} | "
                     f"{r['recall']} | {r['classes_covered']} | {r['images_per_sec']} | {r['train_minutes']} | "
                     f"{r['train_steps']} | {r['train_images_per_sec']} |")
    for note in s.get("notes", []):  # what was observed, added to the .json by whoever ran it
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.bench scratch", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes per method")
    p.add_argument("--n", type=positive_int, default=500)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--runs-dir", default="out/bench_scratch")
    p.add_argument("--out", default="bench/scratch_mnist")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        if not args.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {args.minutes}")
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        tic = time.time()
        bench_scratch(args.minutes, args.n, args.runs_dir, args.out, pick_device(args.device), methods)
        print(f"wrote {args.out}.md ({(time.time() - tic) / 60:.1f} min)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
