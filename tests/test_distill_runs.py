"""Trajectory distillation end to end, through the command line and the training loop: every distillation objective
trains with an analytic teacher fitted automatically, students start from a trained teacher (--teacher), stores made
by runs.make_pairs are used and checked (--trajectories), runs resume exactly, finished students sample and reload,
and a NaN loss stops with the last good checkpoint kept."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from data.mixtures import GaussianMixtureData
from data.trajectories import fingerprint
from models.analytic import GaussianMixtureDenoiser
from objectives.kd import KD
from runs import make_pairs
from runs.build import build_objective, load_run
from runs.checkpoint import load_checkpoint
from runs.teacher import load_teacher
from runs.train import main, make_config, parse_args, train

# 2-D mixture with a tiny MLP; the same mixture family served as 8x8 images for unet / fno
VECTOR = ["data.n=512", "backbone.hidden=32", "train.batch_size=32", "teacher.eval_n=32", "train.device=cpu",
          "train.sample_every=0"]
IMAGE = ["data.dim=64", "data.image_shape=[1,8,8]", "data.n=512", "backbone.model_channels=8",
         "backbone.channel_mult=[1,2]", "backbone.num_blocks=1", "backbone.attn_resolutions=[]",
         "train.batch_size=32", "teacher.eval_n=32", "train.device=cpu", "train.sample_every=0"]
STUDENT = ["train.steps=2", "train.batch_size=32", "teacher.eval_n=16", "train.device=cpu", "train.sample_every=0",
           "objective.n=64"]
PROGRESSIVE = ["objective.start_steps=4", "objective.steps_per_stage=2", "objective.final_stages_factor=1"]

OBJECTIVES = {  # name: (flags, overrides, learns from rollouts)
    "kd": (["--backbone", "mlp", "--objective", "kd"], VECTOR + ["objective.n=256", "objective.nfe=5"], True),
    "progressive": (["--backbone", "mlp", "--objective", "progressive"], VECTOR + PROGRESSIVE, False),
    "reflow": (["--backbone", "mlp", "--objective", "reflow"],
               VECTOR + ["objective.rollout_n=256", "objective.rollout_nfe=5"], True),
    "reflow_distill": (["--backbone", "mlp", "--objective", "reflow"],
                       VECTOR + ["objective.mode=distill", "objective.rollout_n=256", "objective.rollout_nfe=5"], True),
    "boot": (["--backbone", "mlp", "--objective", "boot"], VECTOR + ["objective.num_steps=8"], False),
    "cd": (["--backbone", "mlp", "--objective", "cd"], VECTOR + ["objective.num_levels=6"], False),
    "ect": (["--backbone", "mlp", "--objective", "ect"], VECTOR + ["objective.stage_steps=2"], False),
    "ctm": (["--backbone", "mlp", "--objective", "ctm"], VECTOR + ["objective.num_levels=6"], False),
    "scd": (["--backbone", "mlp", "--objective", "scd"], VECTOR + ["backbone.embedding=positional"], False),
    "tract": (["--backbone", "mlp", "--objective", "tract"],
              VECTOR + ["objective.steps=[4,2,1]", "objective.steps_per_phase=2"], False),
    "diff_instruct": (["--backbone", "mlp", "--objective", "diff_instruct"], VECTOR, False),
    "dmd": (["--backbone", "mlp", "--objective", "dmd"], VECTOR + ["objective.n=256", "objective.nfe=5"], True),
    "dmd2": (["--backbone", "mlp", "--objective", "dmd2"], VECTOR, False),
    "sid": (["--backbone", "mlp", "--objective", "sid"], VECTOR, False),
    "diffratio": (["--backbone", "mlp", "--objective", "diffratio"], VECTOR, False),
    "add": (["--backbone", "mlp", "--objective", "add"], VECTOR, False),        # discriminator auto: conv here
    "ufogen": (["--backbone", "mlp", "--objective", "ufogen"], VECTOR, False),
    # heun at NFE 7 is a grid of 4 steps: room for dsno's default K = 4 saved states
    "dsno": (["--backbone", "fno", "--objective", "dsno", "--data", "gmm"],
             IMAGE + ["objective.n=256", "objective.nfe=7"], True),
}


def config_of(flags, overrides=()):
    """The resolved config of a new run (flags before the positional overrides, as argparse wants)."""
    return make_config(parse_args([str(a) for a in [*flags, *overrides]]))[0]


def objective_config(name, *extra):
    flags, overrides, _ = OBJECTIVES[name]
    if "--data" not in flags:
        flags = flags + ["--data", "gmm"]
    return config_of(flags, overrides + list(extra))


def assert_same_tensors(a, b, what):
    assert set(a) == set(b), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_run_state(a, b):
    """Weights, EMA, Adam moments and objective state of two checkpoints are bit-identical."""
    for section in ("networks", "ema"):
        for role in a[section]:
            assert_same_tensors(a[section][role], b[section][role], f"{section}/{role}")
    for role in a["optimizers"]:
        for index, state in a["optimizers"][role]["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value),
                                   torch.as_tensor(b["optimizers"][role]["state"][index][name])), f"adam {name}"
    assert a["objective"].keys() == b["objective"].keys()
    for key, value in a["objective"].items():
        if isinstance(value, dict):
            assert_same_tensors(value, b["objective"][key], f"objective/{key}")
        else:
            assert value == b["objective"][key], f"objective/{key}"


def cli_exit(argv, capsys):
    """(exit code, stderr) of `python -m runs.train ARGV`, run in-process (the same cli_errors path)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


# -- trained teachers, shared by the tests below


def train_teacher(path, flags, overrides):
    overrides = [o for o in overrides if not o.startswith("teacher.")]  # dsm takes no teacher
    train(config_of(flags, overrides + ["train.steps=2"]), path)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny dsm teachers: A and B (another seed) on the 2-D mixture with an MLP, U a U-Net on the 8x8 mixture."""
    root = tmp_path_factory.mktemp("teachers")
    mlp = ["--backbone", "mlp", "--objective", "dsm", "--data", "gmm"]
    return {"A": train_teacher(root / "A", mlp, VECTOR),
            "B": train_teacher(root / "B", mlp, VECTOR + ["train.seed=1"]),
            "U": train_teacher(root / "U", ["--backbone", "unet", "--objective", "dsm", "--data", "gmm"], IMAGE)}


@pytest.fixture(scope="module")
def stores(teachers, tmp_path_factory):
    """Stores made by runs.make_pairs: A's (z, x0) pairs at heun NFE 5, U's 2-state trajectories at heun NFE 7."""
    root = tmp_path_factory.mktemp("stores")
    make_pairs.main(["--teacher", str(teachers["A"]), "--n", "64", "--nfe", "5", "--out", str(root / "A"),
                     "--device", "cpu"])
    make_pairs.main(["--teacher", str(teachers["U"]), "--n", "64", "--nfe", "7", "--save-sigmas", "2",
                     "--out", str(root / "U"), "--device", "cpu"])
    return {"A": root / "A", "U": root / "U"}


# 1. every objective with the analytic teacher fitted automatically


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_trains_with_the_analytic_teacher(tmp_path, name):
    config = objective_config(name, "train.steps=3")
    assert config["teacher"]["path"] is None and config["teacher"]["analytic"] == "auto"
    run = tmp_path / name
    objective, _ = train(config, run)

    state = load_checkpoint(run)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["networks"]["student"].values())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["teacher"] == config["teacher"] and saved["teacher"]["path"] is None
    report = json.loads((run / "quality.json").read_text())
    assert ("map_rmse" in report) == objective.learns_teacher_map  # no map error for distribution matchers
    assert all(math.isfinite(report[k]) for k in ("map_rmse", "teacher_map_rmse", "swd", "teacher_swd",
                                                  "reference_swd") if k in report)
    assert report["n"] == 32 and report["nfe"] == (objective.eval_nfe or 1)
    if not OBJECTIVES[name][2]:  # reference Heun@35 (rollout learners here use coarse 5-NFE references)
        # against real data: the exact teacher's 35-NFE samples are close to it, its one-step samples far
        assert report["reference_swd"] < 0.5 * report["teacher_swd"]

    manifest = run / "rollouts" / "manifest.json"
    if OBJECTIVES[name][2]:
        manifest = json.loads(manifest.read_text())
        assert manifest["n"] == 256 and manifest["nfe"] == objective.rollouts["nfe"]
        assert "analytic gmm" in manifest["description"]
        # the rollouts are the mixture's exact teacher's
        data = GaussianMixtureData(**{k: v for k, v in config["data"].items() if k != "name"})
        assert manifest["fingerprint"] == fingerprint(GaussianMixtureDenoiser.from_data(data))
        assert manifest["sigmas"] == objective.rollout_sigmas.tolist()
    else:
        assert not manifest.exists()


# 2. the headline command


def test_fno_dsno_headline_command_on_mnist(tmp_path, run_cli):
    """python -m runs.train --backbone fno --objective dsno, data left at its default (MNIST), only shrunk."""
    run = tmp_path / "dsno"
    result = run_cli("runs.train", "--backbone", "fno", "--objective", "dsno", "--out", run,
                     "data.limit=500", "backbone.model_channels=8", "backbone.channel_mult=[1,2]",
                     "backbone.num_blocks=1", "backbone.attn_resolutions=[]", "objective.n=64", "objective.nfe=7",
                     "train.steps=2", "train.batch_size=32", "train.device=cpu", "train.sample_every=0",
                     "teacher.components=2", "teacher.rank=4", "teacher.fit_n=500", "teacher.eval_n=16", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "quality: nfe 1, n 16, reference heun@7, map_rmse " in result.stdout
    report = json.loads((run / "quality.json").read_text())
    assert math.isfinite(report["map_rmse"]) and math.isfinite(report["teacher_map_rmse"])
    manifest = json.loads((run / "rollouts" / "manifest.json").read_text())
    assert manifest["shape"] == [1, 28, 28] and len(manifest["sigmas"]) == 4 and manifest["sigmas"][-1] == 0
    assert "analytic ppca fitted to MNIST" in manifest["description"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["name"] == "mnist"


# 3. a trained teacher given with --teacher


def test_student_starts_from_the_teachers_weights(teachers, tmp_path):
    """kd inherits the teacher's backbone settings and data; with lr = 0 its checkpoint still holds the teacher's
    (EMA) weights, so the loop built the student from them."""
    config = config_of(["--backbone", "mlp", "--objective", "kd", "--teacher", teachers["A"]],
                       STUDENT + ["objective.nfe=5", "train.steps=1", "train.lr=0"])
    assert config["backbone"]["hidden"] == 32 and config["data"]["name"] == "gmm"
    assert config["teacher"]["path"] == str(teachers["A"])
    train(config, tmp_path / "kd")
    teacher_state = load_checkpoint(teachers["A"])
    student_state = load_checkpoint(tmp_path / "kd")
    assert not all(torch.equal(teacher_state["ema"]["denoiser"][k], v)
                   for k, v in teacher_state["networks"]["denoiser"].items())  # EMA != raw: the check can tell
    assert_same_tensors(student_state["networks"]["student"], teacher_state["ema"]["denoiser"], "kd student")


@pytest.mark.parametrize("name", ["add", "ufogen", "dmd2"])
def test_adversarial_students_of_a_unet_teacher_judge_with_its_features(teachers, tmp_path, name):
    """From a trained U-Net teacher the adversarial objectives train end to end on images with the offline default
    discriminator: heads on the frozen teacher's features (dmd2: on its fake score's), the teacher never changing."""
    from models.discriminators import TeacherFeatureDiscriminator
    from objectives.dmd2 import FakeScoreWithHead
    config = config_of(["--backbone", "unet", "--objective", name, "--teacher", teachers["U"]],
                       [o for o in STUDENT if not o.startswith("objective.")] + ["train.steps=3"])
    objective, _ = train(config, tmp_path / name)
    critic = objective.networks["fake_score" if name == "dmd2" else "discriminator"]
    assert isinstance(critic, FakeScoreWithHead if name == "dmd2" else TeacherFeatureDiscriminator)
    assert_same_tensors(objective.teacher.state_dict(), load_teacher(config["teacher"], None, False,
                                                                     torch.device("cpu"))[0].state_dict(), "teacher")
    with torch.no_grad():
        assert torch.isfinite(objective.generate(torch.randn(4, 1, 8, 8), 1)).all()


def test_fno_student_takes_a_unet_teachers_weights(teachers):
    """dsno's fno student of a unet teacher: every UNet parameter copied, the temporal layers start at zero."""
    config = config_of(["--backbone", "fno", "--objective", "dsno", "--teacher", teachers["U"]],
                       STUDENT + ["objective.nfe=7"])
    teacher, _ = load_teacher(config["teacher"], None, False, torch.device("cpu"))
    objective = build_objective(config, teacher=teacher)
    student = objective.networks["student"].backbone.state_dict()
    theirs = teacher.backbone.state_dict()
    assert_same_tensors({k: v for k, v in student.items() if not k.startswith("time_layers.")}, theirs, "fno")
    assert all(not v.any() for k, v in student.items() if k.startswith("time_layers."))


def test_student_that_cannot_take_the_teachers_weights_exits_2(teachers, tmp_path, run_cli):
    result = run_cli("runs.train", "--backbone", "mlp", "--objective", "kd", "--teacher", teachers["A"],
                     "--out", tmp_path / "kd", "backbone.hidden=64", *STUDENT, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and "cannot take the teacher's weights" in result.stderr
    assert not (tmp_path / "kd").exists()


def test_objective_without_a_teacher_refuses_one(teachers, tmp_path, run_cli):
    result = run_cli("runs.train", "--backbone", "mlp", "--objective", "dsm", "--teacher", teachers["A"],
                     "--out", tmp_path / "dsm", "--data", "gmm", "data.n=512", "backbone.hidden=32", "train.steps=2",
                     "train.batch_size=32", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "takes no teacher" in result.stderr


# 4. stores made by runs.make_pairs, given with --trajectories


def test_store_of_another_teacher_is_refused(teachers, stores, tmp_path, capsys):
    code, err = cli_exit(["--backbone", "mlp", "--objective", "kd", "--teacher", teachers["B"],
                          "--trajectories", stores["A"], "--out", tmp_path / "kd", "objective.nfe=5", *STUDENT],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and "store made by another teacher" in err and "fingerprint" in err


def test_store_started_from_another_sigma_max_is_refused(teachers, stores, tmp_path, capsys):
    """kd saves only x0, so the saved sigmas cannot tell; the store's grid must start at the objective's sigma_max."""
    code, err = cli_exit(["--backbone", "mlp", "--objective", "kd", "--teacher", teachers["A"], "--trajectories",
                          stores["A"], "--out", tmp_path / "kd", "objective.nfe=5", "objective.sigma_max=40", *STUDENT],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and "sigma_max=80" in err and "40" in err


def test_store_with_fewer_saved_states_than_asked_is_refused(teachers, stores, tmp_path, capsys):
    """dsno asks for K = 4 states of the same teacher / solver / NFE; the store holds 2."""
    code, err = cli_exit(["--backbone", "fno", "--objective", "dsno", "--teacher", teachers["U"],
                          "--trajectories", stores["U"], "--out", tmp_path / "dsno", "objective.nfe=7",
                          "objective.save_sigmas=4", *STUDENT], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "stored" in err


def test_store_with_fewer_saved_states_names_the_cause(teachers, stores, tmp_path, capsys):
    code, err = cli_exit(["--backbone", "fno", "--objective", "dsno", "--teacher", teachers["U"],
                          "--trajectories", stores["U"], "--out", tmp_path / "dsno", "objective.nfe=7",
                          "objective.save_sigmas=4", *STUDENT], capsys)
    assert code == 2 and "K larger than the stored trajectory" in err


@pytest.mark.parametrize("kind", ["kd", "dsno"])
def test_store_of_the_right_teacher_is_used(teachers, stores, tmp_path, kind):
    teacher, store = ("A", "A") if kind == "kd" else ("U", "U")
    flags = ["--backbone", "mlp" if kind == "kd" else "fno", "--objective", kind, "--teacher", teachers[teacher],
             "--trajectories", stores[store]]
    extra = ["objective.nfe=5"] if kind == "kd" else ["objective.nfe=7", "objective.save_sigmas=2"]
    manifest_before = (stores[store] / "manifest.json").read_text()
    run = tmp_path / kind
    train(config_of(flags, STUDENT + extra), run)
    assert load_checkpoint(run)["step"] == 2 and (run / "quality.json").exists()
    assert not (run / "rollouts").exists()
    assert (stores[store] / "manifest.json").read_text() == manifest_before
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"]["trajectories"] == str(stores[store])


# 5. exact resume


def resumed_equals_straight(tmp_path, config_for, stop, end):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config_for(f"train.steps={end}"), straight)
    train(config_for(f"train.steps={stop}"), stopped)
    at_stop = load_checkpoint(stopped)
    assert at_stop["step"] == stop
    train(make_config(parse_args(["--resume", str(stopped), f"train.steps={end}"]))[0], stopped, resume=True)
    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a["step"] == b["step"] == end
    assert_same_run_state(a, b)
    lines = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "quality/map_rmse" not in r] == list(range(1, end + 1))
    return at_stop


def test_kd_resume_is_exact(tmp_path):
    resumed_equals_straight(
        tmp_path, lambda steps: objective_config("kd", steps, "train.log_every=1", "train.ckpt_every=3",
                                                 "train.warmup_steps=2", "train.seed=3"), stop=3, end=6)


def test_progressive_resume_across_a_stage_boundary_is_exact(tmp_path):
    """Stage 0 is steps 0-1, stage 1 from step 2: stopped at 3, the stage teacher (the student's weights at step 2)
    must come back from the checkpoint, not from the weights at step 3."""
    at_stop = resumed_equals_straight(
        tmp_path, lambda steps: objective_config("progressive", steps, "train.log_every=1", "train.ckpt_every=3",
                                                 "train.warmup_steps=2", "train.seed=3"), stop=3, end=5)
    assert at_stop["objective"]["stage"] == 1 and at_stop["objective"]["student_steps"] == 1
    stage_teacher, student = at_stop["objective"]["teacher"], at_stop["networks"]["student"]
    assert set(stage_teacher) == set(student)
    assert not all(torch.equal(stage_teacher[k], student[k]) for k in student)


def test_tract_resume_across_a_phase_boundary_is_exact(tmp_path):
    """Phase 0 is steps 0-1, phase 1 from step 2: the phase teacher and the self-teacher come back from the
    checkpoint."""
    at_stop = resumed_equals_straight(
        tmp_path, lambda steps: objective_config("tract", steps, "train.log_every=1", "train.ckpt_every=3",
                                                 "train.warmup_steps=2", "train.seed=3"), stop=3, end=5)
    assert at_stop["objective"]["phase"] == 1
    assert set(at_stop["objective"]) == {"phase", "phase_teacher", "self_teacher"}


# 6. sampling and reloading finished students


@pytest.fixture(scope="module")
def students(teachers, tmp_path_factory):
    """A kd student of the analytic teacher, a kd student of trained teacher A, and a 2-step progressive student."""
    root = tmp_path_factory.mktemp("students")
    train(objective_config("kd", "train.steps=2"), root / "kd")
    train(config_of(["--backbone", "mlp", "--objective", "kd", "--teacher", teachers["A"]],
                    STUDENT + ["objective.nfe=5"]), root / "kd_trained")
    train(objective_config("progressive", "objective.end_steps=2", "train.steps=2"), root / "progressive")
    return root


def test_sample_cli_on_a_kd_student_matches_its_reloaded_generator(students, tmp_path, run_cli):
    out = tmp_path / "kd.npz"
    result = run_cli("runs.sample", students / "kd", "--nfe", 1, "--n", 16, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    samples = np.load(out)["samples"]
    assert samples.shape == (16, 2) and np.isfinite(samples).all()
    config, objective = load_run(students / "kd")  # re-fits the analytic teacher
    z = torch.randn([16, 2], generator=torch.Generator().manual_seed(0))  # runs.sample's noise for --seed 0
    with torch.inference_mode():
        torch.testing.assert_close(objective.generate(z, 1), torch.from_numpy(samples), rtol=0, atol=1e-6)


def test_sample_cli_without_nfe_samples_a_one_step_student_in_its_own_steps(tmp_path, capsys):
    """runs.sample with no --nfe takes a one-step student's own eval_nfe (35, the teachers' default, is an error
    for dmd2, whose generator takes exactly its student_sigmas' number of steps)."""
    from runs.sample import main as sample_main
    train(objective_config("dmd2", "train.steps=2"), tmp_path / "dmd2")
    sample_main([str(tmp_path / "dmd2"), "--n", "8", "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert "NFE 1 measured" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npz")["samples"].shape == (8, 2)


def test_sample_cli_on_a_progressive_student(students, tmp_path, run_cli):
    config, objective = load_run(students / "progressive")  # re-fits the analytic teacher it holds
    assert objective.eval_nfe == 2 and isinstance(objective.teacher, GaussianMixtureDenoiser)
    out = tmp_path / "progressive.npz"
    result = run_cli("runs.sample", students / "progressive", "--nfe", objective.eval_nfe, "--n", 16, "--out", out,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NFE 2 measured" in result.stdout
    samples = np.load(out)["samples"]
    assert samples.shape == (16, 2) and np.isfinite(samples).all()


def test_sample_of_a_progressive_student_uses_its_own_sampler(students):
    from runs.sample import sample
    config, objective = load_run(students / "progressive")
    samples, _, nfe, _ = sample(objective, config, 16, 2, device="cpu")
    assert nfe == 2  # the student's network calls, counted
    z = torch.randn([16, 2], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(samples, objective.generate(z, 2).float(), rtol=0, atol=1e-5)


def test_k_rectified_flow_chain_then_one_step_distillation(tmp_path):
    """reflow's recipe: a reflow run is itself a teacher (its flow denoiser), so 2-RF -> 3-RF -> distill chain by
    --teacher; each stage regenerates its couplings from the previous one's ODE and starts from its weights."""
    rf2, rf3, distilled = tmp_path / "rf2", tmp_path / "rf3", tmp_path / "distilled"
    train(objective_config("reflow", "train.steps=2"), rf2)
    flags = ["--objective", "reflow", "--teacher", rf2]
    settings = ["objective.rollout_n=64", "objective.rollout_nfe=5", "train.steps=2", "train.batch_size=32",
                "teacher.eval_n=16", "train.device=cpu", "train.sample_every=0"]
    train(config_of(flags, settings), rf3)  # the 2-RF's backbone name and settings are inherited
    train(config_of(["--objective", "reflow", "--teacher", rf3], settings + ["objective.mode=distill"]), distilled)
    stores = [json.loads((run / "rollouts" / "manifest.json").read_text())["fingerprint"] for run in (rf3, distilled)]
    teachers = [load_run(run)[1].denoiser() for run in (rf2, rf3)]
    assert stores == [fingerprint(t) for t in teachers] and stores[0] != stores[1]
    config, student = load_run(distilled)
    assert config["backbone"]["name"] == "mlp" and student.denoiser() is None  # a one-step generator
    assert json.loads((distilled / "quality.json").read_text())["nfe"] == 1


def test_load_run_reloads_a_student_of_a_trained_teacher(students, teachers):
    config, objective = load_run(students / "kd_trained")
    assert config["teacher"]["path"] == str(teachers["A"])
    assert objective.initialised_from_teacher  # the teacher run was loaded again to build the student
    assert_same_tensors(objective.networks["student"].state_dict(),
                        load_checkpoint(students / "kd_trained")["ema"]["student"], "reloaded student")
    z = torch.randn([8, 2], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(objective.generate(z, 1)).all()


# 7. NaN


def test_nan_loss_in_a_distillation_objective_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = KD.loss

    def poisoned(self, role, batch, step):
        loss, logs = original(self, role, batch, step)
        return (loss * float("nan"), logs) if step >= 4 else (loss, logs)

    monkeypatch.setattr(KD, "loss", poisoned)
    run = tmp_path / "kd"
    with pytest.raises(FloatingPointError, match="at step 4.*step 3"):
        train(objective_config("kd", "train.steps=10", "train.ckpt_every=3"), run)
    state = load_checkpoint(run)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["networks"]["student"].values())
    assert not (run / "quality.json").exists()
