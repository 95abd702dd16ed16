"""The end-of-run report of a distilled or teacher-initialised one-step student, on held-out noises.

    map_rmse           RMSE between the student's sample and the teacher's rollout (the solver and NFE the student
                       learnt from) from the same unit noise z, noises never used in training (students that learn
                       the teacher's map only: Objective.learns_teacher_map)
    teacher_map_rmse   the same for the teacher itself sampled with the student's NFE (the baseline to beat)
    swd, teacher_swd, reference_swd
                       sliced Wasserstein distance of the student's samples, of the teacher's at the student's NFE and of
                       the teacher's reference rollouts to n real data points (flattened), for every student
    fid_mnist, precision, recall, classes_covered (and teacher_fid_mnist, reference_fid_mnist)
                       MNIST metrics of the samples against real digits (MNIST-shaped data, n >= 500)
"""
import json
import time
from pathlib import Path

import torch

from metrics import swd
from solvers import SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe

DEFAULT_ROLLOUT = dict(solver="heun", nfe=35, schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0)
HELD_OUT_SEED = 2**31 - 1  # rollouts for training use small seeds; these noises are disjoint by construction


def solve(teacher, z, cond, solver, nfe, schedule, sigma_min, sigma_max, rho, **_):
    sigmas = sigmas_for_nfe(solver, nfe, schedule, **schedule_kwargs(schedule, sigma_min, sigma_max, rho)).to(z.device)
    return SOLVERS[solver](teacher, z * sigmas[0], sigmas, cond=cond, **options_for_nfe(solver, nfe))


def batched(fn, z, labels, batch):
    out = []
    for start in range(0, z.shape[0], batch):
        cond = None if labels is None else {"class_labels": labels[start:start + batch]}
        out.append(fn(z[start:start + batch], cond))
    return torch.cat(out)


def one_step_quality(objective, teacher, config, dataset, device, n=256, batch=256):
    """The report above as a dict (plain numbers and strings)."""
    nfe = int(objective.eval_nfe or 1)
    levels = {k: config["objective"][k] for k in ("sigma_min", "sigma_max", "rho") if k in config["objective"]}
    spec = {**DEFAULT_ROLLOUT, **levels, **(objective.rollouts or {})}
    generator = torch.Generator().manual_seed(HELD_OUT_SEED)
    z = torch.randn([n, *dataset.shape], generator=generator).to(device)
    labels = None
    if config["train"]["conditional"]:
        labels = torch.randint(0, dataset.num_classes, (n,), generator=generator).to(device)
    with torch.inference_mode():
        reference = batched(lambda zb, c: solve(teacher, zb, c, **spec), z, labels, batch)
        baseline = batched(lambda zb, c: solve(teacher, zb, c, **{**spec, "nfe": nfe}), z, labels, batch)
        tic = time.perf_counter()
        student = batched(lambda zb, c: objective.generate(zb, nfe, c), z, labels, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
    rmse = lambda a: float((a.float() - reference.float()).square().mean().sqrt())  # noqa: E731
    report = {"nfe": nfe, "n": n, "reference": f"{spec['solver']}@{spec['nfe']}"}
    if objective.learns_teacher_map:
        report.update(map_rmse=rmse(student), teacher_map_rmse=rmse(baseline))
    real = real_points(dataset, n, generator)
    flat = lambda a: a.float().cpu().flatten(1)  # noqa: E731
    report.update(swd=swd(flat(student), flat(real)), teacher_swd=swd(flat(baseline), flat(real)),
                  reference_swd=swd(flat(reference), flat(real)), student_images_per_sec=n / max(seconds, 1e-9))
    if tuple(dataset.shape) == (1, 28, 28) and n >= 500:
        from metrics.mnist_net import load_metric_net
        from runs.eval import mnist_report
        net = load_metric_net(device=device)
        scores = mnist_report(student.cpu(), n=n, net=net, device=device)
        report.update({k: scores[k] for k in ("fid_mnist", "precision", "recall", "classes_covered")})
        report["teacher_fid_mnist"] = mnist_report(baseline.cpu(), n=n, net=net, device=device, manifold=False,
                                                   classes=False)["fid_mnist"]
        report["reference_fid_mnist"] = mnist_report(reference.cpu(), n=n, net=net, device=device, manifold=False,
                                                     classes=False)["fid_mnist"]
    return report


def real_points(dataset, n, generator):
    """n data points drawn (seeded) from the data set, in data space."""
    index = torch.randperm(len(dataset), generator=generator)[:n]
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in index])


def write_quality_report(objective, teacher, config, dataset, device, run_dir):
    """one_step_quality with the run's teacher.eval_n noises, written to <run>/quality.json and printed."""
    report = one_step_quality(objective, teacher, config, dataset, device, n=config["teacher"]["eval_n"])
    (Path(run_dir) / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print("quality: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    return report
