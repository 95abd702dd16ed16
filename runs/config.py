"""Configuration: components picked by name, their constructor keyword arguments as their configuration.

A run's configuration has four sections (five with a teacher). `backbone`, `objective` and `data` each hold a registry `name` plus that
component's keyword arguments; `train` holds the loop's `TrainSettings`; objectives that need a teacher add a fifth,
`teacher` (`runs.teacher.TeacherSettings`: a trained run's path, or which analytic teacher to fit). Sources merge in this order: defaults, a YAML
preset (`--config`), the name flags (`--backbone` ...), then dotted overrides (`backbone.model_channels=64`).
`resolve` fills every default from the constructors' signatures and rejects unknown keys, so the saved config is
complete and a later `runs.sample` or `--teacher` rebuilds exactly the same run.
"""
import dataclasses
import inspect
from pathlib import Path

import yaml

from data import DATASETS
from models import BACKBONES
from objectives import OBJECTIVES, pick

SECTIONS = ("backbone", "objective", "data", "train", "teacher")
REGISTRIES = {"backbone": BACKBONES, "objective": OBJECTIVES, "data": DATASETS}
INJECTED = {"backbone", "teacher", "dataset"}  # objective arguments the loop supplies, never configured


@dataclasses.dataclass
class TrainSettings:
    """The training loop's own settings (`train.*`)."""
    steps: int = 20000
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 500            # linear LR warm-up (EDM: lr_rampup_kimg)
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
    ckpt_every: int = 1000
    sample_every: int = 2000           # PNG grid of samples; 0 disables
    sample_nfe: int = 35
    sample_grid: int = 64


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
    """["backbone.model_channels=64", ...] -> {"backbone": {"model_channels": 64}}."""
    config = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise ValueError(f"override {item!r} is not of the form section.key=value (sections: {', '.join(SECTIONS)})")
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        config.setdefault(section, {})[name] = parse_value(value)
    return config


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
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
            out.setdefault(section, {}).update(values or {})
    return out


def constructor_defaults(component, what):
    """The keyword arguments `component` takes, with their defaults (inspect.Parameter.empty when required)."""
    params = inspect.signature(component).parameters
    return {k: p.default for k, p in params.items()
            if k not in INJECTED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


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
    return {"name": name, **{k: plain(values.get(k, v)) for k, v in defaults.items()}}


def resolve_train(values):
    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"train takes no setting(s) {', '.join(sorted(unknown))}; it takes: {', '.join(fields)}")
    return {k: plain(values.get(k, v)) for k, v in fields.items()}


def resolve_teacher(values, objective_name):
    """The `teacher` section, present exactly when the objective needs a teacher."""
    from runs.teacher import TeacherSettings
    needs = getattr(OBJECTIVES[objective_name], "needs_teacher", False)
    if not needs:
        if any(v is not None for v in values.values()):
            raise ValueError(f"objective {objective_name!r} takes no teacher; drop --teacher / teacher.* settings")
        return None
    fields = {f.name: f.default for f in dataclasses.fields(TeacherSettings)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"teacher takes no setting(s) {', '.join(sorted(unknown))}; it takes: {', '.join(fields)}")
    return {k: plain(values.get(k, v)) for k, v in fields.items()}


def resolve(config):
    """A complete, validated config: every component's every argument, defaults filled in."""
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    resolved = {s: resolve_component(s, config.get(s, {})) for s in ("backbone", "objective", "data")}
    resolved["train"] = resolve_train(config.get("train", {}))
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
