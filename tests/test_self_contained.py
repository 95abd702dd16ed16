"""A student run is self-contained: its checkpoint records its teacher (runs.teacher.teacher_record), so
`runs.sample RUN` works from any directory, rebuilds an analytic teacher from its saved parameters without fitting
it again (same samples as the re-fitting path), and finds a trained teacher by absolute path, refusing in one line a
teacher that was moved or changed."""
import io
import os
import shutil

import numpy as np
import pytest
import torch

from data.trajectories import fingerprint
from models.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from models.ppca import PPCAMixtureDenoiser
from runs import sample as runs_sample
from runs.build import build_dataset, load_run
from runs.checkpoint import load_checkpoint, save_checkpoint
from runs.teacher import load_teacher, teacher_record
from runs.train import make_config, parse_args, train

# 8x8 images of a Gaussian mixture, a tiny U-Net, a PPCA teacher of 2 components of rank 4
IMAGES = ["data.dim=64", "data.image_shape=[1,8,8]", "data.n=256", "backbone.model_channels=8",
          "backbone.channel_mult=[1,2]", "backbone.num_blocks=1", "backbone.attn_resolutions=[]",
          "teacher.analytic=ppca", "teacher.components=2", "teacher.rank=4"]
VECTORS = ["data.n=256", "backbone.hidden=16"]
SHORT = ["train.steps=2", "train.batch_size=16", "train.device=cpu", "train.sample_every=0"]
KD = ["objective.n=32", "objective.nfe=3", "teacher.eval_n=0"]


def config_of(flags, *overrides):
    """The resolved config of `python -m runs.train FLAGS OVERRIDES` (argparse wants the flags first)."""
    return make_config(parse_args([str(a) for a in [*flags, *overrides]]))[0]


def with_record(run, config):
    """The run's checkpoint with its teacher record: the one the training loop wrote, or (before the loop writes it)
    the record of the teacher the loop used, rebuilt here exactly as it built it. Returns the record."""
    state = load_checkpoint(run)
    if state.get("teacher") is None:
        teacher = load_teacher(config["teacher"], build_dataset(config), config["train"]["conditional"], "cpu")[0]
        state["teacher"] = teacher_record(teacher, config["teacher"])
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, run / "checkpoint.pt")
    return state["teacher"]


def without_record(run, copy, teacher_path=None):
    """A copy of the run's checkpoint as older runs wrote it: no teacher record (and teacher.path as given)."""
    state = load_checkpoint(run)
    if teacher_path is not None:
        state["config"]["teacher"]["path"] = teacher_path
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "teacher")}, copy)
    return copy


def sample_cli(run, out, *extra):
    runs_sample.main([str(run), "--n", "8", "--nfe", "1", "--device", "cpu", "--out", str(out), *map(str, extra)])
    with np.load(out) as f:
        return f["images"] if "images" in f else f["samples"]


def exit_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runs_sample.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.fixture(scope="module")
def ppca_student(tmp_path_factory):
    """A kd student of an analytic PPCA teacher, trained 2 steps, its checkpoint holding the teacher record."""
    run = tmp_path_factory.mktemp("ppca") / "kd"
    config = config_of(["--objective", "kd", "--backbone", "unet", "--data", "gmm"], *IMAGES, *KD, *SHORT)
    train(config, run)
    return run, config, with_record(run, config)


def test_record_holds_the_fitted_teacher_as_plain_tensors(ppca_student):
    run, config, record = ppca_student
    assert record["kind"] == "ppca" and record["path"] is None
    manifest = (run / "rollouts" / "manifest.json").read_text()
    assert record["fingerprint"] in manifest  # the teacher the rollouts were made with
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    rebuilt = PPCAMixtureDenoiser.from_state(loaded["state"])
    assert fingerprint(rebuilt) == record["fingerprint"]


def test_sampling_from_another_directory_needs_no_fit_and_gives_the_same_samples(ppca_student, tmp_path,
                                                                                 monkeypatch):
    run, _, _ = ppca_student
    fits, fit = [], PPCAMixtureDenoiser.fit.__func__

    def counted_fit(cls, *args, **kwargs):
        fits.append(1)
        return fit(cls, *args, **kwargs)
    monkeypatch.setattr(PPCAMixtureDenoiser, "fit", classmethod(counted_fit))
    refitted = sample_cli(without_record(run, tmp_path / "old.pt"), tmp_path / "old.npz")
    assert len(fits) == 1  # an older checkpoint: the teacher is fitted again

    def no_fit(*args, **kwargs):
        raise AssertionError("the PPCA teacher was fitted again")
    monkeypatch.setattr(PPCAMixtureDenoiser, "fit", no_fit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recorded = sample_cli(run, "new.npz")
    assert (elsewhere / "new.npz").is_file()
    np.testing.assert_array_equal(recorded, refitted)
    _, objective = load_run(run)  # in code too
    saved = load_checkpoint(run)["ema"]["student"]
    assert all(torch.equal(value, saved[name]) for name, value in objective.networks["student"].state_dict().items())


@pytest.mark.parametrize("kind", ["gmm", "empirical", "ppca"])
def test_every_analytic_teacher_is_rebuilt_exactly_from_its_record(kind):
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(40, 1, 4, 4, generator=generator)
    labels = torch.arange(40) % 2
    teacher = {"gmm": lambda: GaussianMixtureDenoiser(torch.randn(3, 5), torch.rand(3, 5) + 0.1, torch.rand(3)),
               "empirical": lambda: EmpiricalDenoiser(points, labels),
               "ppca": lambda: PPCAMixtureDenoiser.fit(points, components=2, rank=3, labels=labels)}[kind]()
    record = teacher_record(teacher, {"path": None, "analytic": kind})
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    rebuilt, description = load_teacher({"analytic": "auto"}, None, False, "cpu",
                                        record=torch.load(buffer, weights_only=True))
    assert type(rebuilt) is type(teacher) and fingerprint(rebuilt) == record["fingerprint"]
    assert description == f"analytic {kind} (saved with the run)"
    x = torch.randn(4, *teacher.shape, generator=generator, dtype=torch.float64)
    assert torch.equal(rebuilt(x, 0.3), teacher(x, 0.3))


def test_a_corrupted_record_is_refused(ppca_student):
    _, _, record = ppca_student
    broken = {**record, "state": {**record["state"], "sigma_data": record["state"]["sigma_data"] * 2}}
    with pytest.raises(ValueError, match="does not match its recorded fingerprint"):
        load_teacher({}, None, False, "cpu", record=broken)


# a trained teacher, given by a path relative to the training directory


@pytest.fixture
def trained_student(tmp_path, monkeypatch):
    """(training directory, student run): a dsm teacher at work/teachers/A, and a kd student trained from work/
    with --teacher teachers/A (relative), its checkpoint holding the teacher record."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    train(config_of(["--objective", "dsm", "--backbone", "mlp", "--data", "gmm"], *VECTORS, *SHORT),
          work / "teachers" / "A")
    config = config_of(["--objective", "kd", "--teacher", "teachers/A"], *KD, *SHORT)
    train(config, work / "students" / "kd")
    record = with_record(work / "students" / "kd", config)
    assert record["kind"] == "run" and record["path"] == str(work / "teachers" / "A")
    monkeypatch.chdir(tmp_path)
    return work, work / "students" / "kd"


def test_student_of_a_relative_teacher_samples_from_another_directory(trained_student, tmp_path, capsys):
    work, student = trained_student
    samples = sample_cli(student, tmp_path / "s.npz")
    assert samples.shape == (8, 2) and np.isfinite(samples).all()
    # an older run (no record, the relative path in its config) finds the teacher from the run's directory up
    old = without_record(student, student / "old.pt", teacher_path="teachers/A")
    assert np.array_equal(sample_cli(old, tmp_path / "old.npz"), samples)


def test_moved_teacher_is_one_line(trained_student, tmp_path, capsys):
    work, student = trained_student
    shutil.move(work / "teachers" / "A", work / "teachers" / "moved")
    code, err = exit_line([student, "--n", "2", "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"the teacher this run was trained with, {work / 'teachers' / 'A'}, is missing" in err


def test_changed_teacher_is_one_line(trained_student, tmp_path, capsys):
    work, student = trained_student
    path = work / "teachers" / "A" / "checkpoint.pt"
    state = load_checkpoint(path)
    for tensor in state["ema"]["denoiser"].values():
        tensor.add_(0.01)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    code, err = exit_line([student, "--n", "2", "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "is not the one this run was trained with" in err and "put the original teacher back" in err


def test_teacher_given_in_code_is_recorded_but_not_rebuilt():
    teacher = torch.nn.Linear(2, 2)
    record = teacher_record(teacher, {"path": None})
    assert record["kind"] == "module" and record["fingerprint"] == fingerprint(teacher)
    with pytest.raises(ValueError, match="given in code"):
        load_teacher({}, None, False, "cpu", record=record)
    assert os.path.isabs(teacher_record(teacher, {"path": "some/run"})["path"])
