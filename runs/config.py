"""Configuration: components picked by name, their constructor keyword arguments as their configuration.

A run's configuration has five sections (six with a teacher). `backbone`, `objective` and `data` each hold a registry
`name` plus that component's keyword arguments; `train` holds the loop's `TrainSettings`; `optim` holds per-role
optimisation settings (`optim.<role>.<key>`, `RoleSettings`: the objective's declared defaults over train.*, the
user's values over both); objectives that need a teacher add `teacher` (`runs.teacher.TeacherSettings`: a trained
run's path, or which analytic teacher to fit). Sources merge in this order: defaults, a YAML
preset (`--config`), the name flags (`--backbone` ...), then dotted overrides (`backbone.model_channels=64`).
`resolve` fills every default from the constructors' signatures and rejects unknown keys and values of the wrong type
or range (one line naming the key and what it accepts), so the saved config is complete and a later `runs.sample` or
`--teacher` rebuilds exactly the same run.
"""
import dataclasses
import inspect
from pathlib import Path

import yaml

from data import DATASETS
from models import BACKBONES
from objectives import OBJECTIVES, pick

SECTIONS = ("backbone", "objective", "data", "train", "optim", "teacher")
REGISTRIES = {"backbone": BACKBONES, "objective": OBJECTIVES, "data": DATASETS}
INJECTED = {"backbone", "teacher", "dataset"}  # objective arguments the loop supplies, never configured


@dataclasses.dataclass
class TrainSettings:
    """The training loop's own settings (`train.*`). The defaults are sized for a 2-core CPU (every objective's
    default run finishes in minutes there); the papers' scale lives in the presets under runs/configs/."""
    steps: int = 500
    batch_size: int = 16               # the global batch (all processes, all micro-batches)
    micro_batch: int = 0               # per-process micro-batch for gradient accumulation; 0: no accumulation
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100            # linear LR warm-up (EDM: lr_rampup_kimg)
    lr_decay: str = "none"             # "none" or "cosine" (to zero at `steps`)
    grad_clip: float = 1.0             # max global grad norm per role; 0 disables
    ema_halflife_kimg: float = 500.0   # EDM's EMA half-life in thousands of images
    ema_rampup: float = 0.05           # EDM's EMA ramp-up ratio; null disables
    seed: int = 0
    conditional: bool = False          # condition on the data's class labels
    amp: str = "auto"                  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16" or "none"
    compile: bool = False              # torch.compile each trainable network (or a backend name, e.g. "eager")
    device: str = "auto"               # "auto", "cpu", "cuda", "cuda:1", ...
    num_workers: int = 0
    log_every: int = 100
    ckpt_every: int = 500              # a checkpoint every this many steps ...
    ckpt_minutes: float = 5.0          # ... and every this many minutes of wall time (0: by step only)
    minutes: float = 0.0               # a training-time budget: stop (and checkpoint) once this many minutes of
                                       # training have passed, before train.steps if need be (0: no budget)
    sample_every: int = 2000           # PNG grid of samples; 0 disables
    sample_nfe: int = 35
    sample_grid: int = 64


# What each train.* value accepts beyond its type: (check, description).
TRAIN_RANGES = {
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "micro_batch": (lambda v: v >= 0, "an integer >= 0 (0: no accumulation)"),
    "lr": (lambda v: v >= 0, "a number >= 0"),
    "betas": (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "lr_decay": (lambda v: v in ("none", "cosine"), "one of: none, cosine"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 disables)"),
    "ema_halflife_kimg": (lambda v: v > 0, "a number > 0"),
    "ema_rampup": (lambda v: v is None or v > 0, "a number > 0, or null"),
    "amp": (lambda v: v in ("auto", "bf16", "fp16", "none"), "one of: auto, bf16, fp16, none"),
    "compile": (lambda v: isinstance(v, (bool, str)), "true, false or a torch.compile backend name"),
    "num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
    "ckpt_every": (lambda v: v >= 1, "an integer >= 1"),
    "ckpt_minutes": (lambda v: v >= 0, "a number >= 0 (0: by step only)"),
    "minutes": (lambda v: v >= 0, "a number >= 0 (0: no time budget)"),
    "sample_every": (lambda v: v >= 0, "an integer >= 0 (0 disables)"),
    "sample_nfe": (lambda v: v >= 1, "an integer >= 1"),
    "sample_grid": (lambda v: v >= 1, "an integer >= 1"),
}


@dataclasses.dataclass
class RoleSettings:
    """How the loop optimises one role (`optim.<role>.*`). None means: take train.* (lr, betas, weight_decay,
    warmup_steps, grad_clip, ema_halflife_kimg)."""
    optimizer: str = "adam"            # "adam", "adamw" or "radam"
    lr: float = None
    betas: tuple = None
    weight_decay: float = None
    warmup_steps: int = None
    grad_clip: float = None
    ema: bool = True                   # keep an EMA of this role (sampling uses it); false: sample the raw weights
    ema_halflife_kimg: float = None


OPTIMIZERS = ("adam", "adamw", "radam")
ROLE_RANGES = {"optimizer": (lambda v: v in OPTIMIZERS, "one of: " + ", ".join(OPTIMIZERS)),
               **{k: TRAIN_RANGES[k] for k in ("lr", "betas", "weight_decay", "warmup_steps", "grad_clip",
                                               "ema_halflife_kimg")}}


def checked(value, default, key, accepts=None, annotation=None):
    """`value` for the setting `key` if it has the default's type (an int where a float goes is fine; an integral
    float such as 1e4 where an int goes is taken as that int) and passes `accepts` = (check, description); else a
    one-line ValueError naming the key and what it accepts. A default of None (or a required argument) takes
    anything; a value of None is taken only where the default is None."""
    kind = annotation if annotation is not None else type(default)
    if default is inspect.Parameter.empty or (default is None and annotation is None):
        return value
    if value is None:
        if default is None or (accepts and accepts[0](None)):
            return None
        raise ValueError(f"{key}=null is not accepted; it takes {describe(kind, accepts)}")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind in (tuple, list):
        ok = isinstance(value, (list, tuple))
    elif kind is str:
        ok = isinstance(value, str) or (accepts is not None and _accepted(accepts, value))
    else:
        ok = True
    if not ok or (accepts is not None and not _accepted(accepts, value)):
        raise ValueError(f"{key}={value!r} is not accepted; it takes {describe(kind, accepts)}")
    return value


def _accepted(accepts, value):
    try:
        return bool(accepts[0](value))
    except TypeError:
        return False


def describe(kind, accepts):
    if accepts is not None:
        return accepts[1]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", list: "a list"}.get(kind, f"a {kind.__name__}")


def parse_value(text):
    """A command-line value as YAML would read it: 3 -> int, 1e-3 -> float, [1,2] -> list, true -> bool."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _is_float(value):
        return float(value)
    return value


def _is_float(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_overrides(items):
    """["backbone.model_channels=64", "optim.fake_score.lr=1e-4", ...] ->
    {"backbone": {"model_channels": 64}, "optim": {"fake_score": {"lr": 1e-4}}}."""
    config = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise ValueError(f"override {item!r} is not of the form section.key=value (sections: {', '.join(SECTIONS)})")
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if section == "optim":
            role, dot, key = name.partition(".")
            if not dot or not key:
                raise ValueError(f"override {item!r} is not of the form optim.<role>.<key>=value")
            config.setdefault("optim", {}).setdefault(role, {})[key] = parse_value(value)
        else:
            config.setdefault(section, {})[name] = parse_value(value)
    return config


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object that safe_load refuses
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path} is not a valid config file{line}: {problem}") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ValueError(f"{path}: a config is a mapping of sections ({', '.join(SECTIONS)}) to mappings")
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    return config


def merge(*configs):
    """Section-wise merge; later configs win key by key."""
    out = {}
    for config in configs:
        for section, values in config.items():
            if section == "optim":  # role by role, key by key
                for role, settings in (values or {}).items():
                    out.setdefault("optim", {}).setdefault(role, {}).update(settings or {})
            else:
                out.setdefault(section, {}).update(values or {})
    return out


def constructor_defaults(component, what):
    """The keyword arguments `component` takes, with their defaults (inspect.Parameter.empty when required)."""
    params = inspect.signature(component).parameters
    return {k: p.default for k, p in params.items()
            if k not in INJECTED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def widened_annotation(component, key):
    """`object` (any value; the constructor checks it) for an argument annotated with a union such as `int | list`,
    whose default's type alone would refuse the other kind; else None (checked against the default's type)."""
    annotation = inspect.signature(component).parameters[key].annotation
    return object if annotation is not inspect.Parameter.empty and not isinstance(annotation, type) else None


def plain(value):
    """Tuples as lists, so the config round-trips through YAML."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def resolve_component(section, values):
    values = dict(values)
    if "name" not in values:
        raise ValueError(f"no {section} chosen: pass --{section} NAME (known: {', '.join(sorted(REGISTRIES[section]))})")
    name = values.pop("name")
    component = pick(REGISTRIES[section], name, section)
    defaults = constructor_defaults(component, section)
    unknown = set(values) - set(defaults)
    if unknown:
        raise ValueError(f"{section} {name!r} takes no argument(s) {', '.join(sorted(unknown))}; "
                         f"it takes: {', '.join(defaults) or 'none'}")
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in values]
    if missing:
        raise ValueError(f"{section} {name!r} needs {', '.join(missing)} (set {section}.{missing[0]}=...)")
    given = {k: checked(v, defaults[k], f"{section}.{k}", annotation=widened_annotation(component, k))
             for k, v in values.items()}
    return {"name": name, **{k: plain(given.get(k, v)) for k, v in defaults.items()}}


def resolve_settings(values, settings_class, ranges, where):
    """A settings dataclass's values, every default filled in, each given value checked against its field's type
    and `ranges`."""
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where} takes no setting(s) {', '.join(sorted(unknown))}; it takes: {', '.join(fields)}")
    annotations = {"compile": object, "ema_rampup": float}  # compile: a bool or a backend name
    out = {}
    for key, field in fields.items():
        if key in values:
            annotation = annotations.get(key, field.type if isinstance(field.type, type) else None)
            out[key] = plain(checked(values[key], field.default, f"{where}.{key}", ranges.get(key), annotation))
        else:
            out[key] = plain(field.default)
    return out


def resolve_train(values):
    return resolve_settings(values, TrainSettings, TRAIN_RANGES, "train")


def resolve_optim(values):
    """The `optim` section as given: {role: {key: value}}, keys and values checked (role names are checked against
    the objective's roles once it is built, by `role_settings`)."""
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ValueError("optim is a mapping of role names to settings, e.g. optim.fake_score.lr=1e-4")
    out = {}
    for role, settings in values.items():
        given = resolve_settings(settings, RoleSettings, ROLE_RANGES, f"optim.{role}")
        out[role] = {k: v for k, v in given.items() if k in settings}
    return out


def role_settings(objective, train, optim):
    """{role: complete RoleSettings values} for every role of a built objective: train.* values, then the
    objective's declared `optimizer_settings()`, then the user's `optim` section. A role named in settings that the
    objective does not have is a ValueError."""
    roles = list(objective.networks)
    for source, settings in (("optim", optim), (f"{type(objective).__name__}.optimizer_settings()",
                                                 objective.optimizer_settings())):
        unknown = sorted(set(settings) - set(roles))
        if unknown:
            raise ValueError(f"{source} names role(s) {', '.join(unknown)} that objective "
                             f"{type(objective).__name__} does not have; its roles: {', '.join(roles)}")
    out = {}
    for role in roles:
        values = {k: train[k] for k in ("lr", "betas", "weight_decay", "warmup_steps", "grad_clip",
                                        "ema_halflife_kimg")}
        values.update(resolve_optim({role: objective.optimizer_settings().get(role, {})})[role])
        values.update(optim.get(role, {}))
        out[role] = resolve_settings(values, RoleSettings, ROLE_RANGES, f"optim.{role}")
    return out


def resolve_teacher(values, objective_name):
    """The `teacher` section, present exactly when the objective needs a teacher."""
    from runs.teacher import TeacherSettings
    needs = OBJECTIVES[objective_name].needs_teacher
    if not needs:
        if any(v is not None for v in values.values()):
            raise ValueError(f"objective {objective_name!r} takes no teacher; drop --teacher / teacher.* settings")
        return None
    return resolve_settings(values, TeacherSettings, {}, "teacher")


def resolve(config):
    """A complete, validated config: every component's every argument, defaults filled in."""
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    resolved = {s: resolve_component(s, config.get(s, {})) for s in ("backbone", "objective", "data")}
    resolved["train"] = resolve_train(config.get("train", {}))
    resolved["optim"] = resolve_optim(config.get("optim", {}))
    if resolved["objective"].get("total_steps", 0) is None:  # a curriculum's length K (ct, ict): the run's steps
        resolved["objective"]["total_steps"] = resolved["train"]["steps"]
    teacher = resolve_teacher(config.get("teacher", {}), resolved["objective"]["name"])
    if teacher is not None:
        resolved["teacher"] = teacher
    return resolved


def kwargs(section_config):
    """A resolved section without its `name`: the constructor's keyword arguments."""
    return {k: v for k, v in section_config.items() if k != "name"}


def save_yaml(config, path):
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
