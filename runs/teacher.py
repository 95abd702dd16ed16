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
"""
import dataclasses
import math
from pathlib import Path

import torch

from data.trajectories import TrajectoryStore, fingerprint
from models.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from models.ppca import PPCAMixtureDenoiser

ANALYTIC = ("auto", "gmm", "ppca", "empirical")


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


def load_teacher(settings, dataset, conditional, device):
    """(frozen teacher on `device`, a one-line description) per the `teacher` settings."""
    s = settings if isinstance(settings, TeacherSettings) else TeacherSettings(**settings)
    if s.path:
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
