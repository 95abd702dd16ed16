"""Score samples: python -m runs.eval samples.npz --metric fid-mnist [--ref REF.npz] [--n N] [--json [PATH]]

samples.npz is what runs.sample writes: `images` uint8 [N, C, H, W] (or [N, H, W]), or `samples` float [N, D] for
vector data. The reference defaults to the shipped MNIST digits (vector data needs --ref). --n N scores N samples
against N seeded-random reference images, so that the number is comparable with the real-data floor:

    python -m runs.eval --floor --metric fid-mnist --n 2000     # n reference digits against n OTHER ones

--metric takes a comma-separated list; the mode-coverage metrics print several numbers each:

    python -m runs.eval samples.npz --metric fid-mnist,precision-recall-mnist,class-histogram-mnist --n 2000
    python -m runs.eval samples.npz --metric precision-recall --ref data.npz --k 3     # raw vectors (toy data)

swd / mmd / precision-recall on images compare the flattened pixels in [-1, 1]. Precision / recall depend on k and
on the set sizes: compare numbers at the same --n and --k only. `mnist_report` is the same for code (the bench).
"""
import inspect
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from metrics import DEFAULT_K, METRICS, mnist_metrics
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.images import to_uint8

VECTOR_METRICS = ("swd", "mmd", "precision-recall")
SPREAD_SEEDS = 5  # mnist_report: reference splits each MNIST number is the mean of, with its std beside it
MNIST_GROUPS = {"fid-mnist": "fid", "precision-recall-mnist": "manifold", "class-histogram-mnist": "classes"}


def load_array(path):
    """`images` uint8 [N, C, H, W] (from [N, H, W] too) or `samples` float [N, D] of an .npz file, as a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with npz:
            key = next((k for k in ("images", "samples") if k in npz.files), None)
            if key is None:
                raise KeyError(f"{path} has keys {sorted(npz.files)}, expected 'images' (uint8 [N, C, H, W]) "
                               f"or 'samples' (float [N, D])")
            array = npz[key]
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        detail = " ".join(str(error).split())[:120]
        raise ValueError(f"cannot read {path} as an .npz archive ({type(error).__name__}: {detail})") from None
    if key == "images":
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(f"'images' in {path} must be uint8 [N, C, H, W] or [N, H, W], "
                             f"got {array.dtype} {list(array.shape)}")
        array = array[:, None] if array.ndim == 3 else array
    elif array.dtype.kind != "f" or array.ndim != 2:
        raise ValueError(f"'samples' in {path} must be float [N, D], got {array.dtype} {list(array.shape)}")
    if len(array) < 2:
        raise ValueError(f"{path} holds {len(array)} {key}; a metric needs at least 2")
    return array


def default_reference():
    from data import DATASETS
    return DATASETS["mnist"]().images.numpy()


def reference_split(reference, n, seed=0):
    """Two disjoint seeded subsets of the reference: the first n items (what n samples are scored against) and the
    next n (the other half of the real-data floor; shorter when the reference has fewer than 2n items)."""
    order = np.random.default_rng(seed).permutation(len(reference))
    return reference[order[:n]], reference[order[n:2 * n]]


def parse_metrics(text):
    """'fid-mnist,precision-recall-mnist' -> ['fid-mnist', 'precision-recall-mnist'], each checked against METRICS."""
    names = [name.strip() for name in str(text).split(",")]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(map(repr, unknown)) or repr(text)}; known: "
                         f"{', '.join(sorted(METRICS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"metric named twice in {text!r}")
    return names


def score(name, samples, reference, device, mnist_net=None, **options):
    """METRICS[name](samples, reference), after checking they match (images are flattened for swd / mmd /
    precision-recall); options (k, min_share, ...) go to the metrics whose signature takes them, and mnist_net (a
    loaded MNIST feature net) to the *-mnist ones as their `net`."""
    if (samples.dtype == np.uint8) != (reference.dtype == np.uint8) or samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {samples.dtype} {list(samples.shape[1:])} and reference {reference.dtype} "
                         f"{list(reference.shape[1:])} are not the same kind of data")
    if name in VECTOR_METRICS and samples.dtype == np.uint8:
        samples, reference = (a.reshape(len(a), -1).astype(np.float64) / 127.5 - 1 for a in (samples, reference))
    fn = METRICS[name]
    parameters = inspect.signature(fn).parameters
    if mnist_net is not None and name.endswith("-mnist"):
        options = {**options, "net": mnist_net}
    kwargs = {key: value for key, value in {"device": device, **options}.items() if key in parameters}
    return fn(samples, reference, **kwargs)


def score_all(names, samples, reference, device, **options):
    """{name: score(name, ...)} for each name, with the MNIST metrics among them (MNIST_GROUPS) computed by one
    mnist_metrics call, so that each set goes through the feature net once however many of them are asked for."""
    grouped = [name for name in names if name in MNIST_GROUPS]
    values = {}
    if len(grouped) > 1:
        if samples.dtype != np.uint8 or reference.dtype != np.uint8 or samples.shape[1:] != reference.shape[1:]:
            raise ValueError(f"{', '.join(grouped)} need uint8 images for both samples ({samples.dtype}) and "
                             f"reference ({reference.dtype}) of one shape")
        flags = {group: name in grouped for name, group in MNIST_GROUPS.items()}
        report = mnist_metrics(samples, reference, net=options.get("mnist_net"), device=device,
                               k=options.get("k", DEFAULT_K), min_share=options.get("min_share"), **flags)
        if "fid-mnist" in grouped:
            values["fid-mnist"] = report.pop("fid_mnist")
        if "precision-recall-mnist" in grouped:
            values["precision-recall-mnist"] = {key: report.pop(key)
                                                for key in ("precision", "recall", "density", "coverage")}
        if "class-histogram-mnist" in grouped:
            values["class-histogram-mnist"] = report
    return {name: values[name] if name in values else score(name, samples, reference, device, **options)
            for name in names}


def mnist_report(samples, n=None, seed=0, reference=None, device="cpu", net=None, k=DEFAULT_K, min_share=None,
                 spread_seeds=SPREAD_SEEDS, **parts):
    """{fid_mnist, precision, recall, density, coverage, classes_covered, class_tv_uniform, class_kl_uniform,
    class_tv_reference, class_kl_reference, ..., n} of MNIST samples (uint8 [N, 1, 28, 28] or float in [-1, 1],
    numpy or torch) against n seeded-random real digits (reference_split, as the CLI's --n): the first n samples
    (default all) against n reference images (default: the shipped digits). Pass net to load the feature net once;
    `parts` (fid, classes, manifold = False) leave parts out.

    The metric's own noise beside every number: with spread_seeds = S > 1 the samples are scored against the
    reference splits of seeds seed, ..., seed + S - 1, each number is their mean and `<key>_std` their standard
    deviation (ddof 1), and `spread_seeds` says S; S = 1 is one split, no `_std` keys (the numbers of before).
    The feature net sees the samples once and the reference digits once, whatever S."""
    if isinstance(samples, torch.Tensor):
        samples = (samples if samples.dtype == torch.uint8 else to_uint8(samples.detach())).cpu().numpy()
    samples = np.asarray(samples)
    if samples.dtype != np.uint8:
        raise ValueError(f"MNIST samples must be uint8 images or a float tensor in [-1, 1], got {samples.dtype}")
    samples = samples[:, None] if samples.ndim == 3 else samples
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 28, 28):
        raise ValueError(f"MNIST samples must be [N, 1, 28, 28] or [N, 28, 28], got {list(samples.shape)}")
    reference = default_reference() if reference is None else np.asarray(reference)
    n = len(samples) if n is None else n
    if not k < n <= min(len(samples), len(reference)):
        raise ValueError(f"n must be more than k={k} and at most the {len(samples)} samples and the "
                         f"{len(reference)} reference images, got n={n}")
    if isinstance(spread_seeds, bool) or not isinstance(spread_seeds, int) or spread_seeds < 1:
        raise ValueError(f"spread_seeds must be a positive integer, got {spread_seeds!r}")
    if spread_seeds == 1:
        real = reference_split(reference, n, seed)[0]
        return {**mnist_metrics(samples[:n], real, net=net, device=device, k=k, min_share=min_share, **parts), "n": n}
    from metrics import mnist_feature_metrics
    from metrics.mnist_net import load_metric_net, mnist_features
    net = load_metric_net(device=device) if net is None else net
    splits = [reference_split(np.arange(len(reference)), n, seed + i)[0] for i in range(spread_seeds)]
    used = np.unique(np.concatenate(splits))  # each reference digit through the net once
    features = mnist_features(net, reference[used])
    row = np.full(len(reference), -1)
    row[used] = np.arange(len(used))
    fake = mnist_features(net, samples[:n])
    reports = [mnist_feature_metrics(fake, features[row[split]], net, device, k, min_share, **parts) for split in splits]
    out = {}
    for key, value in reports[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = np.array([r[key] for r in reports], dtype=np.float64)
            mean = float(values.mean())
            out[key] = int(mean) if isinstance(value, int) and mean.is_integer() else mean  # classes_covered: 10
            out[f"{key}_std"] = float(values.std(ddof=1))
        else:
            out[key] = value  # class_shares: the samples' own, the same for every split
    return {**out, "n": n, "spread_seeds": spread_seeds}


def _format(name, value):
    if not isinstance(value, dict):
        return f"{name} {value:.4f}"
    parts = [f"{key} {item:.4f}" if isinstance(item, float) else f"{key} {item}" for key, item in value.items()
             if not isinstance(item, list)]
    lists = [f"{key} [{' '.join(f'{x:.3f}' for x in item)}]" for key, item in value.items() if isinstance(item, list)]
    return f"{name}: {', '.join(parts + lists)}"


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.eval", description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="?", help=".npz written by runs.sample (omit with --floor)")
    p.add_argument("--metric", default="fid-mnist", help=f"comma-separated, from: {', '.join(METRICS)}")
    p.add_argument("--ref", help=".npz with the reference `images` or `samples` (default: the shipped MNIST digits)")
    p.add_argument("--n", type=positive_int, help="number of samples and of reference items (default: all; --floor: 2000)")
    p.add_argument("--floor", action="store_true", help="score n reference items against n other ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subsets")
    p.add_argument("--k", type=positive_int, default=DEFAULT_K, help="neighbour of the precision-recall manifolds' radii")
    p.add_argument("--min-share", type=float, help="share of the samples that makes a class covered "
                                                   "(class-histogram-mnist; default half the uniform share)")
    p.add_argument("--ref-stats", metavar="STATS.npz", help="fid-inception against reference statistics (EDM / "
                                                          "pytorch-fid .npz: mu [2048], sigma [2048, 2048])")
    p.add_argument("--write-stats", metavar="OUT.npz", help="write the samples' Inception statistics (mu, sigma) "
                                                          "there, to serve as --ref-stats later, and stop")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write a JSON dict to PATH (default stdout)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        start = time.time()
        names = parse_metrics(args.metric)
        if args.floor == (args.samples is not None):
            raise ValueError("give either a samples .npz or --floor, not both or neither")
        if args.n is not None and args.n < 2:
            raise ValueError(f"--n must be at least 2, got {args.n}")
        if args.k < 1:
            raise ValueError(f"--k must be at least 1, got {args.k}")
        device = pick_device(args.device)
        samples = None if args.floor else load_array(args.samples)
        if args.write_stats or args.ref_stats:
            return inception_statistics_command(args, names, samples, device)
        if args.ref:
            reference = load_array(args.ref)
        elif samples is None or samples.dtype == np.uint8:
            reference = default_reference()
        else:
            raise ValueError("vector samples need a reference: pass --ref REF.npz")
        if samples is not None and samples.ndim == 4 and reference.ndim == 4 and \
                samples.shape[-2:] != reference.shape[-2:]:
            raise ValueError(f"samples are {samples.shape[-2]}x{samples.shape[-1]} images, the reference "
                             f"{reference.shape[-2]}x{reference.shape[-1]}: score them at the same resolution")
        if args.floor:
            n = args.n or 2000
            if 2 * n > len(reference):
                raise ValueError(f"--floor needs 2n = {2 * n} reference items, the reference has {len(reference)}")
            samples, reference = reference_split(reference, n, args.seed)
        elif args.n:
            if args.n > min(len(samples), len(reference)):
                raise ValueError(f"--n {args.n} is more than the {len(samples)} samples or the {len(reference)} "
                                 f"reference items")
            samples, reference = samples[:args.n], reference_split(reference, args.n, args.seed)[0]
        options = {"k": args.k, "min_share": args.min_share}
        if any(name.endswith("-mnist") for name in names):
            from metrics.mnist_net import load_metric_net
            options["mnist_net"] = load_metric_net(device=device)  # loaded once for all the MNIST metrics
        values = score_all(names, samples, reference, device, **options)
        result = {"metric": args.metric, "values": values, "samples": "floor" if args.floor else args.samples,
                  "reference": args.ref or "mnist (shipped)", "n_samples": len(samples),
                  "n_reference": len(reference), "seed": args.seed, "k": args.k,
                  "seconds": round(time.time() - start, 2)}
        if len(names) == 1:
            result["value"] = values[names[0]]
        lines = [_format(name, value) for name, value in values.items()]
        lines[-1] += (f" ({result['samples']}: {len(samples)} vs {len(reference)} reference, "
                      f"{result['seconds']:.1f} s)")
        if args.json == "-":
            print(json.dumps(result))
        else:
            print("\n".join(lines))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def inception_statistics_command(args, names, samples, device):
    """--write-stats (the samples' Inception mu and sigma to an .npz) or --ref-stats (fid-inception against one)."""
    from metrics.frechet import feature_statistics
    from metrics.inception import inception_features, load_inception, save_reference_statistics
    if samples is None or samples.dtype != np.uint8:
        raise ValueError("--write-stats / --ref-stats take uint8 images in a samples .npz (not --floor or vectors)")
    samples = samples[:args.n] if args.n else samples
    if args.write_stats:
        mu, sigma = feature_statistics(inception_features(load_inception(device=device), samples))
        save_reference_statistics(args.write_stats, mu, sigma)
        print(f"wrote Inception statistics of {len(samples)} images to {args.write_stats}")
        return
    if names != ["fid-inception"] or args.ref:
        raise ValueError("--ref-stats goes with --metric fid-inception alone and no --ref")
    value = METRICS["fid-inception"](samples, args.ref_stats, device=device)
    print(json.dumps({"metric": "fid-inception", "value": value, "reference": args.ref_stats,
                      "n_samples": len(samples)}) if args.json == "-" else f"fid-inception {value:.4f} "
          f"({args.samples}: {len(samples)} vs statistics {args.ref_stats})")


if __name__ == "__main__":
    main()
