"""Build a run's components from its configuration: data set, backbone, objective."""
from data import DATASETS
from models import BACKBONES
from objectives import OBJECTIVES, pick
from runs.config import constructor_defaults, kwargs, merge, resolve, resolve_component, resolve_train


def data_derived(backbone_name, dataset, conditional):
    """The backbone arguments the data fixes: resolution, channels or dimension, and the number of classes."""
    takes = constructor_defaults(pick(BACKBONES, backbone_name, "backbone"), "backbone")
    shape = tuple(dataset.shape)
    derived = {}
    if len(shape) == 3:
        derived.update(in_channels=shape[0], img_resolution=shape[-1])
    elif len(shape) == 1:
        derived.update(dim=shape[0])
    if conditional and not dataset.num_classes:
        raise ValueError("train.conditional=true, but the data set has no class labels")
    derived["label_dim"] = dataset.num_classes if conditional else 0
    unusable = [k for k in ("in_channels", "img_resolution", "dim") if k in derived and k not in takes]
    if unusable:
        raise ValueError(f"backbone {backbone_name!r} does not take {'image' if len(shape) == 3 else 'vector'} data "
                         f"of shape {list(shape)} (it has no argument {unusable[0]!r})")
    return {k: v for k, v in derived.items() if k in takes}


def complete_config(config):
    """Resolve `config`, filling the backbone's data-dependent arguments from the data set (given values must agree).
    Returns (resolved config, dataset)."""
    config = merge(config)
    data_cfg = resolve_component("data", config.get("data", {}))
    dataset = DATASETS[data_cfg["name"]](**kwargs(data_cfg))
    backbone = config.get("backbone", {})
    conditional = resolve_train(config.get("train", {}))["conditional"]  # values checked before they are used
    for key, value in data_derived(backbone.get("name"), dataset, conditional).items():
        if key in backbone and backbone[key] != value:
            raise ValueError(f"backbone.{key}={backbone[key]} does not match the data ({value})")
        backbone[key] = value
    config["backbone"] = backbone
    return resolve(config), dataset


def build_objective(config, **injected):
    """The objective of a resolved config, its backbone built inside; `injected` adds e.g. teacher=."""
    backbone = BACKBONES[config["backbone"]["name"]](**kwargs(config["backbone"]))
    objective_cls = OBJECTIVES[config["objective"]["name"]]
    return objective_cls(backbone=backbone, **kwargs(config["objective"]), **injected)


def build_dataset(config):
    return DATASETS[config["data"]["name"]](**kwargs(config["data"]))


def load_run(path, device="cpu", ema=True, **injected):
    """(config, objective) of a finished or running run: a run directory or a checkpoint file. The networks hold the
    EMA weights unless ema=False, are on `device`, in eval mode and frozen.

    A student is rebuilt with its teacher, as in training: the one its checkpoint records (runs.teacher.teacher_record:
    an analytic teacher's saved parameters, no fitting; a trained teacher from its absolute path, checked by
    fingerprint), so this works from any directory. A checkpoint without a record (older runs) rebuilds the teacher
    from the config's settings (re-fitting an analytic one)."""
    from runs.checkpoint import load_checkpoint
    state = load_checkpoint(path)
    config = state["config"]
    if "teacher" in config and "teacher" not in injected:  # a student: rebuilt with its teacher, as in training
        from runs.teacher import load_teacher
        record = state.get("teacher")
        dataset = build_dataset(config) if record is None else None
        injected["teacher"] = load_teacher(config["teacher"], dataset, config["train"]["conditional"], device,
                                           record=record, run=path)[0]
    objective = build_objective(config, **injected).to(device)
    objective.load_state_dict(state.get("objective", {}))
    weights = state["ema" if ema else "networks"]
    for role, net in objective.networks.items():
        if role not in weights:
            raise ValueError(f"{path}: checkpoint has no weights for role {role!r} (it has {', '.join(weights)})")
        net.load_state_dict(weights[role])
        net.to(device).eval().requires_grad_(False)
    return config, objective
