"""The trajectory-distillation benchmark: every method trained from the same teacher, scored at its own NFE next to
the teacher sampled with the same NFE.

    python -m runs.bench distill mixture --steps 2000                 # analytic mixture, seconds to minutes
    python -m runs.bench distill mnist --teacher bench/mnist_teacher.pt --trajectories out/pairs --steps 1500

mixture  An 8-component Gaussian mixture in 64 dimensions served as 1x8x8 images (data.mixtures), whose exact
         denoiser is the teacher. The reference is the exact ODE map z -> x(0) from sigma_max z (solvers.reference,
         DOP853, float64) on held-out noises; each student's RMSE to it at its NFE is set against the teacher's own
         RMSE with the same NFE (Euler, Heun and DPM-Solver++(2M), the best one counted).
mnist    The trained MNIST teacher. Each student is trained from it (rollouts from --trajectories when the method
         learns from pairs) and scored by MNIST-FID of n samples against the same seeded n real digits the teacher
         bench uses, with images per second; the teacher is scored at 1, 2, 4, 8 and 35 NFE the same way.
Both write <out>.md, <out>.csv and <out>.json (and a grid of each student's samples for mnist).
"""
import contextlib
import csv
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from objectives import OBJECTIVES
from objectives.base import using_networks
from runs.cli import ArgumentParser, cli_errors, pick_device, positive_int
from runs.provenance import provenance
from runs.train import make_config, parse_args, train
from solvers import SOLVERS, options_for_nfe, sigmas_for_nfe

TEACHER_SOLVERS = ("euler", "heun", "dpmpp_2m")
TEACHER_NFES = (1, 2, 4, 8, 35)

def progressive_stages(steps, start_steps=8):
    """Progressive settings that fit `steps`: start_steps -> 1, the last two stages twice as long (as the paper)."""
    stages = start_steps.bit_length() - 1
    weights = [2 if start_steps >> (k + 1) <= 2 else 1 for k in range(stages)]
    lengths = [max(1, steps * w // sum(weights)) for w in weights]
    lengths[-1] += steps - sum(lengths)
    return [f"objective.start_steps={start_steps}", f"objective.steps_per_stage={lengths}".replace(" ", "")]


# method -> (objective, backbone, extra command-line settings given the step budget); each method's own defaults
# otherwise.
METHODS = {
    "kd": ("kd", "unet", lambda steps: []),
    "progressive": ("progressive", "unet", progressive_stages),
    "reflow": ("reflow", "unet", lambda steps: []),
    "reflow_distill": ("reflow", "unet", lambda steps: ["objective.mode=distill"]),
    "boot": ("boot", "unet", lambda steps: []),
    "dsno": ("dsno", "fno", lambda steps: []),
    "cd": ("cd", "unet", lambda steps: []),
    "ct": ("ct", "unet", lambda steps: []),      # no teacher: trained on the data set's samples
    "ict": ("ict", "unet", lambda steps: []),    # no teacher
    "ect": ("ect", "unet", lambda steps: [f"objective.stage_steps={max(1, steps // 8)}"]),  # 8 stages, as 200k / 25k
    "tract": ("tract", "unet", lambda steps: ["objective.steps=[16,1]", f"objective.steps_per_phase={steps}"]),
    "diff_instruct": ("diff_instruct", "unet", lambda steps: []),
    "dmd": ("dmd", "unet", lambda steps: []),
    "dmd2": ("dmd2", "unet", lambda steps: []),   # with its GAN term (the head on the fake score)
    "dmd2_no_gan": ("dmd2", "unet", lambda steps: ["objective.gan_g_weight=0"]),  # the paper's TTUR-only ablation
    "sid": ("sid", "unet", lambda steps: []),
    "diffratio": ("diffratio", "unet", lambda steps: []),
    "diffratio_random": ("diffratio", "unet", lambda steps: ["objective.init=random"]),  # the paper's ablation
    "add": ("add", "unet", lambda steps: []),        # adversarial: teacher_features discriminator (offline default)
    "ufogen": ("ufogen", "unet", lambda steps: []),
}
MIXTURE_DATA = ["--data", "gmm", "data.dim=64", "data.components=8", "data.image_shape=[1,8,8]", "data.n=20000"]
MIXTURE_NET = ["backbone.model_channels=32", "backbone.channel_mult=[1,2]", "backbone.num_blocks=1",
               "backbone.attn_resolutions=[]", "backbone.img_resolution=8", "train.lr=1e-3", "train.warmup_steps=100"]


def rmse(a, b):
    return float((a.double() - b.double()).square().mean().sqrt())


def teacher_errors(teacher, z, reference, nfes, sigma_max=80.0):
    """{nfe: (best solver, its RMSE, {solver: RMSE})} of the teacher sampled with each NFE."""
    out = {}
    for nfe in nfes:
        errors = {}
        for name in TEACHER_SOLVERS:
            try:
                sigmas = sigmas_for_nfe(name, nfe, sigma_max=sigma_max).double()
            except ValueError:
                continue
            with torch.inference_mode():
                x = SOLVERS[name](teacher, z.double() * sigmas[0], sigmas, **options_for_nfe(name, nfe))
            errors[name] = rmse(x, reference)
        best = min(errors, key=errors.get)
        out[nfe] = (best, errors[best], errors)
    return out


def train_method(method, flags, settings, run_dir, steps):
    """Train one method: `flags` are command-line options (--teacher ...), `settings` section.key=value overrides."""
    objective_name, backbone, extra = METHODS[method]
    quiet = ["teacher.eval_n=0"] if OBJECTIVES[objective_name].needs_teacher else []
    args = ["--objective", objective_name, "--backbone", backbone, *flags, "--out", str(run_dir),  # options first:
            *extra(steps), f"train.steps={steps}", "train.sample_every=0", *quiet, *settings]  # argparse
    config = make_config(parse_args(args))[0]
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own directory: a re-measured method trains afresh
    tic = time.time()
    with counting_teacher_calls() as teacher_calls:
        objective, ema = train(config, run_dir)
    objective.teacher_calls = teacher_calls[0]  # images through the teacher in training (its rollouts included)
    return config, objective, ema, time.time() - tic


@contextlib.contextmanager
def counting_teacher_calls():
    """Count the images every teacher built by runs.train.prepare_teacher evaluates (a forward hook); yields a
    one-element list holding the count."""
    import runs.train
    calls, prepare = [0], runs.train.prepare_teacher

    def counted(*args, **kwargs):
        teacher, description, record = prepare(*args, **kwargs)
        if teacher is not None:
            teacher.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + len(output)))
        return teacher, description, record

    runs.train.prepare_teacher = counted
    try:
        yield calls
    finally:
        runs.train.prepare_teacher = prepare


def bench_mixture(out, steps, n_eval, device, methods, runs_dir="out/bench_distill", settings=(), seed=0,
                  append=False):
    """`steps`: {method: training steps}; append=True keeps <out>.json's rows and (re)measures only `methods`."""
    from data.mixtures import GaussianMixtureData
    from models.analytic import GaussianMixtureDenoiser
    from solvers.reference import reference_solution
    data = GaussianMixtureData(dim=64, components=8, n=20000, image_shape=[1, 8, 8])
    teacher = GaussianMixtureDenoiser.from_data(data).to(device)
    z = torch.randn([n_eval, 1, 8, 8], generator=torch.Generator().manual_seed(10_000 + seed),
                    dtype=torch.float64).to(device)
    reference = reference_solution(teacher, z * 80.0, 80.0)[0][-1]
    baseline = teacher_errors(teacher, z, reference, sorted(set(TEACHER_NFES)))
    rows = [{"method": "teacher", "solver": best, "nfe": nfe, "map_rmse": round(err, 5),
             "teacher_map_rmse_same_nfe": round(err, 5), "train_steps": "", "train_seconds": "", "objective": ""}
            for nfe, (best, err, _) in baseline.items()]
    appended = []
    if append:
        before = json.loads(Path(out).with_suffix(".json").read_text())
        if before["n_eval"] != n_eval:
            raise ValueError(f"--append: {out}.json holds n={before['n_eval']}, not n={n_eval}")
        kept = [r for r in before["rows"] if r["method"] not in methods]
        if [r["map_rmse"] for r in kept if r["method"] == "teacher"] != [r["map_rmse"] for r in rows]:
            raise ValueError(f"--append: {out}.json's teacher rows differ from this reference; re-run without --append")
        rows = kept
        appended = before.get("appended", []) + [{"methods": list(methods), "settings": list(settings),
                                                  **machine(device)}]
        settings_before = before["settings"]
    for method in methods:
        config, objective, ema, seconds = train_method(method, MIXTURE_DATA[:2], [*MIXTURE_DATA[2:], *MIXTURE_NET,
                                                       f"train.device={device}", *settings],
                                                       Path(runs_dir) / f"mixture_{method}", steps[method])
        nfe = int(objective.eval_nfe or 1)
        with using_networks(objective, ema), torch.inference_mode():
            x = objective.generate(z.float(), nfe, None)
        if nfe not in baseline:
            baseline.update(teacher_errors(teacher, z, reference, [nfe]))
        rows.append({"method": method, "solver": "", "nfe": nfe, "map_rmse": round(rmse(x, reference), 5),
                     "teacher_map_rmse_same_nfe": round(baseline[nfe][1], 5), "train_steps": steps[method],
                     "train_seconds": round(seconds, 1), "objective": dict(config["objective"])})
        print(rows[-1], flush=True)
    summary = {"part": "mixture", "settings": settings_before if append else list(settings), "n_eval": n_eval,
               "data": "gmm dim 64 (1x8x8), 8 components", "reference": "DOP853 rtol=atol=1e-10 (exact teacher)",
               **machine(device), "rows": rows, **({"appended": appended} if appended else {})}
    write(out, summary, mixture_markdown(summary))
    return summary


def appended_lines(summary):
    """Markdown lines naming each later --append invocation of a bench summary."""
    lines = []
    for extra in summary.get("appended", []):
        lines += ["", f"Measured in a later invocation: {', '.join(extra['methods'])} (extra settings: "
                      f"{extra['settings'] or 'none'}; {extra['machine']})."]
    return lines


def machine(device):
    return {"device": str(device), "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "provenance": provenance(device)}


def write(out, summary, markdown):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    fields = list(dict.fromkeys(key for row in summary["rows"] for key in row))  # rows of older runs may lack some
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(summary["rows"])


def mixture_markdown(s):
    lines = [f"# Trajectory distillation on the analytic mixture ({s['data']})", "",
             f"Each student trained from the exact teacher with {' '.join(MIXTURE_NET)} (unet; fno for dsno; "
             f"progressive 8 -> 4 -> 2 -> 1 steps, the last two stages twice as long), extra settings: "
             f"{s['settings'] or 'none'}; RMSE to the exact ODE map "
             f"({s['reference']}) on {s['n_eval']} held-out noises. Teacher rows: the best of "
             f"{', '.join(TEACHER_SOLVERS)} at that NFE. Machine: {s['machine']}, torch {s['torch']}.", "",
             "| method | NFE | map RMSE | teacher at same NFE | ratio | train steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        name = f"teacher ({r['solver']})" if r["method"] == "teacher" else r["method"]
        ratio = r["map_rmse"] / r["teacher_map_rmse_same_nfe"] if r["teacher_map_rmse_same_nfe"] else float("nan")
        lines.append(f"| {name} | {r['nfe']} | {r['map_rmse']:.4g} | {r['teacher_map_rmse_same_nfe']:.4g} | "
                     f"{ratio:.3g} | {r['train_steps']} | {r['train_seconds']} |")
    lines += ["", "ct and ict use no teacher: they train on the mixture's samples and are scored against the same "
              "exact ODE map (the data's own). The analytic teacher has no weights, so ect (and cd) start from "
              "random weights here."] if any(r["method"] in ("ct", "ict", "ect") for r in s["rows"]) else []
    return "\n".join(lines + appended_lines(s)) + "\n"


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.bench distill", description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["mixture", "mnist"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help="default: all (mixture), those with a teacher (mnist)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps per method")
    p.add_argument("--method-steps", nargs="*", default=[], metavar="METHOD=STEPS",
                   help="per-method step budgets overriding --steps (the costlier methods get fewer on a CPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra settings for every student run, e.g. train.batch_size=32")
    p.add_argument("--n", type=positive_int, default=1000, help="held-out noises (mixture) / samples for FID (mnist)")
    p.add_argument("--teacher", default="bench/mnist_teacher.pt")
    p.add_argument("--trajectories", help="mnist: a store from runs.make_pairs (save_sigmas >= 4 serves dsno too)")
    p.add_argument("--out")
    p.add_argument("--append", action="store_true", help="keep <out>.json's rows, (re)measure only --methods")
    p.add_argument("--extra-nfes", type=positive_int, nargs="*", default=[],
                   help="mnist: also score students that can sample with these NFE (consistency models: 2)")
    p.add_argument("--runs-dir", default="out/bench_distill", help="where the students' run directories go")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        device = pick_device(args.device)
        if args.methods is None:
            args.methods = [m for m in METHODS if args.part == "mixture" or OBJECTIVES[METHODS[m][0]].needs_teacher]
        steps = {m: args.steps for m in args.methods}
        for item in args.method_steps:
            name, _, value = item.partition("=")
            if name not in METHODS or not value.isdigit():
                raise ValueError(f"--method-steps takes METHOD=STEPS with METHOD in {', '.join(METHODS)}; got {item!r}")
            steps[name] = int(value)
        if args.part == "mixture":
            bench_mixture(args.out or "bench/distill_mixture", steps, args.n, device, args.methods, args.runs_dir,
                          args.set, append=args.append)
        else:
            free = [m for m in args.methods if not OBJECTIVES[METHODS[m][0]].needs_teacher]
            if free:
                raise ValueError(f"distill mnist trains students of --teacher; {', '.join(free)} take no teacher "
                                 f"(the mixture part runs them)")
            from runs.bench_distill_mnist import bench_mnist
            bench_mnist(args.out or "bench/distill_mnist", args.teacher, args.trajectories, steps, args.n,
                        device, args.methods, args.runs_dir, args.set, append=args.append,
                        extra_nfes=args.extra_nfes)
