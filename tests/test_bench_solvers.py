"""The solver benchmark's machinery: reference caching, shards run in worker processes and merged, merging refuses
results of different setups."""
import json

import pytest

from runs import bench_solvers
from runs.bench_solvers import bench_solvers as run_bench
from runs.bench_solvers import cached, parser
from runs.bench_solvers_shards import merge_results, worker_argv

SMALL = ["--dims", "2", "--nfes", "3", "4", "--n", "8", "--opt-n", "8", "--opt-iters", "2", "--overhead-repeats", "0",
         "--device", "cpu"]


def test_cached_computes_once_and_reloads(tmp_path):
    import torch
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0), "nfe": 7, "none": None}

    first = cached(tmp_path, "key", compute, "cpu")
    second = cached(tmp_path, "key", compute, "cpu")
    assert len(calls) == 1 and second["nfe"] == 7 and second["none"] is None
    assert torch.equal(first["x"], second["x"])
    assert cached(None, "key", compute, "cpu")["nfe"] == 7 and len(calls) == 2  # no folder: no cache


def test_worker_argv_repeats_every_shared_option(tmp_path):
    p = parser()
    args = p.parse_args(SMALL + ["--workers", "3", "--solvers", "euler", "heun", "--mnist-nfes", "3", "32"])
    argv = worker_argv(p, args, "heun", tmp_path / "heun", tmp_path / "cache")
    assert argv[1:3] == ["-m", "runs.bench_solvers"]
    again = p.parse_args(argv[3:])
    assert again.solvers == ["heun"] and again.out == str(tmp_path / "heun") and again.workers == 1
    assert again.overhead_repeats == 0 and again.reference_cache == str(tmp_path / "cache")
    for name in ("dims", "nfes", "n", "opt_n", "opt_iters", "mnist_nfes", "device"):
        assert getattr(again, name) == getattr(args, name), name


def test_shards_in_worker_processes_equal_one_process(tmp_path):
    bench_solvers.main(SMALL + ["--solvers", "euler", "heun", "--out", str(tmp_path / "one")])
    bench_solvers.main(SMALL + ["--solvers", "euler", "heun", "--workers", "2", "--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    key = lambda r: (r["solver"], r["nfe"], r["schedule"])
    assert sorted(map(key, one["rows"])) == sorted(map(key, two["rows"])) and len(one["rows"]) == 8
    for a, b in zip(sorted(one["rows"], key=key), sorted(two["rows"], key=key)):
        assert b["rmse"] == pytest.approx(a["rmse"], rel=1e-9), key(a)
    assert two["references"][0]["tolerance_change"] == one["references"][0]["tolerance_change"]
    assert (tmp_path / "two_shards" / "references").is_dir() and (tmp_path / "two.md").is_file()


def test_merge_joins_rows_and_refuses_other_setups(tmp_path):
    quiet = dict(dims=(2,), nfes=(3,), n=8, opt_n=8, opt_iters=0, overhead_repeats=0, plot=False, log=lambda *a: 0)
    euler = run_bench(tmp_path / "a", solvers=["euler"], **quiet)
    heun = run_bench(tmp_path / "b", solvers=["heun"], **quiet)
    merged = merge_results([euler, heun])
    assert [r["solver"] for r in merged["rows"]] == ["euler", "heun"] and len(merged["references"]) == 1
    assert merged["references"][0]["smallest_rmse"] == min(r["rmse"] for r in merged["rows"])
    other = run_bench(tmp_path / "c", solvers=["heun"], **{**quiet, "n": 16})
    with pytest.raises(ValueError, match="different n"):
        merge_results([euler, other])


def test_unknown_solver_fails_before_any_worker_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_solvers.main(SMALL + ["--solvers", "euler", "nope", "--workers", "2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "x_shards").exists()
