"""The reference ODE solution, the schedule optimiser, schedule files and the solver benchmark."""
import csv
import importlib.util
import json
import math

import pytest
import torch

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from runs.bench_solvers import bench_solvers
from runs.optimise_schedule import main as optimise_main
from solvers import CountingDenoiser, karras, options_for_nfe, sample_euler, sample_heun, sigmas_for_nfe
from solvers.optimise import (load_schedule, logits_from_schedule, optimise_schedule, save_schedule,
                              schedule_from_logits, schedule_mse)
from solvers.schedules import from_file
from solvers.reference import reference_solution, reference_tolerance_check
from tests.gaussian import exact_flow, gaussian_denoiser, problem


def mixture(dim=2, components=8):
    return GaussianMixtureDenoiser(**gaussian_mixture_params(dim, components))


def noises(n, dim, seed):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_reference_matches_the_closed_form_flow_of_a_gaussian():
    mu, z = problem()
    levels = (10.0, 1.0, 0.002, 0.0)
    states, info = reference_solution(gaussian_denoiser(mu), 80.0 * z, 80.0, levels)
    assert states.shape == (4, *z.shape) and states.dtype == torch.float64
    for state, level in zip(states, levels):
        assert torch.allclose(state, exact_flow(80.0 * z, mu, 80.0, level), rtol=1e-9, atol=1e-9), level
    assert info["sigma_end"] == pytest.approx(1e-7) and 50 < info["nfe"] < 5000
    # the analytic mixture with K = 1 (std 0.5, the oracle's variance) is the same flow
    teacher = mixture(dim=5, components=1)
    x0 = reference_solution(teacher, 80.0 * z, 80.0)[0][0]
    assert torch.allclose(x0, exact_flow(80.0 * z, teacher.means[0], 80.0, 0.0), atol=1e-9)


def test_halving_the_tolerances_changes_the_reference_far_less_than_solver_errors():
    teacher, z = mixture(), noises(64, 2, 0)
    states, info = reference_tolerance_check(teacher, 80.0 * z, 80.0, (0.002, 0.0))
    assert info["tolerance_change"] < 1e-8
    # the smallest errors the benchmark reports are far larger, e.g. Heun at 31 NFE
    heun_error = (sample_heun(teacher, 80.0 * z, karras(16)) - states[1]).square().mean().sqrt().item()
    assert info["tolerance_change"] < 1e-4 * heun_error


def test_reference_levels_and_bad_input():
    mu, z = problem(batch=2, dim=3)
    denoiser = gaussian_denoiser(mu)
    only_start, info = reference_solution(denoiser, 5.0 * z, 5.0, (5.0,))
    assert torch.equal(only_start[0], 5.0 * z) and info["nfe"] == 0 and info["sigma_end"] is None
    for bad, text in [((0.0, 1.0), "decreasing"), ((6.0, 0.0), r"\[0, sigma_max"), ((), "empty"),
                      ((1.0, float("nan")), "sigma_max")]:
        with pytest.raises(ValueError, match=f"reference_solution.*{text}"):
            reference_solution(denoiser, 5.0 * z, 5.0, bad)
    with pytest.raises(ValueError, match="reference_solution.*rtol"):
        reference_solution(denoiser, 5.0 * z, 5.0, rtol=0.0)
    with pytest.raises(ValueError, match=r"reference_solution.*\[2, 2\]"):
        reference_solution(lambda x, s: x[:, :2], 5.0 * z, 5.0)


def test_schedule_parametrisation_is_monotone_and_round_trips():
    sigmas = karras(8)
    assert torch.allclose(schedule_from_logits(logits_from_schedule(sigmas, 0.002, 80.0), 0.002, 80.0), sigmas,
                          rtol=1e-6)
    for seed in range(5):
        logits = 3 * torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        levels = schedule_from_logits(logits, 0.002, 80.0, min_gap=0.1)
        assert levels.shape == (7,) and levels[0] == 80.0 and levels[-1] == 0 and levels[-2] >= 0.002
        log_steps = levels[:-2].log() - levels[1:-1].log()
        assert (log_steps >= 0.1 * math.log(80.0 / 0.002) / 6 * (1 - 1e-9)).all()


@pytest.mark.parametrize("solver, nfe", [("heun", 5), ("euler", 4)])
def test_optimised_schedule_is_valid_and_beats_karras_on_held_out_noises(solver, nfe):
    teacher, z, z_held = mixture(), noises(64, 2, 0), noises(64, 2, 1)
    sigmas, info = optimise_schedule(teacher, solver, nfe, z, iters=60, return_info=True)
    steps = sigmas_for_nfe(solver, nfe).numel() - 1
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all() and sigmas[-2] >= 0.002
    counted = CountingDenoiser(teacher)
    sample = {"heun": sample_heun, "euler": sample_euler}[solver]
    sample(counted, 80.0 * z, sigmas, **options_for_nfe(solver, nfe))
    assert counted.nfe == nfe
    assert info["loss_after"] <= info["loss_before"] == min(info["loss_init"].values())
    reference = reference_solution(teacher, 80.0 * z_held, 80.0)[0][0]
    options = options_for_nfe(solver, nfe)
    held_karras = schedule_mse(teacher, solver, sigmas_for_nfe(solver, nfe), z_held, reference, options=options)
    held_optimised = schedule_mse(teacher, solver, sigmas, z_held, reference, options=options)
    assert held_optimised < 0.5 * held_karras, (held_optimised, held_karras)


def test_optimiser_bad_input_names_the_problem():
    teacher, z = mixture(), noises(4, 2, 0)
    with pytest.raises(ValueError, match="euler.*nfe"):
        optimise_schedule(teacher, "euler", 0, z)
    with pytest.raises(ValueError, match="unknown solver"):
        optimise_schedule(teacher, "rk4", 3, z)
    with pytest.raises(ValueError, match="optimise_schedule: reference"):
        optimise_schedule(teacher, "euler", 3, z, reference=z[:2])
    with pytest.raises(ValueError, match="optimise_schedule: need 0 < sigma_min"):
        optimise_schedule(teacher, "euler", 3, z, sigma_min=100.0)
    with pytest.raises(ValueError, match="optimise_schedule: inits"):
        optimise_schedule(teacher, "euler", 3, z, inits=("cosine",))


def test_save_and_load_round_trip_through_from_file(tmp_path):
    sigmas = schedule_from_logits(torch.tensor([0.0, 0.3, -0.2, 1.0]), 0.002, 80.0)
    meta = {"solver": "heun", "nfe": 5, "teacher": "gmm:2:8", "mse_before": 0.5, "mse_after": 0.01}
    path = save_schedule(sigmas, tmp_path / "dir" / "schedule.txt", meta)
    assert torch.equal(from_file(path), sigmas)
    loaded, loaded_meta = load_schedule(path)
    assert torch.equal(loaded, sigmas) and loaded_meta == meta
    with pytest.raises(ValueError, match="json"):
        save_schedule(sigmas, tmp_path / "schedule.json", meta)
    with pytest.raises(ValueError, match="decreasing"):
        save_schedule(torch.tensor([1.0, 2.0, 0.0]), tmp_path / "bad.txt")


def test_cli_fits_writes_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "schedule.txt"
    optimise_main(["gmm:2:4", "--solver", "euler", "--nfe", "3", "--n", "16", "--holdout", "16", "--iters", "20",
                   "--out", str(out), "--device", "cpu"])
    assert "wrote" in capsys.readouterr().out
    sigmas, meta = load_schedule(out)
    assert sigmas.shape == (4,) and meta["solver"] == "euler" and meta["nfe"] == 3 and meta["teacher"] == "gmm:2:4"
    assert meta["mse_after"] <= meta["mse_before"] and "holdout_mse_optimised" in meta
    for args, text in [(["gmm:2"], "gmm:D:K"), ([str(tmp_path / "missing")], "missing"),
                       (["gmm:2:4", "--out", "s.json"], "json"), (["gmm:2:4", "--solver", "rk4"], "rk4"),
                       (["gmm:2:4", "--nfe", "0"], "nfe"), (["gmm:2:4", "--n", "0"], "--n")]:
        with pytest.raises(SystemExit) as exit_info:
            optimise_main(args + (["--out", str(tmp_path / "x.txt")] if "--out" not in args else []))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error:") and text in err and err.count("\n") == 1


def _sample_needs_three(denoiser, x, sigmas, cond=None, callback=None, return_trajectory=False):
    """Euler under another name that refuses budgets below 3 NFE."""
    return sample_euler(denoiser, x, sigmas, cond, callback, return_trajectory)


def _three_or_more(nfe):
    if nfe < 3:
        raise ValueError(f"needs_three: nfe must be >= 3, got {nfe}")
    return nfe


_sample_needs_three.steps_for_nfe = _three_or_more
_sample_needs_three.options_for_nfe = lambda nfe: {} if _three_or_more(nfe) else {}


def test_small_benchmark_writes_its_tables(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None  # optional: the `bench` extra
    result = bench_solvers(tmp_path / "solvers", dims=(2,), nfes=(1, 3), n=16, opt_n=16, opt_iters=8,
                           solvers={"euler": sample_euler, "needs_three": _sample_needs_three},
                           overhead_nfe=3, overhead_shape=(2, 3, 4, 4), overhead_repeats=1, plot=plot,
                           log=lambda *args: None)
    gmm = [r for r in result["rows"] if r["part"] == "gmm"]
    assert {(r["solver"], r["nfe"], r["schedule"]) for r in gmm} == {
        ("euler", 1, "karras"), ("euler", 1, "optimised"), ("euler", 3, "karras"), ("euler", 3, "optimised"),
        ("needs_three", 3, "karras"), ("needs_three", 3, "optimised")}
    assert [(s["solver"], s["nfe"]) for s in result["skipped"]] == [("needs_three", 1)]
    euler3 = {r["schedule"]: r["rmse"] for r in gmm if r["solver"] == "euler" and r["nfe"] == 3}
    assert 0 < euler3["karras"] < 1 and euler3["optimised"] > 0
    reference = result["references"][0]
    assert reference["reference_ok"] and reference["tolerance_change"] < 1e-8 and reference["floor_rmse"] > 0
    assert {r["solver"] for r in result["rows"] if r["part"] == "overhead"} == {"euler", "needs_three"}
    with open(tmp_path / "solvers.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result["rows"])
    assert json.loads((tmp_path / "solvers.json").read_text())["skipped"][0]["solver"] == "needs_three"
    text = (tmp_path / "solvers.md").read_text()
    assert "| euler |" in text and "needs_three (gmm 2d K=8) at NFE 1" in text
    assert (tmp_path / "solvers.png").is_file() == plot
