"""The MNIST part of `python -m runs.bench distill` (see runs/bench_distill.py): one-step students of the trained
MNIST teacher, MNIST-FID and images per second, next to the teacher at 1, 2, 4, 8 and 35 NFE."""
import json
import time
from pathlib import Path

import torch

from data import DATASETS
from metrics.mnist_net import load_metric_net
from objectives.base import using_networks
from runs.bench_distill import TEACHER_NFES, appended_lines, machine, progressive_stages, train_method, write
from runs.build import load_run
from runs.eval import mnist_report
from runs.images import save_image_grid
from runs.sample import sample

ROLLOUT_METHODS = ("kd", "reflow", "reflow_distill", "dsno")
TEACHER_ROWS = [("heun", 35)] + [(s, n) for n in TEACHER_NFES if n != 35 for s in ("euler", "dpmpp_2m")]


def generate_samples(objective, ema, nfe, n, shape, conditional, num_classes, device, seed=0, batch=250):
    """(samples [n, ...], images per second) of a trained student, labels cycling through the classes."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # what a stochastic generate draws (multistep consistency sampling)
    out, seconds = [], 0.0
    with using_networks(objective, ema), torch.inference_mode():
        for start in range(0, n, batch):
            z = torch.randn([min(batch, n - start), *shape], generator=generator).to(device)
            cond = None
            if conditional:
                cond = {"class_labels": (torch.arange(start, start + len(z)) % num_classes).to(device)}
            tic = time.perf_counter()
            out.append(objective.generate(z, nfe, cond).cpu())
            seconds += time.perf_counter() - tic
    return torch.cat(out), n / seconds


def bench_mnist(out, teacher_path, trajectories, steps, n, device, methods, runs_dir="out/bench_distill", settings=(),
                seed=0, append=False, extra_nfes=()):
    """`steps`: {method: training steps}. The summary is rewritten after every row, so an interrupted bench keeps
    what it measured; append=True keeps <out>.json's rows (teacher rows included) and (re)measures only `methods`;
    extra_nfes adds rows at those NFE for students that sample with more than their eval_nfe (consistency models)."""
    net = load_metric_net(device=device)

    def scores(samples):
        """MNIST-FID, precision, recall and classes covered of samples against the same seeded n real digits."""
        report = mnist_report(samples, n=n, seed=seed, net=net, device=device)
        return {"fid_mnist": round(report["fid_mnist"], 2), "precision": round(report["precision"], 3),
                "recall": round(report["recall"], 3), "classes_covered": report["classes_covered"]}

    summary = {"part": "mnist", "teacher": str(teacher_path), "trajectories": str(trajectories),
               "settings": list(settings), "n": n, **machine(device), "rows": []}
    if append:
        summary = json.loads(Path(out).with_suffix(".json").read_text())
        if summary["n"] != n or summary["teacher"] != str(teacher_path):
            raise ValueError(f"--append: {out}.json holds n={summary['n']} for {summary['teacher']}, not n={n} for "
                             f"{teacher_path}")
        summary["rows"] = [r for r in summary["rows"] if r["method"] not in methods]
        summary.setdefault("appended", []).append({"methods": list(methods), "settings": list(settings),
                                                   **machine(device)})

    def add(row):
        summary["rows"].append(row)
        print(row, flush=True)
        write(out, summary, markdown(summary, Path(out).name))

    if not append:
        teacher_config, teacher = load_run(teacher_path, device)
        for solver, nfe in TEACHER_ROWS:
            samples, _, measured, rate = sample(teacher, teacher_config, n, nfe, solver, batch=250, seed=seed,
                                                device=device)
            add({"method": f"teacher ({solver})", "nfe": measured, **scores(samples), "images_per_sec": round(rate, 1),
                 "train_steps": "", "train_seconds": "", "teacher_calls": "", "objective": ""})
    common = [f"train.device={device}", *settings]
    for method in methods:
        extra = ["--trajectories", str(trajectories)] if method in ROLLOUT_METHODS and trajectories else []
        run_dir = Path(runs_dir) / f"mnist_{method}"
        own = progressive_stages(steps[method], start_steps=16) if method == "progressive" else []
        config, objective, ema, seconds = train_method(method, ["--teacher", str(teacher_path), *extra],
                                                       common + own, run_dir, steps[method])
        dataset = DATASETS[config["data"]["name"]]()
        own_nfe = int(objective.eval_nfe or 1)
        for nfe in [own_nfe, *sorted(n for n in set(extra_nfes) if n > own_nfe)]:
            try:
                samples, rate = generate_samples(objective, ema, nfe, n, dataset.shape, config["train"]["conditional"],
                                                 dataset.num_classes, device, seed)
            except ValueError:  # a student that samples with exactly one NFE
                continue
            if nfe == own_nfe:
                save_image_grid(samples[:100], Path(out).with_name(f"{Path(out).name}_{method}.png"), nrow=10)
            add({"method": method, "nfe": nfe, **scores(samples), "images_per_sec": round(rate, 1),
                 "train_steps": objective.trained_steps, "train_seconds": round(seconds, 1),
                 "teacher_calls": objective.teacher_calls, "objective": dict(config["objective"])})
    return summary


def markdown(s, stem):
    lines = [f"# One- and few-step students on MNIST (teacher {s['teacher']})", "",
             f"MNIST-FID of {s['n']} samples against the same {s['n']} real digits for every row (lower is better); "
             f"students trained from the teacher (rollouts: {s['trajectories']}; extra settings: "
             f"{s['settings'] or 'none'}). "
             f"Machine: {s['machine']}, torch {s['torch']}.", "",
             "| method | NFE | MNIST-FID | precision | recall | classes | images/s | train steps | train s | "
             "teacher calls |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fid_mnist']} | {r.get('precision', '')} | "
                     f"{r.get('recall', '')} | {r.get('classes_covered', '')} | {r['images_per_sec']} | "
                     f"{r['train_steps']} | {r['train_seconds']} | {r.get('teacher_calls', '')} |")
    lines += appended_lines(s)
    for note in s.get("notes", []):
        lines += ["", note]
    lines += ["", "Samples (first 100, one row per class when conditional):", ""]
    lines += [f"- {m}: ![{m}]({stem}_{m}.png)" for m in dict.fromkeys(r["method"] for r in s["rows"])
              if not m.startswith("teacher")]
    return "\n".join(lines) + "\n"
