"""`runs.sample RUN --schedule FILE` samples on a schedule written by runs.optimise_schedule (its solver and NFE the
defaults), checks a file's step count against the solver and NFE asked for, and refuses bad files in one line with
exit code 2; runs.sample asks the objective for its sampler (`Objective.sampler()`) instead of probing attributes."""
import json

import numpy as np
import pytest
import torch

from data.mixtures import GaussianMixtureData
from models.analytic import GaussianMixtureDenoiser
from models.mlp import MLP
from objectives.dsm import DSM
from objectives.reflow import Reflow
from runs import optimise_schedule
from runs import sample as runs_sample
from runs.build import load_run
from runs.train import make_config, parse_args, train
from solvers import SOLVERS, options_for_nfe, sigmas_for_nfe
from solvers.optimise import load_schedule
from solvers.schedules import flow_uniform, karras


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dsm teacher on the 2-D mixture (a tiny MLP, 2 steps) and a schedule fitted to it for heun at 5 NFE."""
    root = tmp_path_factory.mktemp("schedule")
    argv = ["--objective", "dsm", "--backbone", "mlp", "--data", "gmm", "data.n=128", "backbone.hidden=16",
            "train.steps=2", "train.batch_size=16", "train.device=cpu", "train.sample_every=0"]
    train(make_config(parse_args(argv))[0], root / "dsm")
    optimise_schedule.main([str(root / "dsm"), "--solver", "heun", "--nfe", "5", "--n", "8", "--holdout", "0",
                            "--iters", "4", "--device", "cpu", "--out", str(root / "heun5.txt")])
    return root / "dsm", root / "heun5.txt"


def sample_cli(argv, capsys):
    runs_sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def exit_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runs_sample.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return exit_info.value.code, err


def solve(run, solver, sigmas, nfe, n=6):
    """What runs.sample computes for --seed 0: the run's denoiser integrated in float64 from runs.sample's noise."""
    _, objective = load_run(run)
    z = torch.randn([n, 2], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return SOLVERS[solver](objective.denoiser(), z.double() * sigmas[0], sigmas, **options_for_nfe(solver, nfe))


def test_schedule_file_from_optimise_schedule_gives_solver_and_nfe(teacher, tmp_path, capsys):
    run, schedule = teacher
    sigmas, meta = load_schedule(schedule)
    assert meta["solver"] == "heun" and meta["nfe"] == 5 and len(sigmas) == 4  # heun at 5 NFE: 3 steps
    out = sample_cli([run, "--schedule", schedule, "--n", "6", "--out", tmp_path / "s.npz"], capsys)
    assert "NFE 5 measured" in out
    expected = solve(run, "heun", sigmas, 5).float().numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], expected)
    assert not torch.equal(sigmas, sigmas_for_nfe("heun", 5))  # the file's sigmas, not karras'
    # the same --solver and --nfe, given explicitly, agree with the file
    out = sample_cli([run, "--schedule", schedule, "--solver", "heun", "--nfe", "5", "--n", "6",
                      "--out", tmp_path / "t.npz"], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["samples"], expected)


def test_plain_list_of_sigmas_samples_at_the_nfe_given(teacher, tmp_path, capsys):
    run, _ = teacher
    plain = tmp_path / "four.json"
    plain.write_text(json.dumps([80.0, 10.0, 1.0, 0.1]))  # 4 steps (0 appended): euler at 4 NFE
    out = sample_cli([run, "--schedule", plain, "--solver", "euler", "--nfe", "4", "--n", "6",
                      "--out", tmp_path / "s.npz"], capsys)
    assert "NFE 4 measured" in out
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    expected = solve(run, "euler", sigmas, 4).float().numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], expected)


@pytest.mark.parametrize("argv, message", [
    (["--nfe", "7"], "was made for heun at 5 NFE, not heun at 7 NFE"),
    (["--solver", "euler"], "was made for heun at 5 NFE, not euler at 5 NFE"),
])
def test_file_for_another_solver_or_nfe_is_refused(teacher, tmp_path, capsys, argv, message):
    run, schedule = teacher
    code, err = exit_line([run, "--schedule", schedule, *argv, "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and message in err and "python -m runs.optimise_schedule" in err


@pytest.mark.parametrize("content, argv, message", [
    ("80\n10\n1\n0\n", ["--solver", "euler", "--nfe", "4"], "has 3 steps; euler at 4 NFE takes 4"),
    ("80\n10\n1\n0\n", [], "has 3 steps; heun at 35 NFE takes 18"),  # no metadata: the run's heun, 35 NFE
    ("80\n10\n1\n", ["--solver", "heun", "--nfe", "3"], "has 3 steps; heun at 3 NFE takes 2"),  # 0 appended
    ("80\nten\n1\n0\n", ["--nfe", "3"], "'ten' is not a number"),
    ("80\n1\n10\n0\n", ["--nfe", "3"], "strictly decreasing"),
    ("# meta: {\"solver\": \"rk45\", \"nfe\": 3}\n80\n1\n0\n", [], "unknown solver (named by schedule file"),
    ("# meta: {\"solver\": \"euler\", \"nfe\": 0}\n80\n1\n0\n", [], "names nfe=0, not an integer >= 1"),
    ("# meta: [1, 2]\n80\n1\n0\n", [], "is not a JSON object"),
    ("# meta: {oops\n80\n1\n0\n", [], "unreadable metadata line"),
])
def test_bad_schedule_file_is_one_line_and_exit_2(teacher, tmp_path, capsys, content, argv, message):
    run, _ = teacher
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    code, err = exit_line([run, "--schedule", bad, *argv, "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and message in err and str(bad) in err


def test_binary_or_missing_schedule_file_is_one_line(teacher, tmp_path, capsys):
    run, _ = teacher
    binary = tmp_path / "garbage.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, err = exit_line([run, "--schedule", binary, "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and "is not text" in err
    code, err = exit_line([run, "--schedule", tmp_path / "nowhere.txt", "--out", tmp_path / "s.npz"], capsys)
    assert code == 2 and "neither a schedule (flow_uniform, karras" in err and "nor an existing schedule file" in err


def test_a_wrong_length_file_is_refused_before_the_run_is_loaded(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("80\n1\n0\n")
    code, err = exit_line([tmp_path / "no_such_run", "--schedule", short, "--solver", "euler", "--nfe", "5"], capsys)
    assert code == 2 and "has 2 steps; euler at 5 NFE takes 5" in err


def test_objectives_declare_their_sampler():
    mixture = GaussianMixtureDenoiser.from_data(GaussianMixtureData(n=16))
    dsm = DSM(MLP(dim=2, hidden=8), solver="dpmpp_2m", schedule="karras", sigma_max=40.0)
    assert dsm.sampler() == (SOLVERS["dpmpp_2m"], karras, dict(sigma_min=0.002, sigma_max=40.0, rho=7.0))
    assert dsm.solver is SOLVERS["dpmpp_2m"] and dsm.schedule_kwargs["sigma_max"] == 40.0  # attributes kept
    flow = Reflow(MLP(dim=2, hidden=8), teacher=mixture, rollout_n=8)
    assert flow.sampler() == (SOLVERS["euler"], flow_uniform, dict(sigma_max=80.0))
    assert Reflow(MLP(dim=2, hidden=8), teacher=mixture, mode="distill", rollout_n=8).sampler() is None
