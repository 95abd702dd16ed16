"""Sample a trained run: python -m runs.sample RUN --solver heun --nfe 35 --n 2000 --out samples.npz

RUN is a run directory or a checkpoint file; EMA weights are used unless --no-ema. When the run's method yields a
denoiser (a diffusion teacher), any solver in SOLVERS samples it on any schedule and the real number of denoiser calls
is counted and reported; one-step and few-step students sample with their own `generate`. `--out` ending in `.npz`
writes `images` uint8 [N, C, H, W] at the data's own resolution (plus `labels` when conditional; vector data:
`samples` float32 [N, D]); ending in `.png` writes a grid.
"""
import argparse
import inspect
import time
from pathlib import Path

import numpy as np
import torch

from objectives.base import pick, using_networks
from runs.build import build_dataset, load_run
from runs.cli import cli_errors, pick_device
from runs.images import save_image_grid, to_uint8
from solvers import SCHEDULES, SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe
from solvers.common import CountingDenoiser


def sample(objective, config, n, nfe, solver=None, schedule=None, batch=500, seed=0, device="cpu", labels=None):
    """(samples [n, ...] in data space, labels or None, measured NFE per sample, images per second).

    A run whose method samples with a solver (a diffusion teacher, a reflow model) is integrated in float64 with its
    own solver and schedule, or with `solver` / `schedule` when given (any run that yields a denoiser); other methods
    (one-step students, progressive distillation's nested grid) sample with their own `generate`. NFE counts the
    network evaluations either way."""
    device = torch.device(device)
    dataset = build_dataset(config)
    conditional = config["train"]["conditional"]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # what a stochastic `generate` draws (multistep consistency sampling) is per --seed too
    if conditional and labels is None:
        labels = torch.randint(0, dataset.num_classes, (n,), generator=generator)
    denoiser = objective.denoiser()
    if (solver is not None or schedule is not None) and denoiser is None:
        raise ValueError(f"objective {config['objective']['name']!r} samples with its own generator; drop "
                         "--solver / --schedule")
    use_solver = denoiser is not None and (solver is not None or schedule is not None
                                           or hasattr(objective, "schedule_kwargs"))
    if use_solver:
        solver = pick(SOLVERS, solver, "solver") if solver else getattr(objective, "solver", SOLVERS["heun"])
        if schedule is None and hasattr(objective, "schedule_kwargs"):
            schedule, kwargs = objective.schedule, objective.schedule_kwargs
        else:
            name = schedule or config["objective"].get("schedule", "karras")
            schedule = pick(SCHEDULES, name, "schedule")
            levels = {k: config["objective"][k] for k in ("sigma_min", "sigma_max", "rho") if k in config["objective"]}
            kwargs = schedule_kwargs(name, **levels)
        sigmas = sigmas_for_nfe(solver, nfe, schedule, **kwargs).to(device)
        options = options_for_nfe(solver, nfe)
        if "generator" in inspect.signature(solver).parameters:  # stochastic samplers: reproducible per --seed
            options["generator"] = torch.Generator(device).manual_seed(seed + 1)
        counted = CountingDenoiser(denoiser)
    else:
        counted = {role: CountCalls(net) for role, net in objective.networks.items()}
    out, elapsed = [], 0.0
    for start in range(0, n, batch):
        z = torch.randn([min(batch, n - start), *dataset.shape], generator=generator).to(device)
        cond = {"class_labels": labels[start:start + len(z)].to(device)} if conditional else None
        tic = time.perf_counter()
        with torch.inference_mode():
            if use_solver:
                x = solver(counted, z.double() * sigmas[0], sigmas.double(), cond=cond, **options).float()
            else:
                with using_networks(objective, counted):
                    x = objective.generate(z, nfe, cond)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - tic
        out.append(x.cpu())
    calls = counted.nfe if use_solver else sum(net.calls for net in counted.values())
    return torch.cat(out), labels, calls / len(out), n / elapsed


class CountCalls(torch.nn.Module):
    """A network that counts its calls (one call on a batch is one function evaluation)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def write(samples, labels, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        if samples.ndim != 4:
            raise ValueError("a .png grid needs image data; use .npz for vector data")
        save_image_grid(samples, path)
    elif path.suffix == ".npz":
        arrays = {"images": to_uint8(samples).numpy()} if samples.ndim == 4 else {"samples": samples.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(path, **arrays)
    else:
        raise ValueError(f"--out must end in .npz or .png, not {path.suffix or 'nothing'!r}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runs.sample", description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--solver", help="solver name (default: the run's own)")
    p.add_argument("--schedule", help="schedule name (default: the run's own)")
    p.add_argument("--nfe", type=int, default=35, help="denoiser evaluations per sample")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npz", help=".npz or .png")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        if not args.out.endswith((".npz", ".png")):
            raise ValueError(f"--out must end in .npz or .png: {args.out}")
        device = pick_device(args.device)
        config, objective = load_run(args.run, device, ema=not args.no_ema)
        samples, labels, nfe, rate = sample(objective, config, args.n, args.nfe, args.solver, args.schedule,
                                            args.batch, args.seed, device)
        write(samples, labels, args.out)
        print(f"wrote {len(samples)} samples to {args.out} (NFE {nfe:g} measured, {rate:.1f} samples/s on {device})")


if __name__ == "__main__":
    main()
