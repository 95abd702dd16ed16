"""Train any objective: python -m runs.train --backbone unet --objective dsm --data mnist [overrides ...]

The loop of DESIGN.md, readable top to bottom. It owns the optimisation of every role the objective declares
(`objective.networks`): an optimiser per role with its own settings (`optim.<role>.*` over the objective's
`optimizer_settings()` over `train.*`), EMA per role, a loss scaler per role, AMP, gradient clipping and
accumulation, LR warm-up, DDP (one process per device when started by torchrun; gloo on CPU, NCCL on GPU),
torch.compile, atomic checkpoints, `--resume`, and logs (progress bar, metrics.jsonl, TensorBoard, PNG sample grids).
The objective says which roles to update at each step, in order (`phases`; a role may appear several times: two
time-scale rules) and what each role's loss is (`loss`). In a role's phase only its parameters require gradients
and only it is called through its DDP wrapper; the other roles are frozen but differentiable w.r.t. their inputs.

Objectives that need a teacher get a frozen one from runs/teacher.py (`--teacher RUN`, or an analytic teacher fitted
to the data), with the teacher rollouts they declare; at the end runs/quality.py compares the student with its
teacher on held-out noises (quality.json).

Exact resume: the batch at step k is a pure function of (seed, k) (see `BatchOrder`), and the checkpoint holds the
networks, EMA, optimisers, scalers, step and RNG states, so a run stopped at step k and resumed ends with the same
weights as one never stopped. A run directory belongs to one run (runs/rundir.py); checkpoints are written by step
and by wall clock, and a non-finite loss stops the run keeping the newest checkpoint whose weights gave finite losses.
"""
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from models.ema import ema_beta, make_ema, update_ema
from runs.batches import BatchOrder, batches
from runs.build import build_dataset, build_objective, complete_config
from runs.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from runs.cli import ArgumentParser, cli_errors, pick_device
from models import BACKBONES
from objectives import OBJECTIVES, pick
from runs.config import (TrainSettings, constructor_defaults, load_yaml, merge, parse_overrides, resolve, role_settings,
                         save_yaml)
from runs.provenance import record_provenance
from runs.rundir import claimed
from objectives.base import using_networks
from runs.images import save_image_grid
from runs.logger import Logger
from runs.quality import write_quality_report
from runs.teacher import absolute, prepare_teacher, shared_rollouts


def learning_rate(step, r, s):
    """Role settings `r`'s learning rate at `step`: linear warm-up, then constant or cosine decay over train.steps."""
    warmup = min(1.0, (step + 1) / r["warmup_steps"]) if r["warmup_steps"] else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * step / s.steps)) if s.lr_decay == "cosine" else 1.0
    return r["lr"] * warmup * decay


def autocast(device, amp):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def setup_distributed():
    """(rank, world, local_rank); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch_dist.get_rank(), world, local_rank


def make_optimizer(params, r):
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[r["optimizer"]]
    return kind(params, lr=r["lr"], betas=tuple(r["betas"]), weight_decay=r["weight_decay"])


@contextlib.contextmanager
def training(objective, role, trainable, fast, wrapped):
    """Role `role`'s phase: only its parameters require grad, and only it is called through its DDP wrapper; every
    other role is called unwrapped (frozen, no gradient sync) but stays differentiable w.r.t. its inputs."""
    for other, params in trainable.items():
        for p in params:
            p.requires_grad_(other == role)
    with using_networks(objective, {**fast, role: wrapped[role]}):
        yield


def accumulate(sums, key, value, weight=1.0):
    """sums[key] = (running total, number of updates): a role updated on some steps only is averaged over those."""
    total, count = sums.get(key, (0, 0))
    sums[key] = (total + value * weight, count + weight)


def out_of_budget(elapsed_seconds, minutes, world, device):
    """Whether train.minutes of training have passed; with several processes, as soon as any says so (one
    all-reduce), so that all stop at the same step."""
    flag = elapsed_seconds >= 60 * minutes
    if world > 1:
        flag = torch.tensor(int(flag), device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        flag = bool(flag)
    return flag


def all_finite(modules):
    """True where every parameter of `modules` is finite (one host sync)."""
    flags = [p.detach().isfinite().all() for m in modules for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def train(config, run_dir, resume=False, teacher=None, dataset=None):
    """Train the resolved `config` into `run_dir` (`dataset`: the config's data set when already built).
    Returns the objective (with raw, unwrapped networks) and the EMA networks (the raw network for a role whose
    EMA is off)."""
    s = TrainSettings(**config["train"])
    rank, world, local_rank = setup_distributed()
    device = pick_device(s.device, local_rank)
    main_process = rank == 0
    torch.manual_seed(s.seed + rank)
    per_rank = s.batch_size // world
    micro = s.micro_batch or per_rank
    if s.batch_size % world or per_rank % micro:
        raise ValueError(f"train.batch_size={s.batch_size} does not split into {world} process(es) x micro-batches "
                         f"of train.micro_batch={s.micro_batch}")

    dataset = build_dataset(config) if dataset is None else dataset
    teacher, teacher_description, teacher_state = prepare_teacher(config, dataset, device, run_dir, resume, teacher)
    objective = build_objective(config, **({} if teacher is None else {"teacher": teacher}))
    if config.get("teacher", {}).get("trajectories") and not objective.rollouts:
        raise ValueError(f"objective {config['objective']['name']!r} learns from no teacher rollouts; "
                         "drop --trajectories")
    config["optim"] = role_settings(objective, config["train"], config.get("optim", {}))
    roles = config["optim"]

    with (claimed(run_dir, config, resume) if main_process else contextlib.nullcontext(Path(run_dir))) as run_dir:
        training_data = dataset  # what batches come from: the data, or the objective's teacher rollouts
        if objective.rollouts:
            training_data = shared_rollouts(objective, teacher, teacher_description, config, run_dir, dataset, device,
                                            main_process, world, torch_dist.barrier)
        objective.to(device)
        nets = {role: net.to(device) for role, net in objective.networks.items()}
        trainable = {role: [p for p in net.parameters() if p.requires_grad] for role, net in nets.items()}
        ema = {role: make_ema(net) for role, net in nets.items() if roles[role]["ema"]}
        optimizers = {role: make_optimizer(trainable[role], roles[role]) for role in nets}
        scalers = {role: torch.amp.GradScaler(device.type, enabled=(s.amp == "fp16")) for role in nets}
        step, elapsed_before = 0, 0.0
        if resume:
            state = load_checkpoint(run_dir / "checkpoint.pt")
            for role in nets:
                nets[role].load_state_dict(state["networks"][role])
                optimizers[role].load_state_dict(state["optimizers"][role])
                scalers[role].load_state_dict(state["scalers"][role] if "scalers" in state else state["scaler"])
                if role in ema:
                    ema[role].load_state_dict(state["ema"][role])
            objective.load_state_dict(state["objective"])
            set_rng_state(state["rng"])
            step, elapsed_before = state["step"], state.get("elapsed_sec", 0.0)
            if main_process:
                print(f"resuming {run_dir} from step {step}")
        if main_process:  # on resume too: train.* may have changed
            save_yaml(config, run_dir / "config.yaml")
            record_provenance(run_dir, device, s.seed)

        if s.compile:  # true: inductor; a string names another torch.compile backend
            backend = s.compile if isinstance(s.compile, str) else "inductor"
            fast = {role: torch.compile(net, backend=backend) for role, net in nets.items()}
        else:
            fast = dict(nets)
        wrapped = dict(fast)
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            wrapped = {role: torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
                       for role, net in fast.items()}
        sampling_nets = {role: ema.get(role, net) for role, net in nets.items()}

        order = BatchOrder(len(training_data), s.batch_size, s.seed, rank, world)
        data = batches(training_data, order, step, s.num_workers)
        log = Logger(run_dir, step, enabled=main_process)
        grid_noise = torch.randn([s.sample_grid, *dataset.shape], generator=torch.Generator().manual_seed(s.seed))
        grid_labels = (torch.arange(s.sample_grid) % dataset.num_classes) if s.conditional else None
        sums, first_bad_step, last_record = {}, torch.full((), -1, device=device), {}
        progress = tqdm(total=s.steps, initial=step, disable=not main_process, dynamic_ncols=True,
                        mininterval=1 if sys.stderr.isatty() else 30)
        start = tic = last_checkpoint = time.time()
        tic_step = step

        while step < s.steps:
            batch = tuple(t.to(device, non_blocking=True) for t in next(data))  # (x0, labels) or (z, xs, labels)
            micro_batches = list(zip(*(t.split(micro) for t in batch)))
            for role in objective.phases(step):
                r, optimizer, scaler, net = roles[role], optimizers[role], scalers[role], nets[role]
                if objective.fresh_optimizer(role, step):
                    optimizer.state.clear()
                lr = learning_rate(step, r, s)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                with training(objective, role, trainable, fast, wrapped):
                    for i, part in enumerate(micro_batches):
                        last = i == len(micro_batches) - 1
                        with (contextlib.nullcontext() if last or world == 1 else wrapped[role].no_sync()):
                            with autocast(device, s.amp):
                                loss, logs = objective.loss(role, part, step)
                            scaler.scale(loss / len(micro_batches)).backward()
                        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step,
                                                     first_bad_step)
                        for key, value in logs.items():
                            accumulate(sums, f"{role}/{key}", value.detach().float(), 1 / len(micro_batches))
                scaler.unscale_(optimizer)
                if r["grad_clip"]:
                    norm = torch.nn.utils.clip_grad_norm_(trainable[role], r["grad_clip"])
                    accumulate(sums, f"{role}/grad_norm", norm.detach().float())
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)  # an idle role holds no gradient memory
                if role in ema:
                    update_ema(ema[role], net, ema_beta((step + 1) * s.batch_size, s.batch_size,
                                                        r["ema_halflife_kimg"], s.ema_rampup))
                objective.after_step(role, step)
            step += 1
            progress.update(1)

            # one process reads its clock every step; several agree by an all-reduce at log steps only (no
            # per-step sync), so a DDP run may pass its budget by up to train.log_every steps
            out_of_time = (bool(s.minutes) and (world == 1 or step % s.log_every == 0)
                           and out_of_budget(elapsed_before + time.time() - start, s.minutes, world, device))
            checkpoint_now = (step % s.ckpt_every == 0 or step == s.steps or out_of_time
                              or (s.ckpt_minutes and time.time() - last_checkpoint >= 60 * s.ckpt_minutes))
            if step % s.log_every == 0 or checkpoint_now:
                bad = int(first_bad_step)  # the one host sync per log interval
                if bad >= 0:
                    raise FloatingPointError(f"loss is not finite (nan or inf) at step {bad}; stopped. "
                                             f"{last_good(run_dir, bad, main_process)}")
                n = step - tic_step  # steps since the last record
                record = {k: float(total) / count for k, (total, count) in sums.items()}  # mean per update
                record.update(step=step, images_per_sec=n * s.batch_size / max(time.time() - tic, 1e-9),
                              elapsed_sec=round(elapsed_before + time.time() - start, 1),
                              **{f"{role}/lr": learning_rate(step - 1, roles[role], s) for role in nets})
                log.write(record)
                last_record = record
                progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k.endswith("loss")},
                                     refresh=False)
                sums, tic, tic_step = {}, time.time(), step
            if checkpoint_now and main_process:
                if not all_finite([*nets.values(), *ema.values()]):  # a finite loss can still leave diverged weights
                    raise FloatingPointError(f"weights are not finite after step {step}; stopped. "
                                             f"{last_good(run_dir, step, main_process)}")
                if (run_dir / "checkpoint.pt").exists():  # kept until the new one's weights give a finite loss
                    os.replace(run_dir / "checkpoint.pt", run_dir / "checkpoint_prev.pt")
                save_checkpoint({"step": step, "config": config,
                                 "networks": {role: net.state_dict() for role, net in nets.items()},
                                 "ema": {role: net.state_dict() for role, net in sampling_nets.items()},
                                 "optimizers": {role: o.state_dict() for role, o in optimizers.items()},
                                 "scalers": {role: sc.state_dict() for role, sc in scalers.items()},
                                 "rng": rng_state(), "objective": objective.state_dict(), "teacher": teacher_state,
                                 "elapsed_sec": elapsed_before + time.time() - start}, run_dir / "checkpoint.pt")
                last_checkpoint = time.time()
            if s.sample_every and step % s.sample_every == 0 and main_process and len(dataset.shape) == 3:
                with using_networks(objective, sampling_nets), torch.inference_mode():
                    cond = {"class_labels": grid_labels.to(device)} if grid_labels is not None else None
                    images = objective.generate(grid_noise.to(device), objective.eval_nfe or s.sample_nfe, cond)
                save_image_grid(images, run_dir / "samples" / f"step_{step:07d}.png")
            if out_of_time:
                break
        progress.close()
        objective.trained_steps = step
        if main_process:
            losses = ", ".join(f"{k} {v:.4g}" for k, v in last_record.items() if k.endswith("loss"))
            print(f"trained {step} steps in {(elapsed_before + time.time() - start) / 60:.1f} min"
                  + (f"; last logged means: {losses}" if losses else ""))
        objective.networks = nets
        if teacher is not None and main_process and config["teacher"]["eval_n"]:
            with using_networks(objective, sampling_nets):
                report = write_quality_report(objective, teacher, config, dataset, device, run_dir)
            log.write({"step": step, **{f"quality/{k}": v for k, v in report.items() if isinstance(v, (int, float))}})
        log.close()
    if world > 1:
        torch_dist.destroy_process_group()
    return objective, sampling_nets


def last_good(run_dir, bad_step, main_process=True):
    """Keep the newest checkpoint whose weights gave a finite loss: one saved at `bad_step` holds the weights that
    gave the first non-finite loss, so the one before it (checkpoint_prev.pt) takes its place. Returns a sentence."""
    path, previous = run_dir / "checkpoint.pt", run_dir / "checkpoint_prev.pt"
    if main_process and path.exists() and load_checkpoint(path)["step"] >= bad_step:
        os.replace(path, run_dir / "checkpoint_diverged.pt")
        if previous.exists():
            os.replace(previous, path)
    if not path.exists():
        return "No good checkpoint had been written yet."
    return f"The last good checkpoint, {path}, is kept (step {load_checkpoint(path)['step']})."


def make_config(args):
    """The resolved config of a new run, or of the run being resumed (only train.* may change on resume).
    Returns (config, dataset or None)."""
    overrides = parse_overrides(args.overrides)
    if args.resume:
        if args.config or args.backbone or args.objective or args.data or args.teacher or args.trajectories:
            raise ValueError("--resume continues a run with its saved config; only train.* overrides may be given")
        if set(overrides) - {"train", "optim"}:
            raise ValueError("--resume: only train.* and optim.* settings may change (e.g. train.steps=...)")
        if not (Path(args.resume) / "checkpoint.pt").exists():
            saved = Path(args.resume) / "config.yaml"
            raise FileNotFoundError(f"{args.resume} has no checkpoint yet" + (
                f" (stopped before its first one): start it afresh with python -m runs.train --config {saved} "
                f"--out {args.resume}" if saved.exists() else ": it is not a run directory"))
        return resolve(merge(load_yaml(Path(args.resume) / "config.yaml"), overrides)), None
    flags = {s: {"name": getattr(args, s)} for s in ("backbone", "objective", "data") if getattr(args, s)}
    teacher = {k: v for k, v in (("path", args.teacher), ("trajectories", args.trajectories)) if v}
    if teacher:
        flags["teacher"] = teacher
    defaults = {"backbone": {"name": "unet"}, "objective": {"name": "dsm"}, "data": {"name": "mnist"}}
    preset = load_yaml(args.config) if args.config else {}
    config = merge(defaults, preset, flags, overrides)
    teacher_path = config.get("teacher", {}).get("path")
    if teacher_path:
        named = any("name" in c.get("backbone", {}) for c in (preset, flags, overrides))
        inherited = inherited_from_teacher(teacher_path, config["backbone"]["name"] if named else None)
        config = merge(defaults, inherited, preset, flags, overrides)
        config["teacher"]["path"] = absolute(teacher_path)  # the student's record works from any directory
    if pick(OBJECTIVES, config["objective"]["name"], "objective").needs_labels:
        config["train"] = {"conditional": True, **config.get("train", {})}  # unless set otherwise: fails clearly
    return complete_config(config)


def inherited_from_teacher(path, backbone_name=None):
    """What a student takes from its trained teacher unless told otherwise: the data set, whether labels are used,
    the backbone (its name unless `backbone_name` is chosen) and the backbone's settings that the student's backbone
    takes (so the student can start from the teacher's weights)."""
    from runs.teacher import teacher_config
    theirs = teacher_config(path)
    backbone_name = backbone_name or theirs["backbone"]["name"]
    takes = constructor_defaults(pick(BACKBONES, backbone_name, "backbone"), "backbone")
    backbone = {k: v for k, v in theirs["backbone"].items() if k in takes and k != "name"}
    return {"data": dict(theirs["data"]), "backbone": {"name": backbone_name, **backbone},
            "train": {"conditional": theirs["train"]["conditional"]}}


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m runs.train", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", help="backbone name (python -m runs.list)")
    p.add_argument("--objective", help="objective name")
    p.add_argument("--data", help="data set name")
    p.add_argument("--teacher", help="trained teacher (run directory or checkpoint) for distillation objectives; "
                                     "without it they fit an analytic teacher to the data")
    p.add_argument("--trajectories", help="teacher rollouts made by runs.make_pairs (default: generated in the run)")
    p.add_argument("--config", help="YAML preset, e.g. runs/configs/mnist_teacher.yaml")
    p.add_argument("--out", help="run directory (default: out/<data>-<objective>-<backbone>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. backbone.model_channels=64 train.steps=1000")
    return p.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli_errors():
        config, dataset = make_config(args)
        run_dir = Path(args.resume or args.out or
                       f"out/{config['data']['name']}-{config['objective']['name']}-{config['backbone']['name']}")
        try:
            train(config, run_dir, resume=bool(args.resume), dataset=dataset)
        except FloatingPointError as e:
            raise ValueError(str(e)) from None
        print(f"done: {run_dir}")


if __name__ == "__main__":
    main()
