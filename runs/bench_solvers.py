"""The solver benchmark: every registered solver x NFE, against the exact ODE map, on Karras and fitted schedules.

    bench_solvers("bench/solvers", dims=(2, 64), nfes=(4, 8, 16))    # writes .md, .csv, .json and .png

1. Analytic Gaussian mixture (data.mixtures, K components, each dim): the reference is the exact ODE map
   z -> x(0) (solvers.reference, DOP853 at rtol = atol = 1e-10), checked by halving both tolerances; the
   change must be far below the smallest error reported. For every deterministic solver and NFE: the RMSE
   of x0 to x(0), on Karras rho=7 and on a schedule fitted by solvers.optimise on OTHER noises. The Karras
   rows also give the RMSE at sigma_min (the last nonzero level) to x(sigma_min): the ODE discretisation
   error alone. "floor" is the RMSE of D(x(sigma_min), sigma_min) to x(0): what a solver whose last step is
   x = D (Euler, Heun, DPM-Solver++, UniPC) keeps at any NFE on a grid that ends at sigma_min.
2. Overhead: each solver's own time per step on a batch of images with a trivial denoiser D = 0.5 x,
   with the time spent inside the denoiser calls taken out.
3. With mnist_run: per solver and NFE, MNIST-FID against the same seeded subset of real digits runs.eval
   and runs.bench use, and the RMSE to a fine reference (Heun, mnist_reference_nfe, Karras), with Karras
   and fitted schedules. Stochastic samplers get FID only: they do not approximate the ODE map.
NFEs below a solver's minimum (its sigmas_for_nfe refuses them) are skipped and listed.

--workers N runs one process per solver (runs/bench_solvers_shards.py) after solving the references once into
--reference-cache; --merge joins result files; a result's setup["notes"] are printed under the header.
"""
import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from solvers import SOLVERS, CountingDenoiser, get_solver, options_for_nfe, sigmas_for_nfe
from solvers.optimise import _takes_generator, optimise_schedule, solve_batched
from runs.bench_solvers_report import markdown, plot_errors
from runs.checkpoint import load_checkpoint, save_checkpoint
from solvers.reference import reference_solution, reference_tolerance_check

FIELDS = ["part", "data", "solver", "nfe", "schedule", "rmse", "rmse_at_sigma_min", "fid_mnist", "fit_rmse_before",
          "fit_rmse_after", "fit_iters", "fit_seconds", "overhead_us_per_step", "denoiser_us_per_call", "tiny_unet_us_per_call",
          "steps", "sigmas"]


def rmse(a, b):
    return float((a.to(torch.float64) - b.to(torch.float64)).square().mean().sqrt())


def cached(cache_dir, key, compute, device):
    """compute() (a dict of tensors and numbers), kept in <cache_dir>/<key>.pt when cache_dir is set: parallel
    shards (runs/bench_solvers_shards.py) then share one reference solution instead of each solving it again.
    Written and read as a checkpoint (atomic, weights_only)."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        return load_checkpoint(path, map_location=device)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(value, path)
    return value


def _solver_dict(solvers):
    if solvers is None:
        return dict(SOLVERS)
    if isinstance(solvers, dict):
        return dict(solvers)
    return {name: get_solver(name) for name in solvers}


def _schedule(name, sample, nfe, sigma_min, sigma_max, skipped, where):
    """Karras sigmas for `nfe`, or None (recorded in `skipped`) when the solver refuses that budget."""
    try:
        return sigmas_for_nfe(sample, nfe, sigma_min=sigma_min, sigma_max=sigma_max)
    except ValueError as error:
        skipped.append({"data": where, "solver": name, "nfe": nfe, "reason": str(error)})
        return None


def is_stochastic(sample, denoiser, z, nfes, sigma_min, sigma_max, cond=None):
    """Whether the sampler's output depends on its generator's seed (DDIM at eta = 0 takes one and does not)."""
    if not _takes_generator(sample):
        return False
    for nfe in sorted(nfes, reverse=True):
        try:
            sigmas = sigmas_for_nfe(sample, nfe, sigma_min=sigma_min, sigma_max=sigma_max).to(z.device)
        except ValueError:
            continue
        x, part = sigma_max * z[:4], {k: v[:4] for k, v in (cond or {}).items()} or None
        with torch.no_grad():
            outs = [sample(denoiser, x, sigmas, cond=part, **options_for_nfe(sample, nfe),
                           generator=torch.Generator(device=z.device).manual_seed(seed)) for seed in (0, 1)]
        return not torch.equal(*outs)
    return False


def _fit(denoiser, name, sample, nfe, z, reference, cond, sigma_min, sigma_max, iters, batch_size, seed):
    tic = time.perf_counter()
    sigmas, info = optimise_schedule(denoiser, sample, nfe, z, sigma_min, sigma_max, reference, cond, iters,
                                     batch_size=batch_size, seed=seed, return_info=True)
    return sigmas, {"fit_rmse_before": math.sqrt(info["loss_before"]), "fit_rmse_after": math.sqrt(info["loss_after"]),
                    "fit_iters": iters, "fit_seconds": round(time.perf_counter() - tic, 2), "steps": info["steps"],
                    "sigmas": " ".join(f"{s:.6g}" for s in sigmas.tolist())}


def bench_gmm(dim, components, nfes, solvers, n, opt_n, opt_iters, sigma_min, sigma_max, seed, device, log,
              reference_cache=None):
    """Rows, skipped budgets and the reference summary for one mixture dimension."""
    from data.mixtures import gaussian_mixture_params
    from models.analytic import GaussianMixtureDenoiser
    teacher = GaussianMixtureDenoiser(**gaussian_mixture_params(dim, components, seed=seed)).to(device)
    where = f"gmm {dim}d K={components}"
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(device)
    z_fit = torch.randn(opt_n, dim, generator=generator, dtype=torch.float64).to(device)  # disjoint from z

    def references():
        tic = time.perf_counter()
        (x_min, x_ref), info = reference_tolerance_check(teacher, sigma_max * z, sigma_max, (sigma_min, 0.0))
        floor = rmse(teacher(x_min, torch.full((n,), sigma_min, dtype=torch.float64, device=device)), x_ref)
        fit = reference_solution(teacher, sigma_max * z_fit, sigma_max)[0][0] if opt_iters else None
        return {"x_min": x_min, "x_ref": x_ref, "x_ref_fit": fit, "nfe": info["nfe"],
                "tolerance_change": info["tolerance_change"], "floor": floor,
                "seconds": round(time.perf_counter() - tic, 2)}

    key = f"gmm{dim}_K{components}_seed{seed}_n{n}_fit{opt_n if opt_iters else 0}_{sigma_min:g}_{sigma_max:g}"
    ref = cached(reference_cache, key, references, device)
    x_min, x_ref, reference_fit = ref["x_min"], ref["x_ref"], ref["x_ref_fit"]
    summary = {"data": where, "reference_nfe": ref["nfe"], "tolerance_change": ref["tolerance_change"],
               "floor_rmse": ref["floor"], "reference_seconds": ref["seconds"]}
    log(f"{where}: reference {summary}")
    rows, skipped = [], []
    for name, sample in solvers.items():
        if is_stochastic(sample, teacher, z, nfes, sigma_min, sigma_max):
            skipped += [{"data": where, "solver": name, "nfe": nfe,
                         "reason": "stochastic sampler: it does not approximate the ODE map"} for nfe in nfes]
            continue
        for nfe in nfes:
            sigmas = _schedule(name, sample, nfe, sigma_min, sigma_max, skipped, where)
            if sigmas is None:
                continue
            counted, last = CountingDenoiser(teacher), {}
            x0 = sample(counted, sigma_max * z, sigmas.to(device), callback=lambda step: last.update(x=step["x"]),
                        **options_for_nfe(sample, nfe))
            if counted.nfe != nfe:
                raise ValueError(f"{name} spent {counted.nfe} evaluations for nfe={nfe}")
            base = {"part": "gmm", "data": where, "solver": name, "nfe": nfe}
            rows.append({**base, "schedule": "karras", "rmse": rmse(x0, x_ref), "steps": len(sigmas) - 1,
                         "rmse_at_sigma_min": rmse(last["x"], x_min) if len(sigmas) > 2 else None})
            if opt_iters:
                fitted, fit = _fit(teacher, name, sample, nfe, z_fit, reference_fit, None, sigma_min, sigma_max,
                                   opt_iters, None, seed)
                x0 = solve_batched(teacher, sample, fitted, z, options=options_for_nfe(sample, nfe), seed=seed)
                rows.append({**base, "schedule": "optimised", "rmse": rmse(x0, x_ref), **fit})
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
                         if k != "sigmas"))
    return rows, skipped, summary


def bench_overhead(solvers, nfe, shape, repeats, device, skipped):
    """Per solver: its own microseconds per step (total minus the time inside D = 0.5 x) and D's time per call.
    On a GPU wall-clock time (synchronised); on a CPU this process's CPU time, which a busy machine does not
    inflate."""
    rows = []
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = x.device.type == "cuda"
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else ((lambda: None), time.process_time)
    inside = [0.0]

    def trivial(x, sigma, **cond):
        sync()
        tic = clock()
        out = 0.5 * x
        sync()
        inside[0] += clock() - tic
        return out

    tiny_us = tiny_unet_us_per_call(x, repeats, sync, clock)
    for name, sample in solvers.items():
        sigmas = _schedule(name, sample, nfe, 0.002, 80.0, skipped, f"overhead {list(shape)}")
        if sigmas is None:
            continue
        options = options_for_nfe(sample, nfe)
        if _takes_generator(sample):
            options["generator"] = torch.Generator(device=x.device).manual_seed(0)
        sigmas = sigmas.to(device)
        totals, insides = [], []
        for _ in range(repeats + 1):  # the first run warms up
            inside[0] = 0.0
            sync()
            tic = clock()
            with torch.no_grad():
                sample(trivial, x * 80.0, sigmas, **options)
            sync()
            totals.append(clock() - tic)
            insides.append(inside[0])
        steps = len(sigmas) - 1
        own = statistics.median(t - i for t, i in zip(totals[1:], insides[1:]))
        rows.append({"part": "overhead", "data": f"float32 {list(shape)}, {'GPU wall' if cuda else 'CPU'} time",
                     "solver": name,
                     "nfe": nfe, "steps": steps, "overhead_us_per_step": round(1e6 * own / steps, 1),
                     "denoiser_us_per_call": round(1e6 * statistics.median(insides[1:]) / nfe, 1),
                     "tiny_unet_us_per_call": tiny_us})
    return rows


def tiny_unet_us_per_call(x, repeats, sync, clock):
    """Microseconds of one call of a deliberately tiny real denoiser on x: a 1-level-per-halving U-Net with 16 base
    channels, one block per level and no attention (~0.3 M parameters), the yardstick for a solver's own cost."""
    from models import Denoiser, UNet
    net = Denoiser(UNet(img_resolution=x.shape[-1], in_channels=x.shape[1], model_channels=16, channel_mult=(1, 2, 2),
                        num_blocks=1, attn_resolutions=(), mid_attention=False)).to(x.device).eval()
    sigma = torch.full((x.shape[0],), 1.0, device=x.device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync()
            tic = clock()
            net(x, sigma)
            sync()
            times.append(clock() - tic)
    return round(1e6 * statistics.median(times[1:]), 1)


def bench_mnist(run, solvers, nfes, n, opt_n, opt_iters, reference_nfe, seed, device, log, batch_size=500,
                reference_cache=None):
    """FID and RMSE-to-fine-reference rows for a trained MNIST teacher, Karras and fitted schedules."""
    from data.trajectories import fingerprint
    from metrics import METRICS
    from runs.eval import default_reference, reference_split
    from runs.images import to_uint8
    from runs.optimise_schedule import load_teacher, noises, teacher_reference
    denoiser, shape, num_classes, sigma_range, _ = load_teacher(str(run), device)
    sigma_min, sigma_max = sigma_range.get("sigma_min", 0.002), sigma_range.get("sigma_max", 80.0)
    real, other = reference_split(default_reference(), n, seed)  # the subsets runs.bench teacher and runs.eval use
    fid = METRICS["fid-mnist"]
    generator = torch.Generator().manual_seed(seed)
    z, cond = noises(n, shape, num_classes, generator, device)
    z_fit, cond_fit = noises(opt_n, shape, num_classes, generator, device)

    def references():
        fine = teacher_reference(denoiser, z, sigma_min, sigma_max, cond, False, reference_nfe, batch_size)
        coarser = teacher_reference(denoiser, z, sigma_min, sigma_max, cond, False, reference_nfe // 2, batch_size)
        fit = teacher_reference(denoiser, z_fit, sigma_min, sigma_max, cond_fit, False, reference_nfe,
                                batch_size) if opt_iters else None
        floor = round(fid(other, real, device=device), 3) if len(other) == n else None
        return {"x_ref": fine, "x_ref_fit": fit, "change_at_half_nfe": rmse(coarser, fine), "floor": floor}

    key = (f"mnist_{fingerprint(denoiser)[:16]}_seed{seed}_n{n}_fit{opt_n if opt_iters else 0}_heun{reference_nfe}_"
           f"{sigma_min:g}_{sigma_max:g}")
    ref = cached(reference_cache, key, references, device)
    x_ref, reference_fit = ref["x_ref"], ref["x_ref_fit"]
    summary = {"data": "mnist", "n": n, "reference": f"heun {reference_nfe} NFE karras",
               "reference_change_at_half_nfe": ref["change_at_half_nfe"], "floor_fid_mnist": ref["floor"]}
    rows, skipped = [], []
    for name, sample in solvers.items():
        stochastic = is_stochastic(sample, denoiser, z, nfes, sigma_min, sigma_max, cond)
        for nfe in nfes:
            sigmas = _schedule(name, sample, nfe, sigma_min, sigma_max, skipped, "mnist")
            if sigmas is None:
                continue
            schedules = {"karras": (sigmas, {})}
            if opt_iters and not stochastic:
                schedules["optimised"] = _fit(denoiser, name, sample, nfe, z_fit, reference_fit, cond_fit,
                                              sigma_min, sigma_max, opt_iters, batch_size, seed)
            for schedule, (levels, fit) in schedules.items():
                x0 = solve_batched(denoiser, sample, levels, z, cond, options_for_nfe(sample, nfe), batch_size, seed)
                rows.append({"part": "mnist", "data": "mnist", "solver": name, "nfe": nfe, "schedule": schedule,
                             "fid_mnist": round(fid(to_uint8(x0.cpu()).numpy(), real, device=device), 3),
                             "rmse": None if stochastic else rmse(x0, x_ref), **fit})
                log(rows[-1])
    return rows, skipped, summary


def bench_solvers(out_prefix, dims=(2, 64, 3072), components=8, nfes=(3, 4, 5, 6, 8, 10, 16, 32), solvers=None,
                  n=256, seed=0, opt_n=256, opt_iters=300, opt_dims=None, sigma_min=0.002, sigma_max=80.0, overhead_nfe=10,
                  overhead_shape=(64, 3, 32, 32), overhead_repeats=5, mnist_run=None, mnist_nfes=(4, 6, 8, 10, 16),
                  mnist_n=2000, mnist_opt_n=128, mnist_opt_iters=150, mnist_reference_nfe=255, device="cpu",
                  plot=True, log=print, reference_cache=None):
    """Run the benchmark and write <out_prefix>.md, .csv, .json (rows, skipped budgets, references) and .png.
    opt_iters = 0 skips the fitted schedules, opt_dims (default all) limits them to some dims (a fit costs
    about 3 opt_iters + 14 solves); overhead_repeats = 0 skips the overhead timing; reference_cache (a folder)
    keeps the reference solutions for other runs with the same data, noises and teacher."""
    solvers = _solver_dict(solvers)
    device = torch.device(device)
    rows, skipped, references = [], [], []
    for dim in dims:
        iters = opt_iters if opt_dims is None or dim in opt_dims else 0
        part_rows, part_skipped, summary = bench_gmm(dim, components, nfes, solvers, n, opt_n, iters,
                                                     sigma_min, sigma_max, seed, device, log, reference_cache)
        rows, skipped, references = rows + part_rows, skipped + part_skipped, references + [summary]
    if overhead_repeats:
        rows += bench_overhead(solvers, overhead_nfe, overhead_shape, overhead_repeats, device, skipped)
    if mnist_run is not None:
        part_rows, part_skipped, summary = bench_mnist(mnist_run, solvers, mnist_nfes, mnist_n, mnist_opt_n,
                                                       mnist_opt_iters, mnist_reference_nfe, seed, device, log,
                                                       reference_cache=reference_cache)
        rows, skipped, references = rows + part_rows, skipped + part_skipped, references + [summary]
    machine = platform.processor() or platform.machine()
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, host {machine}"
    setup = {"n": n, "opt_n": opt_n, "opt_iters": opt_iters, "opt_dims": list(opt_dims or dims),
             "components": components, "seed": seed,
             "sigma_min": sigma_min, "sigma_max": sigma_max, "device": str(device), "torch": torch.__version__,
             "machine": f"{machine}, {torch.get_num_threads()} threads"}
    if mnist_run is not None:
        setup.update(mnist_run=str(mnist_run), mnist_n=mnist_n, mnist_opt_n=mnist_opt_n,
                     mnist_reference_nfe=mnist_reference_nfe)
    from runs.provenance import provenance
    result = {"setup": setup, "provenance": provenance(device), "references": references, "rows": rows,
              "skipped": skipped}
    write_result(result, out_prefix, plot)
    return result


def check_references(result):
    """Set each mixture reference's smallest reported RMSE and whether the reference's own tolerance change is
    far (1e-3) below it: the reference must not limit any error the tables report."""
    for summary in result["references"]:
        if summary["data"] == "mnist":
            continue
        smallest = min((r[k] for r in result["rows"] if r["data"] == summary["data"]
                        for k in ("rmse", "rmse_at_sigma_min") if r.get(k)), default=math.inf)
        summary["smallest_rmse"] = smallest
        summary["reference_ok"] = summary["tolerance_change"] < 1e-3 * smallest
    return result


def write_result(result, out_prefix, plot=True):
    """<out_prefix>.csv, .json, .png (when there are errors to plot and plot is set) and .md of a result."""
    check_references(result)
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in result["rows"])
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot and plot_errors(result["rows"], out.with_name(out.name + ".png"), result["references"])
    out.with_name(out.name + ".md").write_text(markdown(result, out.name + ".png" if plotted else None))


def parser():
    from runs.cli import ArgumentParser, positive_int
    p = ArgumentParser(prog="python -m runs.bench solvers", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/solvers", help="output prefix")
    p.add_argument("--dims", type=positive_int, nargs="*", default=[2, 64, 3072], help="mixture dims (none: skip them)")
    p.add_argument("--nfes", type=positive_int, nargs="+", default=[3, 4, 5, 6, 8, 10, 16, 32])
    p.add_argument("--solvers", nargs="+", help="default: all registered")
    p.add_argument("--n", type=positive_int, default=256, help="evaluation noises per mixture")
    p.add_argument("--opt-n", type=positive_int, default=256, help="noises the mixture schedules are fitted on")
    p.add_argument("--opt-iters", type=int, default=300, help="0: no fitted schedules")
    p.add_argument("--opt-dims", type=positive_int, nargs="+", help="dims to fit schedules for (default: all)")
    p.add_argument("--overhead-repeats", type=int, default=5, help="0: no overhead timing")
    p.add_argument("--mnist-run", help="a trained MNIST teacher run for the FID part")
    p.add_argument("--mnist-n", type=positive_int, default=2000)
    p.add_argument("--mnist-nfes", type=positive_int, nargs="+", default=[4, 6, 8, 10, 16])
    p.add_argument("--mnist-opt-n", type=positive_int, default=128, help="noises the MNIST schedules are fitted on")
    p.add_argument("--mnist-opt-iters", type=int, default=150, help="0: Karras only on MNIST")
    p.add_argument("--mnist-reference-nfe", type=positive_int, default=255, help="Heun NFE of the MNIST reference solution")
    p.add_argument("--reference-cache", help="folder keeping reference solutions between runs")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel processes, one solver each (a GPU is "
                   "launch-bound on these small denoisers); see runs/bench_solvers_shards.py")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files into --out")
    p.add_argument("--device", default="auto")
    return p


def bench_kwargs(args):
    """bench_solvers' keyword arguments from parsed command-line arguments."""
    from runs.cli import pick_device
    return dict(out_prefix=args.out, dims=tuple(args.dims), nfes=tuple(args.nfes), solvers=args.solvers, n=args.n,
                opt_n=args.opt_n, opt_iters=args.opt_iters, opt_dims=args.opt_dims,
                overhead_repeats=args.overhead_repeats, mnist_run=args.mnist_run, mnist_n=args.mnist_n,
                mnist_nfes=tuple(args.mnist_nfes), mnist_opt_n=args.mnist_opt_n, mnist_opt_iters=args.mnist_opt_iters,
                mnist_reference_nfe=args.mnist_reference_nfe, reference_cache=args.reference_cache,
                device=pick_device(args.device))


def main(argv=None):
    from runs.bench_solvers_shards import merge_files, run_shards
    from runs.cli import cli_errors
    p = parser()
    args = p.parse_args(argv)
    with cli_errors():
        if args.merge:
            merge_files(args.merge, args.out)
        elif args.workers > 1:
            run_shards(p, args)
        else:
            bench_solvers(**bench_kwargs(args))


if __name__ == "__main__":
    main()
