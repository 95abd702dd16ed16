"""Teachers and their rollouts for a training run (the `teacher` config section, `--teacher`, `--trajectories`).

A teacher is a frozen denoiser D(x, sigma, class_labels=None). It is either a trained run (`teacher.path`: a run
directory or checkpoint file whose method yields a denoiser) or, with no path, an analytic teacher fitted to the
run's data set, so every distillation method runs with nothing else present:

    gmm data            the mixture's exact denoiser (models.analytic.GaussianMixtureDenoiser)
    other images        a mixture of probabilistic PCA fitted to the images (models.ppca.PPCAMixtureDenoiser)
    other vectors       the empirical optimum of up to `fit_n` training points (models.analytic.EmpiricalDenoiser)

Objectives that learn from teacher rollouts declare `rollouts` (solver, NFE, schedule, saved sigmas, count); the
run generates them once into `<run>/rollouts` (resumable: a killed run keeps its finished shards), or reads a store
made by `python -m runs.make_pairs` (`teacher.trajectories`), checked against the teacher's fingerprint.

A student's checkpoint records its teacher (`teacher_record`, under the key "teacher"), so that sampling or reloading
the student needs neither the directory it was trained from nor a new fit:

    {"kind": "run", "path": absolute path, "fingerprint": sha256, "state": {}}       a trained teacher run
    {"kind": "gmm" | "ppca" | "empirical", "path": None, "fingerprint": sha256,
     "state": the fitted parameters (models.analytic.AnalyticTeacher.export_state)}  an analytic teacher

`load_teacher(..., record=record)` rebuilds an analytic teacher from its parameters (no fitting) and loads a trained
one from its absolute path, refusing in one line a teacher file that is gone or whose weights changed (fingerprint).
"""
import dataclasses
import math
import os
from pathlib import Path

import torch

from data.trajectories import TrajectoryStore, fingerprint
from models.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from models.ppca import PPCAMixtureDenoiser

ANALYTIC = ("auto", "gmm", "ppca", "empirical")
ANALYTIC_CLASSES = {"gmm": GaussianMixtureDenoiser, "ppca": PPCAMixtureDenoiser, "empirical": EmpiricalDenoiser}


@dataclasses.dataclass
class TeacherSettings:
    """The `teacher.*` section (only for objectives that need a teacher)."""
    path: str = None            # trained teacher: run directory or checkpoint file; null = analytic teacher
    analytic: str = "auto"      # with no path: "auto", "gmm", "ppca" or "empirical" (see the module docstring)
    components: int = 10        # ppca: mixture components (per class when conditional)
    rank: int = 16              # ppca: rank of each component
    fit_n: int = 10000          # training points the analytic teacher is fitted to
    trajectories: str = None    # a store from runs.make_pairs; null = generate into <run>/rollouts
    eval_n: int = 256           # held-out noises for the end-of-run quality report; 0 disables it


def teacher_config(path):
    """The resolved config saved with a trained teacher (a run directory or checkpoint file)."""
    from runs.checkpoint import load_checkpoint
    return load_checkpoint(path)["config"]


def absolute(path):
    """`path` made absolute against the current directory (no symlinks resolved), as a string."""
    return os.path.abspath(os.path.expanduser(str(path)))


def teacher_record(teacher, settings):
    """What a student's checkpoint keeps of its teacher (plain tensors and python values: weights_only loads it):
    kind ("run" for a trained teacher at settings.path, else "gmm" / "ppca" / "empirical", or "module" for a teacher
    given in code that is neither), the absolute path of a trained one, its data.trajectories.fingerprint, and an
    analytic teacher's fitted parameters."""
    s = settings if isinstance(settings, TeacherSettings) else TeacherSettings(**settings)
    record = {"kind": "module", "path": None, "fingerprint": fingerprint(teacher), "state": {}}
    if s.path:
        record.update(kind="run", path=absolute(s.path))
    else:
        kind = next((k for k, cls in ANALYTIC_CLASSES.items() if type(teacher) is cls), None)
        if kind is not None:
            record.update(kind=kind, state=teacher.export_state())
    return record


def teacher_from_record(record, device):
    """(frozen teacher on `device`, description) rebuilt from a `teacher_record`, without fitting anything; a trained
    teacher's file must still be at its recorded path with the recorded weights."""
    kind, path, expected = record.get("kind"), record.get("path"), record.get("fingerprint")
    if kind == "run":
        if not Path(path).exists():
            raise FileNotFoundError(f"the teacher this run was trained with, {path}, is missing (moved or deleted); "
                                    "put it back there to sample or reload the run")
        from runs.build import load_run
        _, objective = load_run(path, device)
        teacher = objective.denoiser()
        found = None if teacher is None else fingerprint(teacher)
        if found != expected:
            raise ValueError(f"the teacher at {path} is not the one this run was trained with (it changed: "
                             f"fingerprint {str(found)[:12]}, recorded {str(expected)[:12]}); put the original "
                             "teacher back there")
        return teacher, f"run {path}"
    if kind not in ANALYTIC_CLASSES:
        raise ValueError(f"this run's teacher ({kind!r}) was given in code and cannot be rebuilt from its checkpoint: "
                         "pass it again, e.g. runs.build.load_run(path, teacher=...)")
    teacher = ANALYTIC_CLASSES[kind].from_state(record["state"])
    if fingerprint(teacher) != expected:
        raise ValueError(f"the analytic {kind} teacher saved in this run's checkpoint does not match its recorded "
                         "fingerprint (corrupt checkpoint?)")
    return teacher.to(device).eval().requires_grad_(False), f"analytic {kind} (saved with the run)"


def find_teacher(path, run):
    """A teacher path as recorded in an older run's config: as given when it exists from here, else, when relative
    (to the directory the run was trained from), looked up from the run's directory and each directory above it.
    Runs that record their teacher (teacher_record) keep its absolute path instead."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or run is None:
        return str(given)
    start = Path(absolute(run))
    for directory in ([start] if start.is_dir() else []) + list(start.parents):
        if (directory / given).exists():
            return str(directory / given)
    raise FileNotFoundError(f"teacher {path} (relative to the directory the run {run} was trained from) not found from "
                            "here nor from the run's directory or any above it; run from the training directory")


def load_teacher(settings, dataset, conditional, device, record=None, run=None):
    """(frozen teacher on `device`, a one-line description) per the `teacher` settings; with `record` (a
    `teacher_record` from the run's checkpoint) the recorded teacher, rebuilt without fitting and checked
    (`dataset` may then be None). `run`: the run directory or checkpoint whose teacher this is, where an older run's
    relative teacher path is also looked for."""
    if record is not None:
        return teacher_from_record(record, device)
    s = settings if isinstance(settings, TeacherSettings) else TeacherSettings(**settings)
    if s.path:
        s = dataclasses.replace(s, path=find_teacher(s.path, run))
        from runs.build import load_run
        _, objective = load_run(s.path, device)
        teacher = objective.denoiser()
        if teacher is None:
            raise ValueError(f"teacher {s.path} is not a denoiser (its method samples with its own generator); "
                             "pass a diffusion teacher (e.g. a dsm run)")
        return teacher, f"run {s.path}"
    kind = s.analytic
    if kind not in ANALYTIC:
        raise ValueError(f"unknown teacher.analytic {kind!r}; known: {', '.join(ANALYTIC)}")
    if kind == "auto":
        kind = "gmm" if hasattr(dataset, "params") else "ppca" if len(dataset.shape) == 3 else "empirical"
    if kind == "gmm":
        teacher = GaussianMixtureDenoiser.from_data(dataset)
    else:
        x, labels = fit_points(dataset, s.fit_n)
        labels = labels if conditional else None
        if kind == "ppca":
            teacher = PPCAMixtureDenoiser.fit(x, components=s.components, rank=s.rank, labels=labels)
        else:
            teacher = EmpiricalDenoiser(x, labels)
    description = f"analytic {kind} fitted to {type(dataset).__name__}"
    return teacher.to(device).eval().requires_grad_(False), description


def fit_points(dataset, n):
    """The first `n` (x, label) pairs of a data set, stacked."""
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def rollout_store(objective, teacher, description, settings, run_dir, dataset, conditional, device):
    """The trajectory store the objective learns from: an existing one (checked) or generated into run_dir."""
    s = settings if isinstance(settings, TeacherSettings) else TeacherSettings(**settings)
    spec = objective.rollouts
    if s.trajectories:
        store = TrajectoryStore(s.trajectories, fingerprint=fingerprint(teacher))
        if not math.isclose(store.manifest["grid"][0], spec["sigma_max"], rel_tol=1e-9):
            raise ValueError(f"trajectory store {s.trajectories} starts its rollouts at sigma_max="
                             f"{store.manifest['grid'][0]:g}, the objective at {spec['sigma_max']:g}: make pairs with "
                             f"--sigma-max {spec['sigma_max']:g} or set objective.sigma_max")
        for key in ("solver", "nfe", "schedule"):
            if store.manifest[key] != spec[key]:
                print(f"note: {s.trajectories} was made with {key}={store.manifest[key]}; the objective's "
                       f"rollout {key}={spec[key]} is ignored")
    else:
        from runs.make_pairs import generate_rollouts
        store = generate_rollouts(
            Path(run_dir) / "rollouts", teacher, solver=spec["solver"], nfe=spec["nfe"], schedule=spec["schedule"],
            sigma_min=spec["sigma_min"], sigma_max=spec["sigma_max"], rho=spec["rho"],
            save_sigmas=spec["save_sigmas"], n=spec["n"], num_classes=dataset.num_classes if conditional else 0,
            shape=tuple(dataset.shape), seed=spec.get("seed", 0), device=device, teacher_description=description)
    if tuple(store.shape) != tuple(dataset.shape):
        raise ValueError(f"trajectory store {store.path if hasattr(store, 'path') else ''} holds samples of shape "
                         f"{list(store.shape)}, the data are {list(dataset.shape)}")
    wanted, stored = objective.rollout_sigmas.to(torch.float64), store.sigmas.to(torch.float64)
    where = f"trajectory store {getattr(store, 'path', '')}"
    if wanted.numel() > stored.numel():
        raise ValueError(f"{where} holds K={stored.numel()} saved states; the objective needs K={wanted.numel()} "
                         f"(K larger than the stored trajectory): make pairs with --save-sigmas {wanted.numel()}")
    missing = [float(s) for s in wanted if not torch.isclose(stored, s, rtol=1e-5, atol=1e-9).any()]
    if missing:
        raise ValueError(f"{where} holds states at sigmas {[round(float(s), 6) for s in stored]}, not at "
                         f"{[round(s, 6) for s in missing]} which the objective needs: make pairs with the objective's "
                         "rollout solver, NFE and schedule")
    if stored.numel() != wanted.numel():
        store = store.select([float(s) for s in wanted])
    return store


def prepare_teacher(config, dataset, device, run_dir, resume=False, teacher=None):
    """(teacher, description, record) of a run whose objective needs a teacher, else (None, None, None). `teacher`:
    one given in code. A resumed run rebuilds an analytic teacher from its checkpoint's record, without a re-fit;
    `record` (teacher_record) goes into every checkpoint, so sampling the student never re-fits either."""
    if "teacher" not in config:
        return None, None, None
    if teacher is not None:
        teacher, description = teacher.to(device).eval().requires_grad_(False), "given"
    else:
        from runs.checkpoint import load_checkpoint
        record = load_checkpoint(Path(run_dir) / "checkpoint.pt").get("teacher") if resume else None
        teacher, description = load_teacher(config["teacher"], dataset, config["train"]["conditional"], device,
                                            record=record)
    return teacher, description, teacher_record(teacher, config["teacher"])


def shared_rollouts(objective, teacher, description, config, run_dir, dataset, device, main_process, world, barrier):
    """The objective's teacher rollouts: generated (or checked) by the main process, then read by every process
    (`barrier`: the process group's, when there are several)."""
    args = (objective, teacher, description, config["teacher"], run_dir, dataset, config["train"]["conditional"],
            device)
    store = rollout_store(*args) if main_process else None
    if world > 1:
        barrier()
        if not main_process:
            store = rollout_store(*args)
    return store
