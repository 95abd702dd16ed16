"""Teacher rollouts into a trajectory store: python -m runs.make_pairs --teacher RUN --nfe 35 --n 10000 --out DIR

Integrates the teacher's probability-flow ODE (EDM / k-diffusion VE convention) from x = sigma_max * z with one of
SOLVERS on the grid sigmas_for_nfe(solver, nfe, schedule) and stores z, the states at the saved sigmas and the label
(see data/trajectories.py): `--save-sigmas 1` keeps only x0, the (noise, image) pairs of Denoising Student (Luhman &
Luhman 2021) and reflow (Liu et al. 2023); `--save-sigmas 4` or a list of sigmas keeps DSNO-style trajectories
(Zheng et al. 2023). The ODE state is float64, as in runs.sample. Rerunning the same command after a kill resumes:
finished shards are kept and the same remaining ones are written.
"""
import inspect
from pathlib import Path

import torch
from tqdm import tqdm

from data.trajectories import DTYPES, TrajectoryStore, TrajectoryWriter, fingerprint, saved_indices
from solvers import get_solver, options_for_nfe, schedule_kwargs, sigmas_for_nfe


def _check_device(teacher, device):
    for tensor in [*teacher.parameters(), *teacher.buffers()]:
        if tensor.device.type != device.type or device.index not in (None, tensor.device.index):
            raise ValueError(f"the teacher is on {tensor.device}, but device={str(device)!r}: move it first")
        return


def generate_rollouts(out_dir, teacher, *, solver="heun", nfe=35, schedule="karras", sigma_min=0.002,
                      sigma_max=80.0, rho=7.0, save_sigmas=1, n, num_classes=0, shape, seed=0, shard_size=1000,
                      batch_size=250, device="cpu", dtype="float32", teacher_description="", progress=True):
    """Fill (or resume) the store at `out_dir` with n rollouts of `teacher` (a frozen D(x, sigma, class_labels),
    already on `device`) and return it. Labels are uniform over num_classes when num_classes > 0 (passed as
    cond={"class_labels": labels}), zeros otherwise."""
    if not isinstance(solver, str) or not isinstance(schedule, str):
        raise ValueError("solver and schedule must be names (they are recorded in the manifest)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    sample = get_solver(solver)
    if "generator" in inspect.signature(sample).parameters:
        raise ValueError(f"rollouts are distillation targets: they need a deterministic solver (the teacher's ODE map), "
                         f"and {solver!r} is stochastic; use heun, dpmpp_2m, ... (python -m runs.list)")
    kwargs = schedule_kwargs(schedule, sigma_min, sigma_max, rho)
    grid = sigmas_for_nfe(solver, nfe, schedule, **kwargs)
    options = options_for_nfe(solver, nfe)
    device = torch.device(device)
    _check_device(teacher, device)
    writer = TrajectoryWriter(out_dir, fingerprint=fingerprint(teacher), grid=grid, save_sigmas=save_sigmas,
                              shape=shape, n=n, solver=solver, nfe=nfe, schedule=schedule, schedule_kwargs=kwargs,
                              solver_options=options, num_classes=num_classes, seed=seed, shard_size=shard_size,
                              dtype=dtype, description=teacher_description)
    keep = torch.tensor(saved_indices(grid, save_sigmas), device=device)
    grid = grid.to(device)
    pending = writer.pending()
    bar = tqdm(total=n, initial=n - sum(writer.count(i) for i in pending), unit="rollout", dynamic_ncols=True,
               disable=not progress, desc=f"{solver} NFE {nfe}")
    with torch.inference_mode():
        for index in pending:
            z, labels = writer.inputs(index)
            states = []
            for start in range(0, len(z), batch_size):
                z_batch = z[start:start + batch_size].to(device)
                cond = {"class_labels": labels[start:start + batch_size].to(device)} if num_classes else None
                _, trajectory = sample(teacher, z_batch.double() * grid[0], grid, cond=cond, return_trajectory=True,
                                       **options)
                states.append(trajectory[keep].transpose(0, 1).float().cpu())  # [b, K, *shape]
                bar.update(len(z_batch))
            writer.write(index, z, torch.cat(states), labels)
    bar.close()
    return TrajectoryStore(out_dir, fingerprint=writer.manifest["fingerprint"], verify=False)


def parse_save_sigmas(text):
    """'4' -> 4 (K evenly spaced saved states); '1.2,0.4,0' -> [1.2, 0.4, 0.0] (sigmas, snapped to the grid)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--save-sigmas must be an integer K or a comma-separated list of sigmas, "
                         f"got {text!r}") from None
    return values


def shape_of(config):
    """(per-sample shape, number of classes) of a run's data, from its backbone config (no data set needed)."""
    backbone = config["backbone"]
    if "img_resolution" in backbone and "in_channels" in backbone:
        resolution = backbone["img_resolution"]
        return (backbone["in_channels"], resolution, resolution), backbone.get("label_dim", 0)
    if "dim" in backbone:
        return (backbone["dim"],), backbone.get("label_dim", 0)
    from runs.build import build_dataset
    dataset = build_dataset(config)
    return tuple(dataset.shape), dataset.num_classes if config["train"].get("conditional") else 0


def main(argv=None):
    from runs.build import load_run
    from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int

    p = ArgumentParser(prog="python -m runs.make_pairs", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher run directory or checkpoint file (EMA weights)")
    p.add_argument("--solver", default="heun")
    p.add_argument("--nfe", type=positive_int, default=35)
    p.add_argument("--n", type=positive_int, required=True, help="number of rollouts")
    p.add_argument("--save-sigmas", default="1", help="K (evenly spaced, the last is x0) or sigmas '1.2,0.4,0'")
    p.add_argument("--out", required=True, help="store directory (resumed when it holds the same request)")
    p.add_argument("--schedule", default="karras")
    p.add_argument("--sigma-min", type=float, help="default: the teacher's objective.sigma_min, else 0.002")
    p.add_argument("--sigma-max", type=float, help="default: the teacher's objective.sigma_max, else 80")
    p.add_argument("--rho", type=float, help="default: the teacher's objective.rho, else 7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=positive_int, default=1000)
    p.add_argument("--batch", type=positive_int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    with cli_errors():
        save_sigmas = parse_save_sigmas(args.save_sigmas)
        device = pick_device(args.device)
        config, objective = load_run(args.teacher, device)
        teacher = objective.denoiser()
        if teacher is None:
            raise ValueError(f"{args.teacher}: objective {config['objective']['name']!r} has no denoiser to roll out")
        shape, num_classes = shape_of(config)
        conditional = bool(config["train"].get("conditional"))
        defaults = config["objective"]
        settings = {key: getattr(args, key) if getattr(args, key) is not None else defaults.get(key, fallback)
                    for key, fallback in (("sigma_min", 0.002), ("sigma_max", 80.0), ("rho", 7.0))}
        description = (f"{Path(args.teacher).resolve()} ({config['objective']['name']} / "
                       f"{config['backbone']['name']} on {config['data']['name']})")
        store = generate_rollouts(args.out, teacher, solver=args.solver, nfe=args.nfe, schedule=args.schedule,
                                  save_sigmas=save_sigmas, n=args.n, num_classes=num_classes if conditional else 0,
                                  shape=shape, seed=args.seed, shard_size=args.shard_size, batch_size=args.batch,
                                  device=device, dtype=args.dtype, teacher_description=description, **settings)
        sigmas = ", ".join(f"{s:.4g}" for s in store.sigmas.tolist())
        print(f"wrote {len(store)} rollouts ({args.solver}, NFE {args.nfe}, saved sigmas [{sigmas}]) to {args.out}")


if __name__ == "__main__":
    main()
