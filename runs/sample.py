"""Sample a trained run: python -m runs.sample RUN --solver heun --nfe 35 --n 2000 --out samples.npz

RUN is a run directory or a checkpoint file; EMA weights are used unless --no-ema. When the run's method yields a
denoiser (a diffusion teacher), any solver in SOLVERS samples it on any schedule and the real number of denoiser calls
is counted and reported; one-step and few-step students sample with their own `generate`. `--out` ending in `.npz`
writes `images` uint8 [N, C, H, W] at the data's own resolution (plus `labels` when conditional; vector data:
`samples` float32 [N, D]); ending in `.png` writes a grid.

`--schedule` is a schedule name (solvers.SCHEDULES) or a schedule FILE, e.g. one fitted by runs.optimise_schedule:

    python -m runs.optimise_schedule RUN --solver heun --nfe 10 --out sched.txt
    python -m runs.sample RUN --schedule sched.txt            # heun at 10 NFE, from the file's metadata

A file holds the sigmas themselves, so it must have exactly the number of steps the solver takes at the NFE asked
for (as solvers.sigmas_for_nfe counts them). A file written by runs.optimise_schedule names its solver and NFE, which
are then the defaults for --solver and --nfe and must agree with them when given; a plain list of sigmas (text or
.json, no metadata) samples with --solver (default: the run's own) at --nfe (default 35). Anything else is one line
and exit code 2.

Class-conditional runs draw a random class per sample, or all samples of `--class C`. `--guidance W` samples with
classifier-free guidance (Ho & Salimans 2022; solvers/guidance.py) in EDM2's convention, D_u + W (D_c - D_u): W = 1
is the conditional model (no guidance, the default), W = 0 the unconditional one. `--guidance-interval LO HI` guides
only for LO < sigma <= HI (Kynkaanniemi et al. 2024). A guided evaluation is one batched call and counts as 1 NFE:

    python -m runs.sample RUN --guidance 2 --class 3 --out threes.png
    python -m runs.sample RUN --guidance 3 --guidance-interval 0.28 2.9 --solver heun --nfe 35
"""
import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

from objectives.base import pick, using_networks
from runs.build import build_dataset, load_run
from runs.cli import ArgumentParser, cli_errors, non_negative_float, pick_device, positive_int
from runs.images import save_image_grid, to_uint8
from solvers import SCHEDULES, SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe
from solvers.common import CountingDenoiser
from solvers.guidance import guided
from solvers.optimise import load_schedule

DEFAULT_NFE = 35


def schedule_file(schedule):
    """The path of `schedule` when it names a schedule file rather than a schedule in SCHEDULES, else None; a name
    that is neither is a ValueError listing both kinds."""
    if not isinstance(schedule, (str, os.PathLike)) or schedule in SCHEDULES:
        return None
    if Path(schedule).is_file():
        return Path(schedule)
    raise ValueError(f"--schedule {schedule}: neither a schedule ({', '.join(sorted(SCHEDULES))}) nor an existing "
                     "schedule file (e.g. one written by python -m runs.optimise_schedule)")


def read_schedule_file(path):
    """(sigmas, meta) of a schedule file, every way it can be unreadable a one-line ValueError naming it."""
    try:
        sigmas, meta = load_schedule(path)
    except UnicodeDecodeError:
        raise ValueError(f"schedule file {path} is not text (expected sigmas, one per line, or a .json list)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"schedule file {path}: its '# meta:' line is not a JSON object")
    return sigmas, meta


def file_sigmas(path, solver, nfe):
    """The sigmas of schedule file `path` for `solver` (a function of SOLVERS) at exactly `nfe` evaluations: the
    file must have the number of steps sigmas_for_nfe gives that solver and NFE, and the solver and NFE its
    metadata names (runs.optimise_schedule writes them), if any."""
    sigmas, meta = read_schedule_file(path)
    name = next((k for k, v in SOLVERS.items() if v is solver), getattr(solver, "__name__", "the solver"))
    fitted = meta.get("solver"), meta.get("nfe")
    if (fitted[0] is not None and SOLVERS.get(fitted[0]) is not solver) or fitted[1] not in (None, nfe):
        raise ValueError(f"schedule file {path} was made for {fitted[0] or name} at {fitted[1] or nfe} NFE, not "
                         f"{name} at {nfe} NFE: drop --solver / --nfe to use the file's, or fit one with "
                         f"python -m runs.optimise_schedule RUN --solver {name} --nfe {nfe}")
    steps = len(sigmas_for_nfe(solver, nfe)) - 1
    if len(sigmas) - 1 != steps:
        raise ValueError(f"schedule file {path} has {len(sigmas) - 1} steps; {name} at {nfe} NFE takes {steps}: give "
                         f"the --nfe it was made for, or a file of {steps} sigmas > 0 (then 0)")
    return sigmas


def file_defaults(schedule, solver, nfe):
    """(solver, nfe) for the command line: a schedule file's own solver and NFE where --solver / --nfe are not given
    (then the run's own solver and 35 NFE)."""
    path = schedule_file(schedule)
    meta = read_schedule_file(path)[1] if path is not None else {}
    if solver is None and meta.get("solver") is not None:
        pick(SOLVERS, meta["solver"], f"solver (named by schedule file {path})")
        solver = meta["solver"]
    if nfe is None:
        nfe = meta.get("nfe", DEFAULT_NFE)
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"schedule file {path}: its metadata names nfe={nfe!r}, not an integer >= 1")
    if path is not None and solver is not None:  # fail before loading the run where the solver is known already
        file_sigmas(path, pick(SOLVERS, solver, "solver"), nfe)
    return solver, nfe


def check_guidance(config, dataset, guidance, interval, class_label):
    """Refuse guidance and class choices this run cannot take, in one line each."""
    conditional = config["train"]["conditional"]
    if guidance is not None and not conditional:
        raise ValueError("--guidance needs a class-conditional run (this run has train.conditional false)")
    if class_label is not None and not conditional:
        raise ValueError("--class needs a class-conditional run (this run has train.conditional false)")
    if interval is not None and guidance is None:
        raise ValueError("--guidance-interval needs --guidance W")
    if class_label is not None and not 0 <= class_label < dataset.num_classes:
        raise ValueError(f"--class {class_label} is not a class of this run's data (0 to {dataset.num_classes - 1})")


def sample(objective, config, n, nfe, solver=None, schedule=None, batch=500, seed=0, device="cpu", labels=None,
           guidance=None, interval=None, class_label=None):
    """(samples [n, ...] in data space, labels or None, measured NFE per sample, images per second).

    A run whose method samples with a solver (`objective.sampler()`: a diffusion teacher, a reflow model) is integrated
    in float64 with its own solver and schedule, or with `solver` / `schedule` when given (any run that yields a
    denoiser); `schedule` is a name in SCHEDULES or a schedule file (`file_sigmas`). Other methods (one-step students,
    progressive distillation's nested grid) sample with their own `generate`. NFE counts the network evaluations
    either way. `class_label` gives every sample that class; `guidance` (w, 1 = none) and `interval` ((lo, hi) in
    sigma) sample the denoiser with classifier-free guidance (solvers.guidance.guided), one NFE per guided call."""
    device = torch.device(device)
    dataset = build_dataset(config)
    conditional = config["train"]["conditional"]
    check_guidance(config, dataset, guidance, interval, class_label)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # what a stochastic `generate` draws (multistep consistency sampling) is per --seed too
    if conditional and labels is None:
        labels = torch.randint(0, dataset.num_classes, (n,), generator=generator)
        if class_label is not None:  # drawn anyway: a --seed has the same noise with or without --class
            labels = torch.full_like(labels, class_label)
    denoiser = objective.denoiser()
    name = config["objective"]["name"]
    if (solver is not None or schedule is not None) and denoiser is None:
        raise ValueError(f"objective {name!r} samples with its own generator; drop --solver / --schedule")
    if guidance is not None and denoiser is None:
        raise ValueError(f"objective {name!r} samples with its own generator (no denoiser to guide); drop --guidance")
    own = objective.sampler()  # (solver, schedule, schedule_kwargs) or None
    use_solver = denoiser is not None and (solver is not None or schedule is not None or own is not None)
    if guidance is not None and not use_solver:
        raise ValueError(f"objective {name!r} samples with its own generate; guidance needs a solver: add --solver "
                         "to integrate its denoiser with guidance")
    if use_solver:
        solver = pick(SOLVERS, solver, "solver") if solver else own[0] if own else SOLVERS["heun"]
        path = schedule_file(schedule)
        if path is not None:
            sigmas = file_sigmas(path, solver, nfe)
        elif schedule is None and own is not None:
            sigmas = sigmas_for_nfe(solver, nfe, own[1], **own[2])
        else:
            name = schedule or config["objective"].get("schedule", "karras")
            levels = {k: config["objective"][k] for k in ("sigma_min", "sigma_max", "rho") if k in config["objective"]}
            sigmas = sigmas_for_nfe(solver, nfe, pick(SCHEDULES, name, "schedule"), **schedule_kwargs(name, **levels))
        sigmas = sigmas.to(device)
        options = options_for_nfe(solver, nfe)
        if "generator" in inspect.signature(solver).parameters:  # stochastic samplers: reproducible per --seed
            options["generator"] = torch.Generator(device).manual_seed(seed + 1)
        if guidance is not None:  # wrapped inside the counter: one guided (batched) call is one NFE
            denoiser = guided(denoiser, guidance, interval, label_dim=dataset.num_classes)
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
                x = z.double() * sigmas[0]
                if guidance is not None:  # which evaluations are guided, decided on the host before sampling
                    denoiser.plan(solver, sigmas.double(), like=x, **options)
                x = solver(counted, x, sigmas.double(), cond=cond, **options).float()
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
    p = ArgumentParser(prog="python -m runs.sample", description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--solver", help="solver name (default: the run's own)")
    p.add_argument("--schedule", help="schedule name, or a schedule file from runs.optimise_schedule (default: the "
                                      "run's own)")
    p.add_argument("--nfe", type=positive_int, help=f"denoiser evaluations per sample (default: a schedule file's own, a "
                                           f"one- or few-step student's own, else {DEFAULT_NFE})")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--batch", type=positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npz", help=".npz or .png")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument("--class", dest="class_label", type=int, metavar="C",
                   help="class id of every sample (conditional runs; default: a random class per sample)")
    p.add_argument("--guidance", type=non_negative_float, metavar="W",
                   help="classifier-free guidance scale, D_u + W (D_c - D_u): 1 = none (default), 0 = unconditional")
    p.add_argument("--guidance-interval", type=non_negative_float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for LO < sigma <= HI (Kynkaanniemi et al. 2024); elsewhere the conditional model")
    args = p.parse_args(argv)
    with cli_errors():
        if not args.out.endswith((".npz", ".png")):
            raise ValueError(f"--out must end in .npz or .png: {args.out}")
        solver, nfe = file_defaults(args.schedule, args.solver, args.nfe)  # checked before the run is loaded
        device = pick_device(args.device)
        config, objective = load_run(args.run, device, ema=not args.no_ema)
        if args.nfe is None and args.schedule is None and args.solver is None and objective.eval_nfe:
            nfe = int(objective.eval_nfe)  # a one- or few-step student samples with its own number of steps
        samples, labels, nfe, rate = sample(objective, config, args.n, nfe, solver, args.schedule, args.batch,
                                            args.seed, device, guidance=args.guidance,
                                            interval=args.guidance_interval, class_label=args.class_label)
        write(samples, labels, args.out)
        guide = "" if args.guidance is None else f", guidance {args.guidance:g}" + (
            "" if args.guidance_interval is None else " for sigma in ({:g}, {:g}]".format(*args.guidance_interval))
        print(f"wrote {len(samples)} samples to {args.out} (NFE {nfe:g} measured{guide}, {rate:.1f} samples/s on "
              f"{device})")


if __name__ == "__main__":
    main()
