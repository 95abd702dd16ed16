"""Score samples: python -m runs.eval samples.npz --metric fid-mnist [--ref REF.npz] [--n N] [--json [PATH]]

samples.npz is what runs.sample writes: `images` uint8 [N, C, H, W] (or [N, H, W]), or `samples` float [N, D] for
vector data. The reference defaults to the shipped MNIST digits (vector data needs --ref). --n N scores N samples
against N seeded-random reference images, so that the number is comparable with the real-data floor:

    python -m runs.eval --floor --metric fid-mnist --n 2000     # n reference digits against n OTHER ones

swd / mmd on images compare the flattened pixels in [-1, 1].
"""
import argparse
import inspect
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from metrics import METRICS
from runs.cli import cli_errors, pick_device

VECTOR_METRICS = ("swd", "mmd")


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


def score(name, samples, reference, device):
    """METRICS[name](samples, reference), after checking they match (images are flattened for swd / mmd)."""
    if (samples.dtype == np.uint8) != (reference.dtype == np.uint8) or samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {samples.dtype} {list(samples.shape[1:])} and reference {reference.dtype} "
                         f"{list(reference.shape[1:])} are not the same kind of data")
    if name in VECTOR_METRICS and samples.dtype == np.uint8:
        samples, reference = (a.reshape(len(a), -1).astype(np.float64) / 127.5 - 1 for a in (samples, reference))
    fn = METRICS[name]
    kwargs = {"device": device} if "device" in inspect.signature(fn).parameters else {}
    return fn(samples, reference, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runs.eval", description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="?", help=".npz written by runs.sample (omit with --floor)")
    p.add_argument("--metric", default="fid-mnist", help=f"one of: {', '.join(METRICS)}")
    p.add_argument("--ref", help=".npz with the reference `images` or `samples` (default: the shipped MNIST digits)")
    p.add_argument("--n", type=int, help="number of samples and of reference items (default: all; --floor: 2000)")
    p.add_argument("--floor", action="store_true", help="score n reference items against n other ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subsets")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write a JSON dict to PATH (default stdout)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        start = time.time()
        if args.metric not in METRICS:
            raise ValueError(f"unknown metric {args.metric!r}; known: {', '.join(sorted(METRICS))}")
        if args.floor == (args.samples is not None):
            raise ValueError("give either a samples .npz or --floor, not both or neither")
        if args.n is not None and args.n < 2:
            raise ValueError(f"--n must be at least 2, got {args.n}")
        device = pick_device(args.device)
        samples = None if args.floor else load_array(args.samples)
        if args.ref:
            reference = load_array(args.ref)
        elif samples is None or samples.dtype == np.uint8:
            reference = default_reference()
        else:
            raise ValueError("vector samples need a reference: pass --ref REF.npz")
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
        value = score(args.metric, samples, reference, device)
        result = {"metric": args.metric, "value": value, "samples": "floor" if args.floor else args.samples,
                  "reference": args.ref or "mnist (shipped)", "n_samples": len(samples),
                  "n_reference": len(reference), "seed": args.seed, "seconds": round(time.time() - start, 2)}
        line = (f"{args.metric} {value:.4f} ({result['samples']}: {len(samples)} vs {len(reference)} reference, "
                f"{result['seconds']:.1f} s)")
        if args.json == "-":
            print(json.dumps(result))
        else:
            print(line)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
