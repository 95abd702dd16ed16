"""The solver benchmark in parallel shards, one process per solver, merged into one report.

    python -m runs.bench solvers --workers 8 --device cuda ...     # same options and report as one process
    python -m runs.bench solvers --merge a.json b.json --out bench/solvers    # join results run apart

On a GPU one process is bound by Python and kernel launches (the mixture and the MNIST U-Net are small),
so several keep it busy. The parent solves the references once into a cache folder (every shard then loads
the same tensors), runs one worker per solver (at most `workers` at a time, each logging to
<out>_shards/<solver>.log), times the solvers' overhead itself afterwards (no worker's load skews it) and
merges the shards in the order the solvers were given. A failed shard does not stop the others: the merged
report holds what finished, then the error names the failures and their logs.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from solvers import SOLVERS, get_solver

from runs.bench_solvers import bench_kwargs, bench_solvers, check_references, write_result

# Options the parent sets for each worker itself.
OWN = {"help", "out", "solvers", "reference_cache", "overhead_repeats", "workers", "merge"}
SAME_SETUP = ("n", "seed", "components", "sigma_min", "sigma_max")


def worker_argv(parser, args, solver, out, cache):
    """The command line of the worker for one solver: every option as parsed, except the parent's own."""
    argv = [sys.executable, "-m", "runs.bench_solvers"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in OWN or value is None:
            continue
        argv += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    return argv + ["--solvers", solver, "--out", str(out), "--reference-cache", str(cache),
                   "--overhead-repeats", "0"]


def merge_results(results):
    """One result from several with the same setup: rows and skipped budgets joined, references once each."""
    first = results[0]["setup"]
    for result in results[1:]:
        differ = [k for k in SAME_SETUP if result["setup"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"cannot merge bench results with different {', '.join(differ)}: "
                             + ", ".join(f"{k} {first.get(k)} vs {result['setup'].get(k)}" for k in differ))
    references = {}
    for result in results:
        for summary in result["references"]:
            references.setdefault(summary["data"], summary)
    return check_references({"setup": dict(first), "references": list(references.values()),
                             "rows": [row for result in results for row in result["rows"]],
                             "skipped": [s for result in results for s in result["skipped"]]})


def merge_files(paths, out_prefix):
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read bench result {path}: {error}") from None
    merged = merge_results(results)
    write_result(merged, out_prefix)
    return merged


def run_shards(parser, args):
    names = args.solvers or list(SOLVERS)
    for name in names:
        get_solver(name)  # unknown names fail here, listing the known ones
    kwargs = bench_kwargs(args)
    folder = Path(f"{args.out}_shards")
    cache = Path(args.reference_cache or folder / "references")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"references -> {cache}", flush=True)
    bench_solvers(**{**kwargs, "out_prefix": folder / "references", "solvers": {}, "overhead_repeats": 0,
                     "plot": False, "reference_cache": cache})
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers))}
    pending, running, failed = list(names), {}, []
    while pending or running:
        while pending and len(running) < args.workers:
            name = pending.pop(0)
            with open(folder / f"{name}.log", "w") as log:
                running[name] = subprocess.Popen(worker_argv(parser, args, name, folder / name, cache), env=env,
                                                 stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                print(f"{name}: {'done' if process.returncode == 0 else f'FAILED ({process.returncode})'}",
                      flush=True)
                if process.returncode:
                    failed.append(name)
    results = [json.loads((folder / f"{name}.json").read_text()) for name in names
               if name not in failed]
    if args.overhead_repeats:
        results.append(bench_solvers(**{**kwargs, "out_prefix": folder / "overhead", "solvers": names, "dims": (),
                                        "mnist_run": None, "plot": False, "reference_cache": cache}))
    if results:
        merged = merge_results(results)
        merged["setup"]["workers"] = args.workers
        write_result(merged, args.out)
    if failed:
        raise ValueError(f"solver shards failed: {', '.join(failed)} (logs: {folder}/<solver>.log); "
                         f"the report at {args.out} holds the others")
