"""Command-line entry points: the preset trains, samples come out at the data's resolution, bad input exits 2."""
import numpy as np
import pytest
from PIL import Image

from models import BACKBONES
from runs import list as runs_list
from runs import sample as runs_sample
from runs import train as runs_train

PRESET = "runs/configs/mnist_teacher.yaml"
TINY = ["backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.num_blocks=1",
        "backbone.attn_resolutions=[14]", "data.limit=64", "train.steps=2", "train.batch_size=16",
        "train.sample_every=2", "train.sample_grid=4", "train.sample_nfe=3"]


def exit_code_and_stderr(main, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The shipped teacher preset, shrunk: trains, writes config, checkpoint and a sample grid."""
    run = tmp_path_factory.mktemp("runs") / "teacher"
    runs_train.main(["--config", PRESET, "--out", str(run), *TINY])
    return run


def test_preset_run_writes_everything(tiny_run):
    assert (tiny_run / "config.yaml").is_file() and (tiny_run / "checkpoint.pt").is_file()
    assert (tiny_run / "metrics.jsonl").read_text().count("\n") == 1
    assert any((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    grid = Image.open(tiny_run / "samples" / "step_0000002.png")
    assert grid.size == (56, 56)  # 2 x 2 digits of 28 x 28


def test_sample_npz_has_uint8_images_at_data_resolution_and_labels(tiny_run, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    runs_sample.main([str(tiny_run), "--solver", "heun", "--nfe", "5", "--n", "6", "--batch", "4", "--out", str(out)])
    assert "NFE 5 measured" in capsys.readouterr().out
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (6, 1, 28, 28)
        assert f["labels"].shape == (6,) and set(f["labels"]) <= set(range(10))
    png = tmp_path / "grid.png"
    runs_sample.main([str(tiny_run / "checkpoint.pt"), "--nfe", "2", "--n", "4", "--out", str(png)])
    assert Image.open(png).size == (56, 56)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 10])
def test_sample_reports_the_exact_nfe_asked_for(tiny_run, tmp_path, capsys, nfe):
    runs_sample.main([str(tiny_run), "--nfe", str(nfe), "--n", "2", "--out", str(tmp_path / "s.npz")])
    assert f"NFE {nfe} measured" in capsys.readouterr().out


def test_sample_bad_input_exits_2(tiny_run, tmp_path, capsys):
    code, err = exit_code_and_stderr(runs_sample.main, [str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint" in err
    broken = tmp_path / "broken.pt"
    broken.write_bytes((tiny_run / "checkpoint.pt").read_bytes()[:5000])
    code, err = exit_code_and_stderr(runs_sample.main, [str(broken)], capsys)
    assert code == 2 and "truncated or corrupt" in err and "Traceback" not in err
    code, err = exit_code_and_stderr(runs_sample.main, [str(tiny_run), "--solver", "rk45"], capsys)
    assert code == 2 and "unknown solver 'rk45'; known: ddim, deis, dpm_solver_1" in err
    code, err = exit_code_and_stderr(runs_sample.main, [str(tiny_run), "--out", "x.jpg"], capsys)
    assert code == 2 and ".npz or .png" in err


@pytest.mark.parametrize("args, message", [
    (["--backbone", "resnet"], "error: unknown backbone 'resnet'; known: " + ", ".join(sorted(BACKBONES))),
    (["--data", "imagenet"], "error: unknown data 'imagenet'; known:"),
    (["--data", "mnist", "data.path=/no/such/mnist.npz"], "/no/such/mnist.npz"),
    (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    (["backbone.channels=64"], "takes no argument(s) channels"),
])
def test_train_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, err = exit_code_and_stderr(runs_train.main, args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_train_refuses_to_overwrite_a_run(tiny_run, capsys):
    code, err = exit_code_and_stderr(runs_train.main, ["--config", PRESET, "--out", str(tiny_run), *TINY], capsys)
    assert code == 2 and "--resume" in err


def test_npz_with_wrong_keys_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "digits.npz"
    np.savez(bad, pixels=np.zeros((4, 28, 28), np.uint8))
    code, err = exit_code_and_stderr(runs_train.main, ["--data", "mnist", f"data.path={bad}"], capsys)
    assert code == 2 and "images" in err


def test_list_prints_every_registry(capsys):
    runs_list.main()
    out = capsys.readouterr().out
    for name in ("backbones:", "unet", "mlp", "objectives:", "dsm", "solvers:", "heun", "schedules:", "karras",
                 "datasets:", "mnist", "cifar10", "metrics:", "fno", "dsno", "kd", "progressive", "reflow", "boot",
                 "flow_uniform", "distances:", "lpips"):
        assert name in out
    assert "(undocumented)" not in out


def test_cifar10_preset_builds_edm_ddpmpp_and_resolves():
    """The GPU recipe's backbone is EDM's 55.73 M-parameter DDPM++; every key in the preset is a real argument."""
    from models import BACKBONES
    from runs.config import load_yaml, resolve
    preset = load_yaml("runs/configs/cifar10_teacher.yaml")
    resolved = resolve(preset)
    backbone = dict(resolved["backbone"])
    net = BACKBONES[backbone.pop("name")](**{**backbone, "img_resolution": 32, "in_channels": 3})
    assert sum(p.numel() for p in net.parameters()) == 55_732_739
