"""Validate the MNIST metric: python -m runs.bench metric [--n 2000] [--seeds 5] [--degrade-seeds 3] [--nets ...]

A sample-quality metric is trusted here only after it passes three checks, run for each feature network in --nets
(`shipped`: metrics/mnist_feature_net.pt, the 128-d classifier feature every bench/ figure so far was scored with;
`wide`: metrics/mnist_feature_net_wide.pt, the 480-d multi-depth features of metrics/mnist_net_wide.py; for
ablations, `wide-fc` reads the wide net's fc layer alone, and `wide:PATH` / `wide-fc:PATH` another wide checkpoint):

1. The real-data floor and the metric's own noise: FID (and k-NN precision / recall, predicted-class coverage) of n
   real digits against n OTHER real digits, over --seeds seeds of runs.eval.reference_split; mean +- std.
2. Monotone in known degradations (metrics/degrade.py): the same n "other" real digits with Gaussian noise, blur,
   duplicated samples at increasing levels, and n digits with classes dropped, each against the seed's reference
   split, over --degrade-seeds seeds. The bench states for each sequence whether the mean FID rises at every level
   and whether it does so in every seed.
3. Separates known-better from known-worse models: the shipped teacher (bench/mnist_teacher.pt) with Heun at 35 NFE,
   Heun at 9 NFE and Euler at 1 NFE (its one-step map: the blurry mean of each noise's posterior, a one-step sample that
   needs no training), and trained one-step students when their run directories exist (not shipped; see STUDENTS).
   Each model's n samples (balanced classes, seed 0) are scored against the --seeds reference splits; a pair counts
   as separated when the worse model's mean FID is at least 3 seed-standard-deviations above the better one's
   (z = (F_worse - F_better) / sqrt(sd_worse^2 + sd_better^2) >= 3).

The seed spread is that of the real split only: the samples are fixed, so the spread of sampling a model anew is not
in it (for the degraded real digits it is: their "other" split changes with the seed too).

Samples are cached under --cache (out/bench_metric/samples, gitignored): the teacher's 2,000 Heun-35 samples take
about 7 minutes on one CPU thread the first time. Writes <out>.md / .json / .csv with provenance.
"""
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from metrics.classes import class_coverage
from metrics.degrade import degrade
from metrics.frechet import feature_statistics, frechet_distance
from metrics.mnist_net import SHIPPED, load_mnist_feature_net, mnist_features
from metrics.precision_recall import DEFAULT_K, manifold_metrics
from runs.build import load_run
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.eval import reference_split
from runs.images import to_uint8
from runs.provenance import provenance
from runs.sample import sample

TEACHER = "bench/mnist_teacher.pt"
# (name, solver, nfe): the teacher at EDM's 35 NFE, at 9 NFE, and its one-step (1 NFE Euler) map, which needs no
# training (the blurry class mean of each noise: the worst "one-step student" there is)
TEACHER_SETS = [("teacher heun 35", "heun", 35), ("teacher heun 9", "heun", 9), ("teacher euler 1", "euler", 1)]
# trained one-step students, used when their run directories exist (they are not shipped: out/ is not in git);
# made by `python -m runs.bench distill` (bench/distill_mnist_30min.md, bench/distill_mnist_onestep.md)
STUDENTS = [("sid student (30 min)", "out/bench_30min/mnist_sid"),
            ("kd student (300 steps)", "out/bench_onestep/mnist_kd")]
BEST = "teacher heun 35"
# (better, worse) pairs the metric must separate
PAIRS = [("teacher heun 35", "teacher heun 9"), ("teacher heun 35", "teacher euler 1"),
         ("teacher heun 9", "teacher euler 1")] + [("teacher heun 35", name) for name, _ in STUDENTS]
LEVELS = {"gaussian_noise": [0, 0.02, 0.05, 0.1, 0.2], "blur": [0, 0.5, 1.0, 1.5, 2.0],
          "drop_classes": [0, 1, 2, 3, 5], "duplicate": [0, 0.5, 0.75, 0.9, 0.95]}
UNITS = {"gaussian_noise": "sigma (of [0, 1])", "blur": "sigma (pixels)", "drop_classes": "classes dropped",
         "duplicate": "fraction duplicated"}
KEYS = ("fid", "precision", "recall", "density", "coverage", "classes_covered", "class_tv_reference")
Z_SEPARATED = 3.0


class FeatureNet:
    """A named MNIST feature network: `features(uint8 images) -> [N, D]` (its `features` method, as the FID uses it)
    and the class it predicts from those features (`net.head(relu(features))`, as metrics.mnist_metrics does)."""

    def __init__(self, name, net, description=""):
        self.name, self.net, self.description = name, net, description

    def features(self, images):
        return mnist_features(self.net, images)

    def labels(self, features):
        device = next(self.net.parameters()).device
        with torch.inference_mode():
            return torch.cat([self.net.head(torch.relu(features[i:i + 4096].to(device))).argmax(1).cpu()
                              for i in range(0, len(features), 4096)])

    def scores(self, fake, real, fid_only=False, k=DEFAULT_K):
        """FID, precision, recall, density, coverage, classes_covered and class_tv_reference of feature sets fake
        against real: the numbers metrics.mnist_metrics gives for the same images."""
        report = {"fid": frechet_distance(*feature_statistics(fake), *feature_statistics(real))}
        if fid_only:
            return report
        report.update(manifold_metrics(fake, real, k=k))
        classes = class_coverage(self.labels(fake), self.labels(real), 10)
        report.update(classes_covered=classes["classes_covered"], class_tv_reference=classes["class_tv_reference"])
        return report


class FcOnly(torch.nn.Module):
    """A WideMnistNet read at its fc layer alone (before the ReLU): the class-level features, as the shipped net's."""

    def __init__(self, net):
        super().__init__()
        self.net, self.head, self.meta = net, net.head, getattr(net, "meta", {})

    def features(self, x):
        return self.net.blocks(x)[-1]


NET_NAMES = ("shipped", "wide", "wide-fc", "wide:PATH", "wide-fc:PATH")


def load_feature_nets(names, device="cpu"):
    """{name: FeatureNet} for names in NET_NAMES: 'shipped' (metrics/mnist_feature_net.pt), 'wide'
    (metrics/mnist_feature_net_wide.pt), 'wide-fc' (the wide net's fc layer alone, an ablation), and 'wide:PATH' /
    'wide-fc:PATH' for another wide checkpoint (e.g. one trained with another seed). Nothing is trained here."""
    from metrics.mnist_net_wide import SHIPPED as WIDE, load_wide_feature_net
    nets = {}
    for name in names:
        kind, _, path = name.partition(":")
        if name == "shipped":
            net = load_mnist_feature_net(SHIPPED, device=device, train_if_missing=False)
            nets[name] = FeatureNet(name, net, f"metrics/{SHIPPED.name}: MnistNet (seed {net.meta.get('seed')}), "
                                               f"its 128-d fc layer before the ReLU; held-out accuracy "
                                               f"{net.meta.get('heldout_accuracy', float('nan')):.4f}")
        elif kind in ("wide", "wide-fc") and (path or name == kind):
            file = Path(path) if path else WIDE
            net = load_wide_feature_net(file, device=device, train_if_missing=False)
            where = f"metrics/{WIDE.name}" if not path else str(path)
            accuracy = f"held-out accuracy {net.meta['heldout_accuracy']:.4f}"
            if kind == "wide":
                nets[name] = FeatureNet(name, net, f"{where}: WideMnistNet (seed {net.meta.get('seed')}), "
                                                   f"{net.feature_dim}-d: the 3 stage averages and the fc layer "
                                                   f"before the ReLU; {accuracy}")
            else:
                nets[name] = FeatureNet(name, FcOnly(net).eval(),
                                        f"{where}: the same WideMnistNet (seed {net.meta.get('seed')}) read at its "
                                        f"{net.fc.out_features}-d fc layer alone (ablation); {accuracy}")
        else:
            raise ValueError(f"unknown feature net {name!r}; known: {', '.join(NET_NAMES)}")
    return nets


def summarise(per_seed):
    """{key: (mean, std, values)} of a list of per-seed score dicts (std: sample std, ddof 1)."""
    if len(per_seed) < 2:
        raise ValueError(f"a seed spread needs at least 2 seeds, got {len(per_seed)}")
    out = {}
    for key in per_seed[0]:
        values = [float(s[key]) for s in per_seed]
        out[key] = (float(np.mean(values)), float(np.std(values, ddof=1)), values)
    return out


def seed_spread(net, samples, reference, n, seeds, reference_features=None):
    """The metric's noise from the real split: the first n samples scored against reference_split(reference, n, seed)[0]
    for each seed, as {key: (mean, std, per-seed values)} (keys: KEYS). reference_features: net's features of all of
    reference, when already computed."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"a seed spread needs at least 2 seeds, got {len(seeds)}")
    if not DEFAULT_K < n <= min(len(samples), len(reference) // 2):
        raise ValueError(f"n must be more than {DEFAULT_K} and at most the {len(samples)} samples and half the "
                         f"{len(reference)} reference images, got {n}")
    reference_features = net.features(reference) if reference_features is None else reference_features
    fake = net.features(samples[:n])
    return summarise([net.scores(fake, reference_features[reference_split(np.arange(len(reference)), n, seed)[0]])
                      for seed in seeds])


def is_monotone(values):
    """True when every value is strictly greater than the one before."""
    return all(b > a for a, b in zip(values, values[1:]))


def model_separation(better, worse, floor):
    """Each argument a (mean, std, values) of FID. ratio F_worse / F_better, excess_ratio (F_worse - floor) /
    (F_better - floor), z = (F_worse - F_better) / sqrt(sd_worse^2 + sd_better^2), separated: z >= Z_SEPARATED."""
    (fb, sb, _), (fw, sw, _), (f0, _, _) = better, worse, floor
    z = (fw - fb) / math.hypot(sb, sw) if sb or sw else math.copysign(math.inf, fw - fb)
    return {"ratio": fw / fb, "excess_ratio": (fw - f0) / (fb - f0) if fb > f0 else None, "z": z,
            "separated": bool(z >= Z_SEPARATED)}


def _cache_name(name, n, seed):
    return "".join(c if c.isalnum() else "_" for c in name) + f"_n{n}_seed{seed}.npz"


def model_samples(name, source, solver, nfe, n, seed, cache_dir, device, teacher=TEACHER):
    """uint8 [n, 1, 28, 28] samples (balanced classes, label i % 10) of the teacher (source = teacher path, with solver
    and nfe) or of a student run (solver None: its own one-step generate), cached as
    <cache_dir>/<name>_n<n>_seed<seed>.npz with how they were made (the first n of a larger cached set of the same seed
    are the same samples: the noises are drawn in batches of 250); returns (images, info)."""
    path = Path(cache_dir) / _cache_name(name, n, seed)
    stem = _cache_name(name, n, seed).rsplit(f"_n{n}_", 1)[0]
    for cached in sorted(Path(cache_dir).glob(f"{stem}_n*_seed{seed}.npz")):  # this n, or the first n of more (the
        m = cached.name[len(stem) + 2:].split("_seed")[0]                      # same noises and labels, batch 250)
        if m.isdigit() and (int(m) == n or (int(m) > n and n % 250 == 0)):
            with np.load(cached, allow_pickle=False) as npz:
                return npz["images"][:n], {**json.loads(str(npz["info"])), "n": n, "cache": str(cached)}
    tic = time.time()
    injected = {}
    if solver is None:  # a student: rebuilt around the shipped teacher (the path it recorded may be gone); only its
        injected["teacher"] = load_run(teacher, device)[1].denoiser()  # generator samples, the teacher is not called
    config, objective = load_run(source, device, **injected)
    labels = torch.arange(n) % 10
    nfe = nfe if nfe is not None else int(objective.eval_nfe or 1)
    samples, _, measured, rate = sample(objective, config, n, nfe, solver, batch=250, seed=seed, device=device,
                                        labels=labels)
    images = to_uint8(samples).numpy()
    info = {"name": name, "source": str(source), "solver": solver or "own generate", "nfe": measured,
            "n": n, "seed": seed, "images_per_sec": round(rate, 1), "seconds": round(time.time() - tic, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, images=images, labels=labels.numpy().astype(np.uint8), info=json.dumps(info))
    tmp.replace(path)
    return images, info


def _log(message):
    print(message, flush=True)


def bench_metric(n=2000, seeds=5, degrade_seeds=3, nets=("shipped", "wide"), out="bench/metric_mnist",
                 cache="out/bench_metric/samples", device="cpu", students=True, levels=None):
    """Run the three checks (module docstring) and write <out>.md / .json / .csv; returns the summary dict."""
    from data import DATASETS
    tic = time.time()
    levels = LEVELS if levels is None else levels
    if seeds < 2 or degrade_seeds < 2:
        raise ValueError(f"--seeds and --degrade-seeds must be at least 2 (a spread), got {seeds}, {degrade_seeds}")
    dataset = DATASETS["mnist"]()
    real, labels = dataset.images.numpy(), dataset.labels.numpy()
    if not DEFAULT_K < n <= len(real) // 2:
        raise ValueError(f"--n must be more than {DEFAULT_K} and at most half the {len(real)} real digits, got {n}")
    feature_nets = load_feature_nets(nets, device)
    splits = {s: reference_split(np.arange(len(real)), n, s) for s in range(max(seeds, degrade_seeds))}

    models, model_info = {}, {}
    for name, solver, nfe in TEACHER_SETS:
        models[name], model_info[name] = model_samples(name, TEACHER, solver, nfe, n, 0, cache, device)
    notes = []
    for name, run in STUDENTS:
        if students and Path(run).is_dir():
            models[name], model_info[name] = model_samples(name, run, None, None, n, 0, cache, device)
        else:
            notes.append(f"{name}: {run} not present; not scored (the teacher's Euler-1 map is the one-step sample)")
    _log(f"samples ready ({time.time() - tic:.0f} s)")

    results = {}
    for net_name, net in feature_nets.items():
        real_features = net.features(real)
        ref = {s: real_features[splits[s][0]] for s in splits}
        floor = summarise([net.scores(real_features[splits[s][1]], ref[s]) for s in range(seeds)])
        entry = {"description": net.description, "floor": floor, "models": {}, "degradations": {}}
        for name, images in models.items():
            fake = net.features(images)
            entry["models"][name] = summarise([net.scores(fake, ref[s]) for s in range(seeds)])
        _log(f"{net_name}: floor {floor['fid'][0]:.3g} +- {floor['fid'][1]:.2g}; " + ", ".join(
            f"{k} {v['fid'][0]:.3g}" for k, v in entry["models"].items()) + f" ({time.time() - tic:.0f} s)")
        for kind, kind_levels in levels.items():
            rows = []
            for level in kind_levels:
                per_seed = []
                for s in range(degrade_seeds):
                    reference_idx, other_idx = splits[s]
                    if kind == "drop_classes":  # n digits of the kept classes, from everything outside the reference
                        pool = np.setdiff1d(np.arange(len(real)), reference_idx)
                        images = degrade(kind, real[pool], level, seed=s, labels=labels[pool], n=n)
                    else:
                        images = degrade(kind, real[other_idx], level, seed=s)
                    per_seed.append(net.scores(net.features(images), ref[s]))
                rows.append({"level": level, **summarise(per_seed)})
            means = [r["fid"][0] for r in rows]
            every_seed = all(is_monotone([r["fid"][2][s] for r in rows]) for s in range(degrade_seeds))
            entry["degradations"][kind] = {"rows": rows, "monotone_mean": is_monotone(means),
                                           "monotone_every_seed": every_seed}
            _log(f"{net_name}: {kind} FID {' '.join(f'{m:.3g}' for m in means)} monotone {is_monotone(means)} "
                 f"(every seed: {every_seed}) ({time.time() - tic:.0f} s)")
        entry["separation"] = [{"better": b, "worse": w, **model_separation(entry["models"][b]["fid"],
                                                                           entry["models"][w]["fid"], floor["fid"])}
                               for b, w in PAIRS if b in entry["models"] and w in entry["models"]]
        results[net_name] = entry

    summary = {"n": n, "seeds": seeds, "degrade_seeds": degrade_seeds, "k": DEFAULT_K, "levels": levels,
               "z_separated": Z_SEPARATED, "models": model_info, "notes": notes, "nets": results,
               "feature_net_meta": {name: dict(getattr(net.net, "meta", {})) for name, net in feature_nets.items()},
               "seconds": round(time.time() - tic, 1), "device": str(device), "provenance": provenance(device)}
    write(out, summary)
    return summary


def _num(x):
    x = float(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _pm(stat):
    return f"{_num(stat[0])} ± {_num(stat[1])}"


def _classes(stat):
    return f"{stat[0]:.1f} ± {stat[1]:.1f}"


def verdict(entry, degrade_seeds):
    """One line: degradations monotone (mean / every seed), pairs separated."""
    d = entry["degradations"]
    mean = [k for k, v in d.items() if v["monotone_mean"]]
    every = [k for k, v in d.items() if v["monotone_every_seed"]]
    sep = [p for p in entry["separation"] if p["separated"]]
    t35 = entry["models"].get(BEST)
    floor = entry["floor"]["fid"]
    floor_z = (t35["fid"][0] - floor[0]) / math.hypot(t35["fid"][1], floor[1]) if t35 else float("nan")
    missing = f" (not: {', '.join(k for k in d if k not in every)})" if len(every) < len(d) else ""
    return (f"degradations monotone in the mean: {len(mean)}/{len(d)}, in every one of {degrade_seeds} seeds: "
            f"{len(every)}/{len(d)}{missing}; "
            f"model pairs separated (z >= {Z_SEPARATED:g}): {len(sep)}/{len(entry['separation'])}, smallest z "
            f"{min(p['z'] for p in entry['separation']):.1f}; {BEST} above the floor: z {floor_z:.1f}")


def csv_rows(summary):
    """Long-format rows: net, check, name, level, metric, mean, std, per-seed values."""
    rows = []
    for net_name, entry in summary["nets"].items():
        def add(check, name, level, stats):
            for key in KEYS:
                mean, std, values = stats[key]
                rows.append({"net": net_name, "check": check, "name": name, "level": level, "metric": key,
                             "mean": round(mean, 5), "std": round(std, 5),
                             "per_seed": " ".join(f"{v:.5g}" for v in values)})
        add("floor", "real vs real", "", entry["floor"])
        for name, stats in entry["models"].items():
            add("model", name, "", stats)
        for kind, d in entry["degradations"].items():
            for row in d["rows"]:
                add("degradation", kind, row["level"], row)
    return rows


def write(out, summary):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = csv_rows(summary)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(markdown(summary))


def markdown(s):
    nets = list(s["nets"])
    lines = ["# Validating the MNIST metric: `python -m runs.bench metric`", "",
             f"Every figure is the mean ± standard deviation over {s['seeds']} seeds of the real split "
             f"(runs.eval.reference_split; degradations: {s['degrade_seeds']} seeds) of n = {s['n']} images scored "
             f"against n real digits; precision / recall: k-NN manifolds with k = {s['k']}; classes: digits "
             "predicted by the feature net's own classifier that hold at least 5 % of the set. Feature nets:", ""]
    lines += [f"- **{name}**: {e['description']}" for name, e in s["nets"].items()]
    lines += ["", "FIDs of different feature nets are on different scales: compare a net's figures with its own floor "
              "and with each other (ratios), never across nets.", "", "## Verdict", ""]
    lines += [f"- **{name}**: {verdict(e, s['degrade_seeds'])}" for name, e in s["nets"].items()]
    if s.get("analysis"):  # written by hand after a run (a rerun drops it with the numbers it was about)
        lines += ["", "## What the numbers say", ""] + [f"- {text}" for text in s["analysis"]]
    lines += ["", "## 1. Real-data floor (n real digits against n other real digits)", "",
              "| feature net | FID | precision | recall | classes |", "|---|---|---|---|---|"]
    for name, e in s["nets"].items():
        f = e["floor"]
        lines.append(f"| {name} | {_pm(f['fid'])} | {_pm(f['precision'])} | {_pm(f['recall'])} | "
                     f"{_classes(f['classes_covered'])} |")
    lines += ["", "## 2. Model separation", "",
              "FID / floor is the mean FID over the mean floor. Samples: n per model, balanced classes, seed 0.", ""]
    header = "| model | " + " | ".join(f"{n} FID | {n} FID / floor | {n} precision | {n} recall | {n} classes"
                                        for n in nets) + " |"
    lines += [header, "|---|" + "---|" * (5 * len(nets))]
    for model, info in s["models"].items():
        cells = []
        for name in nets:
            m, f = s["nets"][name]["models"][model], s["nets"][name]["floor"]["fid"][0]
            cells.append(f"{_pm(m['fid'])} | {m['fid'][0] / f:.2f} | {_pm(m['precision'])} | {_pm(m['recall'])} | "
                         f"{_classes(m['classes_covered'])}")
        lines.append(f"| {model} ({info['solver']}, {info['nfe']:g} NFE) | " + " | ".join(cells) + " |")
    lines += ["", f"Pairs (better, worse): FID ratio, excess ratio (distance above the floor, worse over better) and "
              f"z = (F_worse - F_better) / sqrt(sd_worse² + sd_better²); separated when z >= "
              f"{s['z_separated']:g}.", "",
              "| better | worse | " + " | ".join(f"{n} ratio | {n} excess ratio | {n} z" for n in nets) + " |",
              "|---|---|" + "---|" * (3 * len(nets))]
    pairs = [(p["better"], p["worse"]) for p in s["nets"][nets[0]]["separation"]]
    for i, (better, worse) in enumerate(pairs):
        cells = []
        for name in nets:
            p = s["nets"][name]["separation"][i]
            excess = "n/a (better <= floor)" if p["excess_ratio"] is None else f"{p['excess_ratio']:.2f}"
            cells.append(f"{p['ratio']:.2f} | {excess} | {p['z']:.1f}{'' if p['separated'] else ' (no)'}")
        lines.append(f"| {better} | {worse} | " + " | ".join(cells) + " |")
    lines += ["", "## 3. Degraded real digits", "",
              "Level 0 of noise, blur and duplication is the floor's own sets; drop_classes draws its n digits from "
              "all digits outside the reference split, so its level 0 is a different real set.", ""]
    for kind, kind_levels in s["levels"].items():
        flags = ", ".join(f"{name}: {'monotone' if e['degradations'][kind]['monotone_mean'] else 'NOT monotone'} "
                          f"in the mean, {'' if e['degradations'][kind]['monotone_every_seed'] else 'NOT '}"
                          "in every seed" for name, e in s["nets"].items())
        lines += [f"### {kind} ({UNITS.get(kind, 'level')}): {flags}", "",
                  "| level | " + " | ".join(f"{n} FID | {n} precision | {n} recall | {n} classes" for n in nets) + " |",
                  "|---|" + "---|" * (4 * len(nets))]
        for i, level in enumerate(kind_levels):
            cells = []
            for name in nets:
                r = s["nets"][name]["degradations"][kind]["rows"][i]
                cells.append(f"{_pm(r['fid'])} | {_pm(r['precision'])} | {_pm(r['recall'])} | "
                             f"{_classes(r['classes_covered'])}")
            lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in s["notes"]]
    lines += [f"- {s['seconds'] / 60:.1f} minutes on {s['provenance']['device']}; models: " + "; ".join(
        f"{k}: {v['source']} ({v['images_per_sec']} images/s)" for k, v in s["models"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.bench metric", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=2000, help="images per set (samples and reference)")
    p.add_argument("--seeds", type=positive_int, default=5, help="real-split seeds for the floor and the models")
    p.add_argument("--degrade-seeds", type=positive_int, default=3, help="seeds for each degradation level")
    p.add_argument("--nets", default="shipped,wide", help=f"comma-separated feature nets: {', '.join(NET_NAMES)}")
    p.add_argument("--no-students", action="store_true", help="skip the trained students even when present")
    p.add_argument("--cache", default="out/bench_metric/samples", help="where model samples are cached")
    p.add_argument("--out", default="bench/metric_mnist")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        nets = [name.strip() for name in args.nets.split(",") if name.strip()]
        summary = bench_metric(args.n, args.seeds, args.degrade_seeds, nets, args.out, args.cache,
                               pick_device(args.device), students=not args.no_students)
        print(f"wrote {args.out}.md ({summary['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
