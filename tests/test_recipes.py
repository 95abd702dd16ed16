"""The paper recipes under runs/configs/: every file resolves through the real config machinery (a typo in any key or
name fails), documents its paper and command, and runs its first training step on the CPU at tiny size.

The run test takes each recipe as a user would (`runs.train --config RECIPE [--teacher RUN] overrides`) and shrinks
only what sets the cost: the backbone's width and depth, the batch (2), the number of steps (1), the number of teacher
rollouts and their solver's NFE, and the end-of-run quality report (off). Every method constant of the recipe stays as
written. The data are tiny stand-ins in the formats the loaders read: a CIFAR-10 "python version" folder (pickled
batches, as data/cifar.py reads them) and, for the ImageNet-64 recipes (`imagefolder` at 64 px: the project has no
ImageNet-64 loader of its own), a folder of PNG and JPEG images of assorted sizes with one subfolder per class.
Students get a teacher trained for one step from the matching teacher recipe, shared across the module. Perceptual
networks are swapped for randomly initialised ones of the same kind (LPIPS's VGG, the DINOv2 discriminator, at 56
instead of 224 px), since their pretrained weights are not part of the test environment.
"""
import functools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from objectives import OBJECTIVES
from objectives import distances
from runs.checkpoint import load_checkpoint
from runs.config import constructor_defaults, load_yaml, merge, resolve
from runs.train import make_config, parse_args, train

CONFIGS = Path(__file__).resolve().parents[1] / "runs" / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
DEFAULTS = {"backbone": {"name": "unet"}, "objective": {"name": "dsm"}, "data": {"name": "mnist"}}  # as runs.train

TINY_BACKBONE = ["backbone.model_channels=8", "backbone.channel_mult=[1,1]", "backbone.num_blocks=1",
                 "backbone.attn_resolutions=[]"]
TINY_TRAIN = ["train.steps=1", "train.batch_size=2", "train.micro_batch=0", "train.device=cpu", "train.amp=none",
              "train.compile=false", "train.num_workers=0", "train.sample_every=0", "train.log_every=1",
              "train.ckpt_every=1", "train.ckpt_minutes=0", "train.minutes=0"]
TEACHER_RECIPES = {"cifar10": "cifar10_teacher.yaml", "imagefolder": "imagenet64_teacher.yaml"}
STAGE_ONE = {"guidance_progressive": "cifar10_guidance_distill.yaml"}  # students whose teacher is another student
# runs/configs/mnist_teacher.yaml is trained (shrunk) by tests/test_cli.py's tiny_run; the others run here
RUN_RECIPES = [r for r in RECIPES if r.name != "mnist_teacher.yaml"]


def recipe_config(path):
    return load_yaml(path)


def objective_class(config):
    return OBJECTIVES[config["objective"]["name"]]


def is_conditional(config):
    return bool(config.get("train", {}).get("conditional")) or objective_class(config).needs_labels


# -- documentation and resolution: cheap, for every file


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_with_every_key_known(recipe):
    """The file resolves with runs.train's defaults beneath it: every key is a constructor argument or setting with
    a value of the right type, and every name is registered."""
    config = recipe_config(recipe)
    assert config["objective"]["name"] in OBJECTIVES
    resolved = resolve(merge(DEFAULTS, config))
    for section in ("backbone", "objective", "data"):
        for key, value in config.get(section, {}).items():
            assert key in resolved[section], f"{recipe.name}: {section}.{key} was dropped"
    assert ("teacher" in resolved) == bool(objective_class(config).needs_teacher)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_typo_in_any_recipe_section_fails(recipe):
    config = recipe_config(recipe)
    for section in ("backbone", "objective", "data", "train", "teacher"):
        if section == "teacher" and not objective_class(config).needs_teacher:
            continue
        broken = merge(DEFAULTS, config, {section: {"learning_rat": 1}})
        with pytest.raises(ValueError, match="learning_rat"):
            resolve(broken)
    broken = merge(DEFAULTS, config, {"optim": {"student": {"learning_rat": 1}}})
    with pytest.raises(ValueError, match="learning_rat"):
        resolve(broken)
    broken = merge(DEFAULTS, config, {"objective": {"name": config["objective"]["name"] + "x"}})
    with pytest.raises(ValueError, match=config["objective"]["name"] + "x"):
        resolve(broken)
    with pytest.raises(ValueError, match="trian"):
        resolve({**merge(DEFAULTS, config), "trian": {}})


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem.startswith(("cifar10_", "imagenet64_"))],
                         ids=lambda p: p.stem)
def test_recipe_documents_its_paper_fid_and_command(recipe):
    """A recipe opens with comments that name the paper's FID (or say there is none) and give the command line."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert len(header) >= 5, f"{recipe.name}: the header comment is missing"
    assert "FID" in text, f"{recipe.name}: the header does not state the paper's FID (or that there is none)"
    assert "-m runs.train --config runs/configs/" + recipe.name in text, f"{recipe.name}: no command line"
    if objective_class(recipe_config(recipe)).needs_teacher:
        assert "--teacher" in text, f"{recipe.name}: the command does not name the teacher"


def test_readme_lists_every_recipe():
    readme = (CONFIGS / "README.md").read_text()
    missing = [r.name for r in RECIPES if r.name not in readme]
    assert not missing, f"runs/configs/README.md does not list {missing}"


def test_every_registered_method_has_a_cifar10_recipe():
    """Objectives added later get a recipe too (or are listed here with the reason they have none)."""
    without = {"dsm": "the teachers: cifar10_teacher.yaml, imagenet64_teacher.yaml"}
    named = {recipe_config(r)["objective"]["name"] for r in RECIPES if r.stem.startswith("cifar10_")}
    missing = sorted(set(OBJECTIVES) - named - set(without))
    assert not missing, f"no runs/configs/cifar10_<method>.yaml for {missing}"


# -- tiny data in the loaders' formats


def write_cifar(root, per_batch=8, seed=0):
    """A CIFAR-10 "python version" folder: data_batch_1..5 and test_batch, pickled dicts of uint8 [N, 3072] and
    labels, as the original files (read by data/cifar.py's restricted unpickler)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": f"fake batch {i}".encode(), b"data": rng.integers(0, 256, (per_batch, 3072), np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def write_image_folder(root, classes=4, per_class=6, seed=0):
    """An ImageNet-style training folder: one subfolder per class (synset-like names) of RGB images of assorted,
    non-square sizes, which `imagefolder` resizes and centre-crops to 64 px."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = int(rng.integers(64, 96)), int(rng.integers(64, 112))
            pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.{'png' if i % 2 else 'jpeg'}")
    return root


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_data")
    return {"cifar10": write_cifar(root / "cifar"), "imagefolder": write_image_folder(root / "imagenet64")}


# -- pretrained perceptual networks replaced by random ones of the same architecture


@functools.lru_cache(maxsize=None)
def random_lpips(**kwargs):
    return distances.LPIPS(random_init=True, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def random_perceptual_networks():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(distances.DISTANCES, "lpips", lambda **kwargs: random_lpips(**kwargs))
        yield


# -- running a recipe


def tiny_overrides(config, data_paths):
    """What the run test changes in a recipe: sizes only (see the module docstring)."""
    overrides = TINY_BACKBONE + TINY_TRAIN
    data = config["data"]["name"]
    if data in data_paths:
        overrides.append(f"data.path={data_paths[data]}")
    objective = config["objective"]
    takes = constructor_defaults(objective_class(config), "objective")
    # teacher rollouts: two, on a short grid (Heun at 7 NFE: 4 steps, room for K = 4), or the recipe's own grid when
    # it lists the sigmas to save (they must snap to distinct states of it)
    short = "" if isinstance(objective.get("save_sigmas"), list) else "=7"
    for count, nfe in (("n", "nfe"), ("rollout_n", "rollout_nfe")):
        if count in takes and nfe in takes:
            overrides += [f"objective.{count}=2"] + ([f"objective.{nfe}{short}"] if short else [])
    if objective.get("discriminator") == "dino":  # random ViT weights, 56 px instead of 224
        args = {**(objective.get("disc_args") or {}), "weights": "random", "img_size": 56}
        overrides.append("objective.disc_args=" + json.dumps(args))
    if objective_class(config).needs_teacher:
        overrides.append("teacher.eval_n=0")
    return overrides


def run_recipe(recipe, run_dir, data_paths, teacher=None, extra=()):
    """Train `recipe` through runs.train's own parsing, shrunk; returns the resolved config."""
    config = recipe_config(recipe)
    argv = ["--config", str(recipe), *(["--teacher", str(teacher)] if teacher else []),
            *tiny_overrides(config, data_paths), *extra]
    resolved, dataset = make_config(parse_args(argv))
    train(resolved, run_dir, dataset=dataset)
    return resolved


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, data_paths):
    """teacher_for(recipe config) -> a run directory: the matching teacher recipe trained for one tiny step
    (conditional ones with 10% label dropout, so that guidance works), or a stage-one student for the students of
    STAGE_ONE. Built on first use and shared."""
    root = tmp_path_factory.mktemp("recipe_teachers")
    cache = {}

    def dsm_teacher(data, conditional):
        key = (data, conditional)
        if key not in cache:
            extra = ["train.conditional=true", "backbone.label_dropout=0.1"] if conditional else []
            run_dir = root / f"{data}_{'cond' if conditional else 'uncond'}"
            run_recipe(CONFIGS / TEACHER_RECIPES[data], run_dir, data_paths, extra=extra)
            cache[key] = run_dir
        return cache[key]

    def teacher_for(config):
        name = config["objective"]["name"]
        data, conditional = config["data"]["name"], is_conditional(config)
        if name in STAGE_ONE:
            if name not in cache:
                stage_one = CONFIGS / STAGE_ONE[name]
                cache[name] = root / name
                run_recipe(stage_one, cache[name], data_paths, teacher=teacher_for(recipe_config(stage_one)))
            return cache[name]
        return dsm_teacher(data, conditional)

    teacher_for.dsm = dsm_teacher
    return teacher_for


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=lambda p: p.stem)
def test_recipe_first_step_runs_on_cpu(recipe, tmp_path, data_paths, teachers):
    config = recipe_config(recipe)
    data = config["data"]["name"]
    if recipe.name == TEACHER_RECIPES.get(data) and not is_conditional(config):
        run_dir = teachers.dsm(data, False)  # the students' teacher is this recipe's run: not trained twice
    else:
        teacher = teachers(config) if objective_class(config).needs_teacher else None
        run_dir = tmp_path / recipe.stem
        run_recipe(recipe, run_dir, data_paths, teacher=teacher)

    state = load_checkpoint(run_dir / "checkpoint.pt")  # weights_only
    resolved = state["config"]
    assert state["step"] == 1
    assert set(state["networks"]) == set(resolved["optim"]) == set(state["ema"])
    assert resolved["objective"]["name"] == config["objective"]["name"]
    for key, value in config["objective"].items():  # the method's constants are the recipe's
        if key not in ("name", "n", "nfe", "rollout_n", "rollout_nfe", "disc_args"):
            assert resolved["objective"][key] == value, f"objective.{key} changed"
    assert resolved["train"]["conditional"] == is_conditional(config)
    assert ("teacher" in resolved) == bool(objective_class(config).needs_teacher)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {k: v for k, v in records[-1].items() if k.endswith("loss")}
    assert losses, f"no loss logged: {records[-1]}"
    assert all(math.isfinite(v) for v in losses.values()), losses
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["objective"] == resolved["objective"]
