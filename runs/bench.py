"""Benchmarks that write their measured results to files: python -m runs.bench {teacher,solvers,distill,...} ...

teacher  sample a trained image teacher with several solvers and NFE, score each with MNIST-FID against n real
         digits (the same seeded subset the real-data floor uses), measure images per second, and write
         <out>.md, <out>.csv, <out>.json and <out>_grid.png (Heun at the highest NFE).
solvers  every registered solver against the exact ODE map of the analytic Gaussian mixture (and, with
         --mnist-run, MNIST-FID of a trained teacher) at a range of NFE, Karras vs optimised schedules, and
         each solver's own per-step overhead: see runs/bench_solvers.py.
defaults every objective trained with its true defaults, as a new user runs it (wall time, peak memory, what it
         reports): see runs/bench_defaults.py.
distill  every trajectory-distillation method against its teacher at the same NFE, on the analytic mixture (exact
         map error) and on MNIST (one-step MNIST-FID, images per second): see runs/bench_distill.py.
leaderboard every registered one- and few-step method on one teacher, data, seeds and budget, stages cached so a
         rerun resumes: method x NFE x (MNIST-FID, precision, recall, map error, images/s, training cost) as
         Markdown, CSV, JSON and plots: see runs/bench_leaderboard.py.
guidance class-conditional U-Net vs DiT teachers, a guidance sweep, guidance-distilled students: runs/bench_guidance.py.
scratch  "do we need a teacher?": sct and meanflow from scratch vs a teacher trained for the same minutes:
         runs/bench_scratch.py.
metric   validate the MNIST metric: FID, precision, recall and class coverage of degraded real digits (noise, blur,
         dropped classes, duplicates) and of known-better / known-worse models, with the real-split seed spread,
         for each feature net: runs/bench_metric.py.
"""
import csv
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch

from metrics import METRICS
from metrics.mnist_net import load_metric_net
from runs.bench_defaults import main as bench_defaults_main
from runs.bench_distill import main as bench_distill_main
from runs.bench_guidance import main as bench_guidance_main
from runs.bench_leaderboard import main as bench_leaderboard_main
from runs.bench_metric import main as bench_metric_main
from runs.bench_scratch import main as bench_scratch_main
from runs.bench_solvers import main as bench_solvers_main
from runs.build import load_run
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.eval import default_reference, reference_split
from runs.images import save_image_grid, to_uint8
from runs.provenance import provenance
from runs.sample import sample

TEACHER_GRID = [("heun", 35), ("heun", 17), ("heun", 9), ("euler", 35), ("euler", 9)]


def training_summary(run_dir):
    """Steps, images and training wall time from a run directory's metrics.jsonl (None when not recorded)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    last = records[-1] if records else {}
    return {"steps": last.get("step"), "train_seconds": last.get("elapsed_sec")}


def class_rows(samples, labels, per_class=10):
    """Up to `per_class` samples of each class, one row per class (the first 100 samples when unconditional)."""
    if labels is None:
        return samples[:per_class * per_class]
    rows = [samples[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
    return torch.cat([torch.cat([r, torch.zeros_like(samples[:per_class - len(r)]) - 1]) for r in rows])


def bench_teacher(run, n, out, device, seed=0):
    config, objective = load_run(run, device)
    reference, floor_other = reference_split(default_reference(), n, seed)
    net = load_metric_net(device=device)  # loaded once, not once per FID
    fid = functools.partial(METRICS["fid-mnist"], net=net, device=device)
    floor = fid(floor_other, reference)
    rows, grid = [], None
    for solver, nfe in TEACHER_GRID:
        tic = time.time()
        samples, labels, measured_nfe, rate = sample(objective, config, n, nfe, solver, batch=500, seed=seed,
                                                     device=device)
        images = to_uint8(samples).numpy()
        fid_value = fid(images, reference)
        rows.append({"solver": solver, "nfe": measured_nfe, "fid_mnist": round(fid_value, 3),
                     "fid_ratio_to_floor": round(fid_value / floor, 2),
                     "images_per_sec": round(rate, 1), "seconds": round(time.time() - tic, 1)})
        print(rows[-1], flush=True)
        if grid is None:
            grid = class_rows(samples, labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid, out.with_name(out.name + "_grid.png"), nrow=10)
    summary = {"run": str(run), "n": n, "floor_fid_mnist": round(floor, 3), "device": str(device),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "provenance": provenance(device), **training_summary(run), "rows": rows}
    out.with_suffix(".md").write_text(teacher_markdown(summary, out))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return summary


def teacher_markdown(summary, out):
    hours = summary.get("train_seconds")
    lines = [f"# MNIST teacher: measured by `python -m runs.bench teacher {summary['run']}`", "",
             f"- training: {summary.get('steps')} steps" + (f", {hours / 60:.1f} minutes wall time" if hours else ""),
             f"- real-data floor (MNIST-FID of {summary['n']} real digits against {summary['n']} others): "
             f"{summary['floor_fid_mnist']}",
             f"- sampling on {summary['device']} ({summary['machine']}, torch {summary['torch']}), "
             f"{summary['n']} samples per row, batch 500", "",
             "| solver | NFE | MNIST-FID | FID / floor | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['solver']} | {r['nfe']:g} | {r['fid_mnist']} | {r['fid_ratio_to_floor']} | {r['images_per_sec']} |"
              for r in summary["rows"]]
    lines += ["", f"![samples, Heun {summary['rows'][0]['nfe']:g} NFE, one row per class]({out.name}_grid.png)", ""]
    return "\n".join(lines)


def teacher_main(argv):
    p = ArgumentParser(prog="python -m runs.bench teacher", description="FID and speed of a trained "
                                "MNIST teacher across solvers and NFE")
    p.add_argument("run")
    p.add_argument("--n", type=positive_int, default=2000)
    p.add_argument("--out", default="bench/mnist_teacher")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        summary = bench_teacher(args.run, args.n, args.out, pick_device(args.device))
        print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


BENCHES = {"teacher": teacher_main, "solvers": bench_solvers_main, "distill": bench_distill_main,
           "defaults": bench_defaults_main, "guidance": bench_guidance_main,
           "leaderboard": bench_leaderboard_main, "scratch": bench_scratch_main, "metric": bench_metric_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m runs.bench {{{','.join(BENCHES)}}} ...  (-h after a name for its options)",
              file=sys.stderr)
        sys.exit(2)
    BENCHES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
