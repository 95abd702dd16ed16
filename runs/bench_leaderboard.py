"""The leaderboard: every registered one- and few-step method on the same teacher, data, seeds and budget.

    python -m runs.bench leaderboard                          # the tiny CPU budget (about 20 minutes on 2 cores)
    python -m runs.bench leaderboard --preset onestep         # 300 steps x batch 32, 1,000 samples (hours on a CPU)
    python -m runs.bench leaderboard --methods kd,sid --steps 100 --parts mnist

Methods: discover() lists every objective in OBJECTIVES that is a one- or few-step method (is_few_step), so an
objective registered later joins without editing this file; bench_distill.METHODS adds its variants (dmd2_no_gan,
reflow_distill, diffratio_random), which --methods may name, and each method's step-dependent settings there
(progressive's stages, tract's phases, ect's stages, dsno's fno backbone) are used.

mnist    Each method is trained from the MNIST teacher (--teacher; trained from runs/configs/mnist_teacher.yaml into
         it first when it is a run directory that does not exist yet); teacher-free methods train on the teacher's
         data with its backbone settings. Methods that learn from teacher rollouts share one store of Heun-35 pairs
         (its teacher calls and wall time are charged to every method that uses it). Each method is scored at its own
         eval_nfe and at every NFE of the budget its generate accepts: MNIST-FID, precision, recall and classes covered
         of n samples against the same seeded n real digits (runs.eval.mnist_report), images per second; the teacher
         at Heun 35 and with euler / dpmpp_2m at the students' NFE.
mixture  Methods that learn the teacher's ODE map (learns_teacher_map) are also trained, separately and briefly, on the
         8-component Gaussian mixture in 64 dimensions of bench_distill (its exact teacher), and scored by the RMSE of
         their samples to the exact ODE map z -> x0 on held-out noises at the same NFE.

Every stage is cached under --runs-dir, keyed by what determines it (the resolved training config, the teacher's and
the feature net's fingerprints, n, seed, NFE): a rerun reuses finished training runs and scores, an interrupted bench
resumes at the first stage not done, and a changed budget or setting measures afresh. A method that fails (a skeleton
whose construction raises, say) becomes a row holding its error. Writes <out>.md, <out>.csv, <out>.json and the plots
<out>_fid_vs_nfe.png and <out>_fid_vs_cost.png (matplotlib, the `bench` extra; skipped with a warning without it).
"""
import copy
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from objectives import OBJECTIVES

from runs.bench_distill import (METHODS, MIXTURE_DATA, MIXTURE_NET, TEACHER_SOLVERS, counting_teacher_calls, rmse,
                                teacher_errors)
from runs.bench_distill_mnist import generate_samples
from runs.build import build_objective, load_run
from runs.cli import ArgumentParser, cli_errors, non_negative_float, pick_device, positive_int
from runs.provenance import provenance
from runs.train import inherited_from_teacher, make_config, parse_args, train

# The budget: what every method gets. Flags override a preset's fields; the output states the one used.
@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int              # training steps per method on MNIST
    batch_size: int         # train.batch_size
    minutes: float          # train.minutes: a wall-clock cap per method's MNIST training (0: none)
    n: int                  # MNIST samples per score, against as many real digits
    pairs: int              # Heun-35 teacher rollouts in the shared store (methods that learn from pairs)
    mixture_steps: int      # training steps per method on the 64-d mixture (batch 16, bench_distill's settings)
    n_eval: int             # held-out noises for the mixture's exact-map error
    nfes: tuple             # every method is also scored at these NFE where its generate takes them
    settings: tuple = ()    # section.key=value for every MNIST student run


PRESETS = {
    # minutes for the whole bench on 2 CPU cores: students barely leave their start, but every stage runs
    "tiny": Budget(steps=20, batch_size=16, minutes=0.0, n=250, pairs=256, mixture_steps=100, n_eval=256,
                   nfes=(1, 2, 4), settings=("train.warmup_steps=5",)),
    # bench/distill_mnist_onestep.md's budget: 300 steps at batch 32, 1,000 samples, 2,000 pairs
    "onestep": Budget(steps=300, batch_size=32, minutes=0.0, n=1000, pairs=2000, mixture_steps=1000, n_eval=1000,
                      nfes=(1, 2, 4)),
    # bench/distill_mnist_30min.md's: 30 minutes of training per method
    "minutes30": Budget(steps=100_000, batch_size=32, minutes=30.0, n=1000, pairs=2000, mixture_steps=1000,
                        n_eval=1000, nfes=(1, 2, 4)),
}
TEACHER_ARGS = ["--config", "runs/configs/mnist_teacher.yaml"]  # how a missing teacher run directory is trained
PAIRS = dict(solver="heun", nfe=35, save_sigmas=4)  # the shared store: final states and dsno's K = 4
COLUMNS = ["method", "objective", "nfe", "fid_mnist", "fid_mnist_std", "precision", "recall", "classes_covered", "map_rmse",
           "images_per_sec", "train_seconds", "teacher_calls", "train_steps", "mixture_train_seconds", "error"]


# ---- which methods: the one place that decides ----------------------------------------------------------------------

def is_few_step(cls):
    """Whether objective class `cls` is a one- or few-step method that the leaderboard ranks: its declared
    `few_step` (objectives/base.py; False for teacher training and the guidance methods, which `python -m runs.bench
    guidance` measures against the guided teacher)."""
    return cls.few_step


def discover(registry=None):
    """The registry's one- and few-step methods, in registration order."""
    registry = OBJECTIVES if registry is None else registry
    return [name for name, cls in registry.items() if is_few_step(cls)]


def known_methods(registry=None):
    """What --methods may name: the discovered objectives and bench_distill's variants of them."""
    registry = OBJECTIVES if registry is None else registry
    found = discover(registry)
    return found + [m for m, (objective, _, _) in METHODS.items() if m not in found and objective in found]


def method_spec(method):
    """(objective name, backbone or None for the teacher's, settings given the step count)."""
    if method in METHODS:
        return METHODS[method]
    return method, None, lambda steps: []


# ---- stages cached on disk -------------------------------------------------------------------------------------------

def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path):
    path = Path(path)
    path = path / "checkpoint.pt" if path.is_dir() else path
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Stages:
    """Small JSON results under `root`, each holding the key it was computed for; `fresh` ignores those of earlier
    invocations. `computed` and `reused` name the stages this invocation computed and found done."""

    def __init__(self, root, fresh=False):
        self.root, self.fresh, self.reused, self.computed, self.memory = Path(root), fresh, [], [], {}

    def load(self, name, key):
        if name in self.memory and self.memory[name]["key"] == key:  # seen in this invocation: not counted again
            return self.memory[name]
        path = self.root / name
        if self.fresh or not path.is_file():
            return None
        value = json.loads(path.read_text())
        if value.get("key") != key:
            return None
        self.reused.append(name)
        self.memory[name] = value
        return value

    def save(self, name, key, value):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, **value}, indent=1) + "\n")
        os.replace(tmp, path)
        self.computed.append(name)
        self.memory[name] = {"key": key, **value}
        return self.memory[name]


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ---- the bench -------------------------------------------------------------------------------------------------------

class Leaderboard:
    def __init__(self, budget, teacher, runs_dir, device, seed=0, fresh=False, parts=("mnist", "mixture")):
        self.budget, self.teacher_path, self.device, self.seed = budget, str(teacher), device, seed
        self.parts, self.runs = tuple(parts), Path(runs_dir)
        self.stages = Stages(self.runs, fresh)
        self._loaded = {}

    # lazily built shared things
    def lazy(self, name, build):
        if name not in self._loaded:
            self._loaded[name] = build()
        return self._loaded[name]

    def teacher_file(self):
        """The MNIST teacher's absolute path, trained first when it is a run directory that does not exist yet."""
        return self.lazy("teacher_file", lambda: ensure_teacher(self.teacher_path, self.device))

    def teacher(self):
        """(config, teacher objective)."""
        return self.lazy("teacher", lambda: load_run(self.teacher_file(), self.device))

    def teacher_key(self):
        return self.lazy("teacher_key", lambda: file_digest(self.teacher_file()))

    def net(self):
        from metrics.mnist_net import load_metric_net
        return self.lazy("net", lambda: load_metric_net(device=self.device))

    def net_key(self):
        from data.trajectories import fingerprint
        return self.lazy("net_key", lambda: fingerprint(self.net())[:16])

    def scores(self, samples):
        from runs.eval import mnist_report
        report = mnist_report(samples, n=self.budget.n, seed=self.seed, net=self.net(), device=self.device)
        return {"fid_mnist": round(report["fid_mnist"], 2), "fid_mnist_std": round(report.get("fid_mnist_std", 0.0), 2),
                "precision": round(report["precision"], 3),
                "recall": round(report["recall"], 3), "classes_covered": report["classes_covered"]}

    def score_key(self, **extra):
        return {"n": self.budget.n, "seed": self.seed, "feature_net": self.net_key(), **extra}

    # -- MNIST ---------------------------------------------------------------------------------------------------
    def teacher_row(self, solver, nfe):
        from runs.sample import sample
        key = digest(self.score_key(teacher=self.teacher_key(), solver=solver, nfe=nfe))
        name = f"mnist/teacher/{solver}_nfe{nfe}_{key}.json"
        found = self.stages.load(name, key)
        if found is None:
            config, teacher = self.teacher()
            samples, _, measured, rate = sample(teacher, config, self.budget.n, nfe, solver, batch=250,
                                                seed=self.seed, device=self.device)
            found = self.stages.save(name, key, {"nfe": measured, **self.scores(samples),
                                                 "images_per_sec": round(rate, 1)})
            print(f"teacher ({solver}) at {nfe} NFE: MNIST-FID {found['fid_mnist']}", flush=True)
        return found

    def pairs(self):
        """{path, teacher_calls, seconds} of the shared Heun-35 rollouts, made (or resumed) once."""
        def make():
            from runs.make_pairs import generate_rollouts, shape_of
            key = digest({"teacher": self.teacher_key(), "n": self.budget.pairs, "seed": self.seed, **PAIRS})
            where, name = self.runs / "mnist" / "pairs" / key, f"mnist/pairs/{key}.json"
            found = self.stages.load(name, key)
            if found is None:
                config, teacher = self.teacher()
                shape, classes = shape_of(config)
                tic = time.time()
                generate_rollouts(where, teacher.denoiser(), solver=PAIRS["solver"], nfe=PAIRS["nfe"],
                                  schedule="karras", save_sigmas=PAIRS["save_sigmas"], n=self.budget.pairs,
                                  num_classes=classes if config["train"]["conditional"] else 0, shape=shape,
                                  seed=self.seed, device=self.device, teacher_description=self.teacher_path,
                                  sigma_min=config["objective"].get("sigma_min", 0.002),
                                  sigma_max=config["objective"].get("sigma_max", 80.0),
                                  rho=config["objective"].get("rho", 7.0), progress=False)
                found = self.stages.save(name, key, {"path": str(where), "teacher_calls": self.budget.pairs *
                                                     PAIRS["nfe"], "seconds": round(time.time() - tic, 1)})
            return found
        return self.lazy("pairs", make)

    def mnist_args(self, method, run_dir):
        objective, backbone, extra = method_spec(method)
        b = self.budget
        common = [*extra(b.steps), f"train.steps={b.steps}", f"train.batch_size={b.batch_size}",
                  f"train.minutes={b.minutes}", f"train.seed={self.seed}", f"train.device={self.device}",
                  "train.sample_every=0", *b.settings]
        if OBJECTIVES[objective].needs_teacher:
            return ["--objective", objective, *(["--backbone", backbone] if backbone else []),
                    "--teacher", self.teacher_file(),
                    "--out", str(run_dir), *common, "teacher.eval_n=0"]
        # teacher-free: the teacher's data and backbone settings, from random weights
        inherited = inherited_from_teacher(self.teacher_file(), backbone)
        data = inherited["data"]
        return ["--objective", objective, "--backbone", inherited["backbone"]["name"], "--data", data["name"],
                "--out", str(run_dir), *[f"data.{k}={json.dumps(v)}" for k, v in data.items() if k != "name"],
                *[f"backbone.{k}={json.dumps(v)}" for k, v in inherited["backbone"].items() if k != "name"],
                f"train.conditional={json.dumps(inherited['train']['conditional'])}", *common]

    def train_stage(self, part, method, args, extra_key, probe=None):
        """(trained record, run directory) of one method on one part: a finished run with this key, else trained
        afresh. `probe(config) -> extra flags` may add flags (the pairs store) after a first construction."""
        config = make_config(parse_args(args))[0]
        key = digest({"config": config, **extra_key})
        where = self.runs / part / method / key
        found = self.stages.load(f"{part}/{method}/{key}/trained.json", key)
        if found is not None and (where / "run" / "checkpoint.pt").is_file():
            return found, where / "run"
        more = probe(config) if probe else {}
        if more.get("flags"):
            config = make_config(parse_args(args + more["flags"]))[0]
        shutil.rmtree(where / "run", ignore_errors=True)  # an interrupted run trains afresh: exact teacher calls
        print(f"training {method} on {part} ({key})", flush=True)
        tic = time.time()
        with counting_teacher_calls() as calls:
            objective, _ = train(copy.deepcopy(config), where / "run")
        seconds = time.time() - tic + more.get("seconds", 0.0)
        (where / "run" / "checkpoint_prev.pt").unlink(missing_ok=True)  # a finished run's fallback: disk only
        record = {"method": method, "objective": config["objective"], "eval_nfe": int(objective.eval_nfe or 1),
                  "train_steps": objective.trained_steps, "train_seconds": round(seconds, 1),
                  "teacher_calls": calls[0] + more.get("teacher_calls", 0),
                  "pairs": more.get("path"), "learns_teacher_map": bool(objective.learns_teacher_map)}
        return self.stages.save(f"{part}/{method}/{key}/trained.json", key, record), where / "run"

    def mnist_method(self, method):
        """{nfe: row} of one method on MNIST, and its training record."""
        objective_name = method_spec(method)[0]

        def probe(config):
            """Build the objective once (a construction error surfaces before any training) to read its declared
            rollouts: methods that learn from pairs get the shared store."""
            cls = OBJECTIVES[objective_name]
            built = build_objective(copy.deepcopy(config), **(
                {"teacher": self.teacher()[1].denoiser()} if cls.needs_teacher else {}))
            if not built.rollouts:
                return {}
            store = self.pairs()
            return {"flags": ["--trajectories", store["path"]], "teacher_calls": store["teacher_calls"],
                    "seconds": store["seconds"], "path": store["path"]}

        pairs_key = {"n": self.budget.pairs, "seed": self.seed, **PAIRS}
        record, run = self.train_stage("mnist", method, self.mnist_args(method, "RUN"),
                                       {"teacher": self.teacher_key(), "pairs": pairs_key}, probe)
        rows, loaded = {}, None
        for nfe in sorted({record["eval_nfe"], *self.budget.nfes}):
            key = digest(self.score_key(train=record["key"], nfe=nfe))
            name = f"mnist/{method}/{record['key']}/score_nfe{nfe}_{key}.json"
            found = self.stages.load(name, key)
            if found is None:
                if loaded is None:
                    loaded = load_run(run, self.device)
                from runs.make_pairs import shape_of
                config, objective = loaded
                shape, classes = shape_of(config)
                try:
                    samples, rate = generate_samples(objective, {}, nfe, self.budget.n, shape,
                                                     config["train"]["conditional"], classes, self.device, self.seed)
                except ValueError as e:  # generate does not take this NFE
                    if nfe == record["eval_nfe"]:
                        raise
                    found = self.stages.save(name, key, {"unsupported": first_line(e)})
                else:
                    found = self.stages.save(name, key, {**self.scores(samples), "images_per_sec": round(rate, 1)})
                    print(f"{method} at {nfe} NFE: MNIST-FID {found['fid_mnist']}", flush=True)
            if "unsupported" not in found:
                rows[nfe] = {k: found[k] for k in ("fid_mnist", "fid_mnist_std", "precision", "recall", "classes_covered",
                                                   "images_per_sec")}
        return rows, record

    # -- the 64-d mixture ------------------------------------------------------------------------------------------
    def mixture(self):
        """(teacher, z, reference): bench_distill's exact mixture teacher, held-out noises and the exact map."""
        def build():
            from data.mixtures import GaussianMixtureData
            from models.analytic import GaussianMixtureDenoiser
            from solvers.reference import reference_solution
            data = GaussianMixtureData(dim=64, components=8, n=20000, image_shape=[1, 8, 8])
            teacher = GaussianMixtureDenoiser.from_data(data).to(self.device)
            z = torch.randn([self.budget.n_eval, 1, 8, 8], generator=torch.Generator().manual_seed(10_000 + self.seed),
                            dtype=torch.float64).to(self.device)
            return teacher, z, reference_solution(teacher, z * 80.0, 80.0)[0][-1]
        return self.lazy("mixture", build)

    def mixture_key(self, **extra):
        return {"n_eval": self.budget.n_eval, "seed": self.seed, "data": MIXTURE_DATA, **extra}

    def teacher_map_errors(self, nfes):
        """{nfe: {solver: RMSE}} of the exact mixture teacher."""
        key = digest(self.mixture_key(nfes=sorted(nfes), solvers=TEACHER_SOLVERS))
        name = f"mixture/teacher/{key}.json"
        found = self.stages.load(name, key)
        if found is None:
            teacher, z, reference = self.mixture()
            errors = teacher_errors(teacher, z, reference, sorted(nfes))
            found = self.stages.save(name, key, {"errors": {str(nfe): {s: round(e, 5) for s, e in per.items()}
                                                            for nfe, (_, _, per) in errors.items()}})
        return {int(nfe): per for nfe, per in found["errors"].items()}

    def mixture_method(self, method):
        """{nfe: map RMSE} of one method trained on the mixture."""
        objective, backbone, extra = method_spec(method)
        b = self.budget
        args = ["--objective", objective, "--backbone", backbone or "unet", *MIXTURE_DATA[:2], "--out", "RUN",
                *MIXTURE_DATA[2:], *MIXTURE_NET, *extra(b.mixture_steps), f"train.steps={b.mixture_steps}",
                f"train.seed={self.seed}", f"train.device={self.device}", "train.sample_every=0",
                *(["teacher.eval_n=0"] if OBJECTIVES[objective].needs_teacher else [])]
        record, run = self.train_stage("mixture", method, args, {})
        errors, loaded = {}, None
        for nfe in sorted({record["eval_nfe"], *b.nfes}):
            key = digest(self.mixture_key(train=record["key"], nfe=nfe))
            name = f"mixture/{method}/{record['key']}/map_nfe{nfe}_{key}.json"
            found = self.stages.load(name, key)
            if found is None:
                loaded = loaded or load_run(run, self.device)
                teacher, z, reference = self.mixture()
                try:
                    with torch.inference_mode():
                        x = loaded[1].generate(z.float(), nfe, None)
                except ValueError as e:
                    if nfe == record["eval_nfe"]:
                        raise
                    found = self.stages.save(name, key, {"unsupported": first_line(e)})
                else:
                    found = self.stages.save(name, key, {"map_rmse": round(rmse(x, reference), 5)})
            if "unsupported" not in found:
                errors[nfe] = found["map_rmse"]
        return errors, record

    # -- one method, all parts -------------------------------------------------------------------------------------
    def method_rows(self, method):
        objective = method_spec(method)[0]
        mnist, record, mixture, mixture_record, errors = {}, {}, {}, {}, []
        if "mnist" in self.parts:
            try:
                mnist, record = self.mnist_method(method)
            except Exception as e:  # noqa: BLE001 - a failing method is a row, not the end of the bench
                errors.append(f"mnist: {first_line(e)}")
                if os.environ.get("FASTDIFF_DEBUG"):
                    traceback.print_exc()
        if "mixture" in self.parts and OBJECTIVES[objective].learns_teacher_map:
            try:
                mixture, mixture_record = self.mixture_method(method)
            except Exception as e:  # noqa: BLE001
                errors.append(f"mixture: {first_line(e)}")
                if os.environ.get("FASTDIFF_DEBUG"):
                    traceback.print_exc()
        common = {"method": method, "objective": objective,
                  "train_seconds": record.get("train_seconds", ""), "teacher_calls": record.get("teacher_calls", ""),
                  "train_steps": record.get("train_steps", ""),
                  "mixture_train_seconds": mixture_record.get("train_seconds", "")}
        for error in errors:
            print(f"{method}: {error}", flush=True)
        nfes = sorted(set(mnist) | set(mixture))
        if not nfes and not errors:  # nothing of it in these parts (a distribution matcher on the mixture alone)
            return []
        if not nfes:
            return [{**dict.fromkeys(COLUMNS, ""), **common, "error": "; ".join(errors) or "no NFE sampled"}]
        return [{**dict.fromkeys(COLUMNS, ""), **common, "nfe": nfe, **mnist.get(nfe, {}),
                 "map_rmse": mixture.get(nfe, ""), "error": "; ".join(errors)} for nfe in nfes]

    def teacher_rows(self, nfes):
        """Heun 35 and euler / dpmpp_2m at each of `nfes`, with the mixture teacher's map error at the same."""
        grid = [("heun", 35)] + [(s, n) for n in sorted(nfes) if n != 35 for s in ("euler", "dpmpp_2m")]
        maps = self.teacher_map_errors({n for _, n in grid}) if "mixture" in self.parts else {}
        rows = []
        for solver, nfe in grid:
            row = {**dict.fromkeys(COLUMNS, ""), "method": f"teacher ({solver})", "objective": "teacher", "nfe": nfe,
                   "map_rmse": maps.get(nfe, {}).get(solver, "")}
            if "mnist" in self.parts:
                found = self.teacher_row(solver, nfe)
                row.update({k: found[k] for k in ("fid_mnist", "fid_mnist_std", "precision", "recall", "classes_covered",
                                                  "images_per_sec")})
            rows.append(row)
        return rows


def ensure_teacher(path, device):
    """The absolute path of a trained teacher: `path` when it is a file or a finished run directory; a run directory
    that does not exist is trained there first with TEACHER_ARGS (about 50 minutes on 2 CPU cores), one with a
    checkpoint short of its train.steps is resumed."""
    from runs.checkpoint import load_checkpoint
    path = Path(path)
    if path.is_file():
        return str(path.resolve())
    if path.suffix == ".pt" or (path.exists() and not path.is_dir()):
        raise FileNotFoundError(f"teacher {path} not found; pass a trained teacher (run directory or checkpoint) or a "
                                "new run directory to train one there")
    resume = (path / "checkpoint.pt").is_file()
    args = ["--resume", str(path)] if resume else [*TEACHER_ARGS, "--out", str(path), f"train.device={device}"]
    config = make_config(parse_args(args))[0]
    if not resume or load_checkpoint(path / "checkpoint.pt")["step"] < config["train"]["steps"]:
        print(f"training the MNIST teacher into {path} (python -m runs.train {' '.join(args)})", flush=True)
        train(config, path, resume=resume)
    return str(path.resolve())


def order_rows(rows):
    """Teacher rows first (Heun 35, then by NFE), then methods by the MNIST-FID at their fewest NFE (by map error
    without MNIST), each method's NFE ascending, rows with an error and no score last."""
    teacher = sorted([r for r in rows if r["objective"] == "teacher"], key=lambda r: (r["nfe"] != 35, r["nfe"]))
    methods = {}
    for r in rows:
        if r["objective"] != "teacher":
            methods.setdefault(r["method"], []).append(r)

    def rank(item):
        group = sorted(item[1], key=lambda r: (r["nfe"] == "", r["nfe"] or 0))
        scored = [r for r in group if r["fid_mnist"] != ""]
        maps = [r for r in group if r["map_rmse"] != ""]
        return (0, scored[0]["fid_mnist"]) if scored else (1, maps[0]["map_rmse"]) if maps else (2, 0)
    return teacher + [r for _, group in sorted(methods.items(), key=rank)
                      for r in sorted(group, key=lambda r: (r["nfe"] == "", r["nfe"] or 0))]


def fmt(value, digits=4):
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def leaderboard_table(rows):
    """The README-ready Markdown table of leaderboard rows (order_rows' order)."""
    lines = ["| method | NFE | MNIST-FID | precision | recall | classes | map RMSE (64-d) | images/s | train s | "
             "teacher calls | steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in order_rows(rows):
        error = r["error"].replace("|", "/")
        name = r["method"] if not error else f"{r['method']} (error: {error[:150]}{'...' if len(error) > 150 else ''})"
        fid = fmt(r["fid_mnist"]) + (f" ± {fmt(r['fid_mnist_std'])}" if r.get("fid_mnist_std", "") != "" else "")
        lines.append(f"| {name} | {fmt(r['nfe'])} | {fid} | {fmt(r['precision'], 3)} | "
                     f"{fmt(r['recall'], 3)} | {fmt(r['classes_covered'])} | {fmt(r['map_rmse'], 3)} | "
                     f"{fmt(r['images_per_sec'], 3)} | {fmt(r['train_seconds'])} | {fmt(r['teacher_calls'])} | "
                     f"{fmt(r['train_steps'])} |")
    return "\n".join(lines) + "\n"


def budget_text(s):
    b = s["budget"]
    return (f"{b['steps']} training steps at batch {b['batch_size']} per method"
            + (f", at most {b['minutes']:g} minutes each (train.minutes)" if b["minutes"] else "")
            + f" (preset `{s['preset']}`; extra settings: {', '.join(b['settings']) or 'none'}); "
            f"MNIST scores (the default feature net, runs.eval.mnist_report) from {b['n']} samples against {b['n']} "
            f"real digits, each the mean over the real splits of seeds {s['seed']}.. with its spread (±, one std); "
            f"{b['pairs']} Heun-35 teacher rollouts shared by the methods that learn from pairs; "
            f"mixture: {b['mixture_steps']} steps per method, {b['n_eval']} held-out noises; "
            f"NFE grid {', '.join(map(str, b['nfes']))} besides each method's own")


def markdown(s, stem):
    git = s["provenance"]["git"]
    where = f"MNIST (teacher {s['teacher']})" if "mnist" in s["parts"] else "the 64-d Gaussian mixture"
    lines = [f"# Leaderboard: one- and few-step methods on {where}", "",
             f"`{s['command']}`: {budget_text(s)}. Machine: {s['provenance']['device']}, torch "
             f"{s['provenance']['versions'].get('torch')}; commit {str(git.get('commit'))[:10]}"
             f"{' (uncommitted changes)' if git.get('dirty') else ''}; bench wall time {s['wall_seconds'] / 60:.1f} "
             f"minutes ({len(s['stages']['computed'])} stages computed, {len(s['stages']['reused'])} reused).", "",
             leaderboard_table(s["rows"]),
             "MNIST-FID, precision, recall and classes covered (>= 5% of samples) in the default MNIST feature net (metrics/mnist_feature_net_wide.pt); "
             "map RMSE: the same method trained briefly on the 8-component 64-d Gaussian mixture, its samples' RMSE to "
             "the exact ODE map (only for methods that learn the teacher's map; teacher rows: that solver on the exact "
             "mixture teacher). train s: MNIST training wall time; teacher calls: images through the teacher's "
             "denoiser in training. Both include the shared store of teacher rollouts for methods that learn from "
             "pairs. Teacher-free methods train from random weights on the same digits with the teacher's "
             "backbone.", ""]
    if s.get("plots"):
        lines += [f"![MNIST-FID against NFE]({stem}_fid_vs_nfe.png) ![MNIST-FID against training cost]"
                  f"({stem}_fid_vs_cost.png)", ""]
    return "\n".join(lines)


def plot(rows, out):
    """<out>_fid_vs_nfe.png and <out>_fid_vs_cost.png; False (with a one-line warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed (pip install -e '.[bench]'); plots skipped", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    scored = [r for r in rows if r["fid_mnist"] != ""]
    if not scored:
        return False
    methods = list(dict.fromkeys(r["method"] for r in order_rows(scored) if r["objective"] != "teacher"))
    cmap, markers = plt.get_cmap("tab20"), "osD^v<>pP*Xh"
    fig, ax = plt.subplots(figsize=(8, 5))
    teacher = {}
    for r in scored:
        if r["objective"] == "teacher":
            teacher[r["nfe"]] = min(teacher.get(r["nfe"], float("inf")), r["fid_mnist"])
    if teacher:
        ax.plot(*zip(*sorted(teacher.items())), "k--", marker="s", label="teacher (best solver)")
    for i, m in enumerate(methods):
        points = sorted((r["nfe"], r["fid_mnist"]) for r in scored if r["method"] == m)
        ax.plot(*zip(*points), "-", marker=markers[i % len(markers)], color=cmap(i % 20), label=m)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="MNIST-FID", title="MNIST-FID against NFE")
    nfes = sorted({r["nfe"] for r in scored})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(f"{out}_fid_vs_nfe.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    fewest = {}  # each method at its fewest NFE (its one-step quality, mostly)
    for r in scored:
        if r["objective"] != "teacher" and r["train_seconds"] not in ("", None):
            if r["method"] not in fewest or r["nfe"] < fewest[r["method"]]["nfe"]:
                fewest[r["method"]] = r
    for i, m in enumerate(methods):
        if m in fewest:
            r = fewest[m]
            x = max(r["train_seconds"], 0.1)
            ax.scatter(x, r["fid_mnist"], color=cmap(i % 20), marker=markers[i % len(markers)])
            ax.annotate(f"{m} ({r['nfe']})", (x, r["fid_mnist"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if 35 in teacher:
        ax.axhline(teacher[35], color="k", linestyle="--", label="teacher, Heun 35 NFE")
        ax.legend(fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="training wall time (s)",
           ylabel="MNIST-FID (at its fewest NFE, in brackets)", title="MNIST-FID against training cost")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}_fid_vs_cost.png", dpi=110)
    plt.close(fig)
    return True


def write(out, summary):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary["rows"] = order_rows(summary["rows"])
    summary["plots"] = plot(summary["rows"], out)
    out.with_suffix(".md").write_text(markdown(summary, out.name))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary["rows"])


def run_leaderboard(budget, methods, out, teacher="bench/mnist_teacher.pt", runs_dir="out/bench_leaderboard",
                    device="cpu", seed=0, fresh=False, parts=("mnist", "mixture"), preset="custom", command=None):
    """Measure `methods` under `budget`; the summary is rewritten after every method. Returns it."""
    tic = time.time()
    bench = Leaderboard(budget, teacher, runs_dir, device, seed, fresh, parts)
    summary = {"command": command or "run_leaderboard(...)", "preset": preset, "budget": dataclasses.asdict(budget),
               "seed": seed, "teacher": str(teacher), "parts": list(parts), "methods": list(methods),
               "provenance": provenance(device, seed), "rows": [], "stages": {"computed": [], "reused": []}}

    def save(rows):
        summary.update(rows=rows, wall_seconds=round(time.time() - tic, 1),
                       stages={"computed": bench.stages.computed, "reused": bench.stages.reused})
        write(out, summary)

    teacher_rows = bench.teacher_rows(budget.nfes)
    student_rows = []
    for method in methods:
        student_rows += bench.method_rows(method)
        save(teacher_rows + student_rows)
    extra = {r["nfe"] for r in student_rows if r["nfe"] != ""} - set(budget.nfes)
    teacher_rows = bench.teacher_rows(sorted(set(budget.nfes) | extra))
    save(teacher_rows + student_rows)
    print(f"leaderboard: {len(bench.stages.computed)} stages computed, {len(bench.stages.reused)} reused, "
          f"{summary['wall_seconds'] / 60:.1f} minutes; wrote {Path(out).with_suffix('.md')}", flush=True)
    return summary


def comma_list(text, kind=str):
    return tuple(kind(item) for item in text.split(",") if item.strip())


def main(argv=None):
    p = ArgumentParser(prog="python -m runs.bench leaderboard", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="the budget (default tiny: minutes)")
    p.add_argument("--methods", help="comma-separated (default: every discovered method)")
    p.add_argument("--parts", default="mnist,mixture", help="comma-separated: mnist, mixture")
    p.add_argument("--steps", type=positive_int, help="training steps per method (MNIST)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--minutes", type=non_negative_float, help="train.minutes per method (0: none)")
    p.add_argument("--n", type=positive_int, help="MNIST samples per score")
    p.add_argument("--pairs", type=positive_int, help="teacher rollouts in the shared store")
    p.add_argument("--mixture-steps", type=positive_int)
    p.add_argument("--n-eval", type=positive_int, help="held-out noises on the mixture")
    p.add_argument("--nfes", help="comma-separated NFE grid, e.g. 1,2,4")
    p.add_argument("--set", nargs="*", metavar="SECTION.KEY=VALUE", help="settings for every MNIST student run "
                   "(replace the preset's)")
    p.add_argument("--teacher", default="bench/mnist_teacher.pt",
                   help="trained MNIST teacher; a run directory that does not exist is trained there first")
    p.add_argument("--out", help="default: bench/leaderboard_mnist (bench/leaderboard_mnist_<preset> for others)")
    p.add_argument("--runs-dir", default="out/bench_leaderboard", help="the cached stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore cached stages and measure everything again")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    with cli_errors():
        known = known_methods()
        methods = list(comma_list(args.methods)) if args.methods else discover()
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
        parts = comma_list(args.parts)
        if not parts or set(parts) - {"mnist", "mixture"}:
            raise ValueError(f"--parts takes mnist and/or mixture, got {args.parts!r}")
        try:
            nfes = comma_list(args.nfes, int) if args.nfes else None
        except ValueError:
            raise ValueError(f"--nfes takes comma-separated integers >= 1, got {args.nfes!r}") from None
        if nfes is not None and (not nfes or min(nfes) < 1):
            raise ValueError(f"--nfes takes comma-separated integers >= 1, got {args.nfes!r}")
        given = {"steps": args.steps, "batch_size": args.batch_size, "minutes": args.minutes, "n": args.n,
                 "pairs": args.pairs, "mixture_steps": args.mixture_steps, "n_eval": args.n_eval, "nfes": nfes,
                 "settings": tuple(args.set) if args.set is not None else None}
        budget = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in given.items() if v is not None})
        if "mnist" in parts and budget.n > 8000:
            raise ValueError(f"--n {budget.n}: at most the 8,000 shipped digits")
        out = args.out or ("bench/leaderboard_mnist" if args.preset == "tiny" else
                           f"bench/leaderboard_mnist_{args.preset}")
        command = "python -m runs.bench leaderboard" + "".join(f" {a}" for a in (argv if argv is not None
                                                                                   else sys.argv[2:]))
        run_leaderboard(budget, methods, out, args.teacher, args.runs_dir, pick_device(args.device), args.seed,
                        args.fresh, parts, args.preset, command)
