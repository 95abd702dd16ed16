"""Fit a schedule to a teacher: python -m runs.optimise_schedule TEACHER --solver heun --nfe 10 --n 256 --out s.txt

TEACHER is a run directory (or checkpoint) of a trained diffusion teacher, or `gmm:D:K` (optionally
`gmm:D:K:SEED`) for the analytic Gaussian mixture in D dimensions with K components (data.mixtures). The
schedule minimises the solver's mean squared error at exactly NFE evaluations to a converged reference on n
seeded noises (solvers.optimise), and is scored on `--holdout` OTHER noises against Karras rho=7. The
reference is the exact ODE solution (DOP853, solvers.reference) for the analytic mixture, and Heun with
--reference-nfe evaluations on a Karras grid for a trained teacher. The file is text that
solvers.schedules.from_file reads, with the fit's numbers as '#' metadata; sample with it through
`solvers.options_for_nfe(solver, nfe)`.
"""
import json
import math
from pathlib import Path

import torch

from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from solvers import get_solver, options_for_nfe, sample_heun, sigmas_for_nfe
from solvers.optimise import optimise_schedule, save_schedule, schedule_mse, solve_batched
from solvers.reference import reference_solution


def analytic_teacher(spec):
    """The GaussianMixtureDenoiser of a `gmm:D:K[:SEED]` spec (float64)."""
    from data.mixtures import gaussian_mixture_params
    from models.analytic import GaussianMixtureDenoiser
    fields = spec.split(":")[1:]
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or min(numbers[:2], default=0) < 1:
        raise ValueError(f"analytic teacher must be written gmm:D:K or gmm:D:K:SEED with integers D, K >= 1, "
                         f"got {spec!r}")
    return GaussianMixtureDenoiser(**gaussian_mixture_params(*numbers))


def load_teacher(spec, device):
    """(denoiser, per-sample shape, num_classes if it needs class labels else 0, sigma range dict, exact)."""
    if spec.startswith("gmm:"):
        teacher = analytic_teacher(spec).to(device)
        return teacher, teacher.shape, 0, {}, True
    from runs.build import build_dataset, load_run
    if not Path(spec).exists():
        raise FileNotFoundError(f"no run directory or checkpoint at {spec} (or use gmm:D:K for the analytic mixture)")
    config, objective = load_run(spec, device)
    denoiser = objective.denoiser()
    if denoiser is None:
        raise ValueError(f"run {spec} ({config['objective']['name']}) has no denoiser to sample with a solver")
    dataset = build_dataset(config)
    num_classes = dataset.num_classes if config["train"]["conditional"] else 0
    sigma_range = {k: float(config["objective"][k]) for k in ("sigma_min", "sigma_max") if k in config["objective"]}
    return denoiser, tuple(dataset.shape), num_classes, sigma_range, False


def teacher_reference(denoiser, z, sigma_min, sigma_max, cond=None, exact=True, reference_nfe=255, batch_size=None):
    """x_ref(z): the exact ODE map (DOP853) when `exact`, else Heun with reference_nfe evaluations (Karras)."""
    if exact:
        return reference_solution(denoiser, z.to(torch.float64) * sigma_max, sigma_max, (0.0,), cond=cond)[0][0]
    sigmas = sigmas_for_nfe("heun", reference_nfe, sigma_min=sigma_min, sigma_max=sigma_max)
    return solve_batched(denoiser, sample_heun, sigmas, z.to(torch.float64), cond,
                         options_for_nfe("heun", reference_nfe), batch_size)


def noises(n, shape, num_classes, generator, device):
    z = torch.randn([n, *shape], generator=generator, dtype=torch.float64).to(device)
    labels = torch.randint(0, num_classes, (n,), generator=generator).to(device) if num_classes else None
    return z, ({"class_labels": labels} if labels is not None else None)


def fit(teacher, solver, nfe, n=256, holdout=256, iters=400, seed=0, sigma_min=None, sigma_max=None,
        reference_nfe=255, batch_size=256, device="cpu"):
    """(sigmas, meta): the optimised schedule and the numbers of the fit (metadata for save_schedule)."""
    for name, value, low in (("n", n, 1), ("holdout", holdout, 0), ("iters", iters, 0), ("batch", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    sample = get_solver(solver)
    options = options_for_nfe(sample, nfe)
    denoiser, shape, num_classes, sigma_range, exact = load_teacher(teacher, device)
    sigma_min = sigma_range.get("sigma_min", 0.002) if sigma_min is None else sigma_min
    sigma_max = sigma_range.get("sigma_max", 80.0) if sigma_max is None else sigma_max
    generator = torch.Generator().manual_seed(seed)
    z, cond = noises(n, shape, num_classes, generator, device)
    z_held, cond_held = noises(holdout, shape, num_classes, generator, device)  # disjoint: the generator moved on
    reference = teacher_reference(denoiser, z, sigma_min, sigma_max, cond, exact, reference_nfe, batch_size)
    sigmas, info = optimise_schedule(denoiser, solver, nfe, z, sigma_min, sigma_max, reference, cond, iters,
                                     batch_size=batch_size, seed=seed, return_info=True)
    meta = {"solver": solver, "nfe": nfe, "steps": info["steps"], "teacher": teacher, "n": n, "seed": seed,
            "sigma_min": sigma_min, "sigma_max": sigma_max, "iters": iters, "evaluations": info["evaluations"],
            "reference": "exact ODE (DOP853)" if exact else f"heun {reference_nfe} NFE karras",
            "mse_init": info["loss_init"], "mse_before": info["loss_before"], "mse_after": info["loss_after"]}
    if holdout:
        reference_held = teacher_reference(denoiser, z_held, sigma_min, sigma_max, cond_held, exact, reference_nfe,
                                           batch_size)
        karras = sigmas_for_nfe(sample, nfe, sigma_min=sigma_min, sigma_max=sigma_max)
        meta["holdout"] = holdout
        meta["holdout_mse_karras"] = schedule_mse(denoiser, sample, karras, z_held, reference_held, cond_held,
                                                  options, batch_size, seed)
        meta["holdout_mse_optimised"] = schedule_mse(denoiser, sample, sigmas, z_held, reference_held, cond_held,
                                                     options, batch_size, seed)
    return sigmas, meta


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.optimise_schedule", description=__doc__.splitlines()[0])
    p.add_argument("teacher", help="run directory or checkpoint, or gmm:D:K[:SEED] for the analytic mixture")
    p.add_argument("--solver", default="heun")
    p.add_argument("--nfe", type=positive_int, default=10, help="denoiser evaluations per sample")
    p.add_argument("--n", type=positive_int, default=256, help="noises the schedule is fitted on")
    p.add_argument("--holdout", type=int, default=256, help="other noises it is scored on (0: skip)")
    p.add_argument("--iters", type=int, default=400, help="loss evaluations per initialisation")
    p.add_argument("--sigma-min", type=float, help="default: the run's own, else 0.002")
    p.add_argument("--sigma-max", type=float, help="default: the run's own, else 80")
    p.add_argument("--reference-nfe", type=int, default=255, help="Heun evaluations of a trained teacher's reference")
    p.add_argument("--batch", type=positive_int, default=256, help="samples per solver call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="schedule.txt", help="text file (read by solvers.schedules.from_file)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        if Path(args.out).suffix.lower() == ".json":
            raise ValueError(f"--out {args.out}: a .json schedule holds no metadata; use a text file like schedule.txt")
        sigmas, meta = fit(args.teacher, args.solver, args.nfe, args.n, args.holdout, args.iters, args.seed,
                           args.sigma_min, args.sigma_max, args.reference_nfe, args.batch, pick_device(args.device))
        save_schedule(sigmas, args.out, meta)
        held = (f"; held-out RMSE karras {math.sqrt(meta['holdout_mse_karras']):.4g} -> optimised "
                f"{math.sqrt(meta['holdout_mse_optimised']):.4g}" if args.holdout else "")
        print(f"{args.solver} at {args.nfe} NFE on {args.teacher}: RMSE {math.sqrt(meta['mse_before']):.4g} -> "
              f"{math.sqrt(meta['mse_after']):.4g} on {args.n} noises{held}; wrote {args.out}")
        print(json.dumps({"sigmas": [round(s, 6) for s in sigmas.tolist()]}))


if __name__ == "__main__":
    main()
