"""The trajectory store: saved sigmas, fingerprints, rollouts equal to the solver's, exact resume, clear errors on
mismatched requests and damaged shards, sub-selection of saved times, float16, and the make_pairs command."""
import copy

import numpy as np
import pytest
import torch

from data.mixtures import GaussianMixtureData
from data.trajectories import TrajectoryStore, TrajectoryWriter, fingerprint, saved_indices, saved_sigmas
from models.analytic import GaussianMixtureDenoiser
from models.mlp import MLP
from runs import make_pairs
from runs.make_pairs import generate_rollouts
from solvers import SOLVERS, karras, options_for_nfe, sigmas_for_nfe

SHAPE = (3,)


@pytest.fixture(scope="module")
def teacher():
    return GaussianMixtureDenoiser.from_data(GaussianMixtureData(dim=3, components=3, n=8, seed=1))


def rollouts(path, teacher, **overrides):
    settings = dict(solver="heun", nfe=5, n=10, shard_size=4, batch_size=3, shape=SHAPE, save_sigmas=2,
                    num_classes=3, seed=7, progress=False)
    return generate_rollouts(path, teacher, **{**settings, **overrides})


def solve(teacher, z, labels, solver="heun", nfe=5):
    """The teacher's trajectory [N + 1, B, ...] straight from the solver, as make_pairs runs it (float64 state)."""
    grid = sigmas_for_nfe(solver, nfe)
    cond = {"class_labels": labels} if labels is not None else None
    return SOLVERS[solver](teacher, z.double() * grid[0], grid, cond=cond, return_trajectory=True,
                           **options_for_nfe(solver, nfe))[1]


def shard_files(path):
    return {str(f.relative_to(path)): (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(path.glob("shard_*/*"))}


def test_saved_sigmas_int_k_is_evenly_spaced_ends_at_zero_and_never_takes_the_start():
    grid = karras(6)
    assert saved_indices(grid, 1) == [6]
    assert saved_indices(grid, 3) == [2, 4, 6]
    assert saved_indices(grid, 4) == [2, 3, 5, 6]  # round(0, 1.5, 3, 4.5, 6)[1:], halves up
    assert saved_indices(grid, 6) == [1, 2, 3, 4, 5, 6]
    sigmas = saved_sigmas(grid, 3)
    assert sigmas.dtype == torch.float64 and torch.equal(sigmas, grid[[2, 4, 6]]) and sigmas[-1] == 0
    for steps in range(1, 13):
        for k in range(1, steps + 1):
            indices = saved_indices(karras(steps), k)
            assert len(set(indices)) == k and indices == sorted(indices) and indices[0] >= 1 and indices[-1] == steps
    with pytest.raises(ValueError, match="save_sigmas=7 is more than the 6 states"):
        saved_indices(grid, 7)
    with pytest.raises(ValueError, match=">= 1"):
        saved_indices(grid, 0)
    with pytest.raises(ValueError, match="strictly decreasing schedule ending in 0"):
        saved_indices(grid[:-1], 1)


def test_saved_sigmas_list_snaps_to_the_grid_and_refuses_duplicates():
    grid = karras(6)
    asked = [0.0, float(grid[2]) * 1.02, float(grid[4])]  # any order, off-grid values snap
    assert saved_indices(grid, asked) == [2, 4, 6]
    assert torch.equal(saved_sigmas(grid, asked), grid[[2, 4, 6]])
    with pytest.raises(ValueError, match="both snap to the grid sigma"):
        saved_indices(grid, [float(grid[2]), float(grid[2]) * 1.001])
    with pytest.raises(ValueError, match="int K or a list of sigmas"):
        saved_indices(grid, "4")


def test_fingerprint_is_equal_for_a_copy_and_changes_with_one_weight(teacher):
    net = MLP(dim=2, hidden=8, num_blocks=1)
    twin = copy.deepcopy(net)
    assert fingerprint(net) == fingerprint(twin) and len(fingerprint(net)) == 64
    with torch.no_grad():
        twin.inp.weight[0, 0] += 1e-3
    assert fingerprint(net) != fingerprint(twin)
    assert fingerprint(teacher) == fingerprint(copy.deepcopy(teacher))
    other = copy.deepcopy(teacher)
    other.means[0, 0] += 1e-9
    assert fingerprint(other) != fingerprint(teacher)


@pytest.mark.parametrize("num_classes", [3, 0])
def test_store_holds_the_solvers_states_at_the_saved_sigmas(tmp_path, teacher, num_classes):
    store = rollouts(tmp_path / "store", teacher, num_classes=num_classes)
    grid = sigmas_for_nfe("heun", 5)
    keep = saved_indices(grid, 2)
    assert len(store) == 10 and store.shape == SHAPE and store.num_classes == num_classes
    assert store.sigmas.dtype == torch.float64 and torch.equal(store.sigmas, grid[keep])
    assert store.manifest["num_shards"] == 3 and [s["count"] for s in store.manifest["shards"]] == [4, 4, 2]
    assert store.manifest["grid"] == grid.tolist() and store.manifest["solver_options"] == {"euler_first_steps": 0}
    z, xs, labels = store.batch(range(10))
    assert z.dtype == xs.dtype == torch.float32 and labels.dtype == torch.int64 and xs.shape == (10, 2, 3)
    item = store[7]
    assert torch.equal(item[0], z[7]) and torch.equal(item[1], xs[7]) and item[2] == labels[7]
    trajectory = solve(teacher, z, labels if num_classes else None)
    torch.testing.assert_close(xs, trajectory[keep].transpose(0, 1).float(), rtol=0, atol=1e-6)
    if num_classes:
        assert set(labels.tolist()) == {0, 1, 2}
        unconditional = solve(teacher, z, None)[-1].float()
        assert (xs[:, -1] - unconditional).abs().amax(1).min() > 1e-3  # every rollout followed its label
    else:
        assert not labels.any()
    assert all(isinstance(a, np.memmap) for a in store._arrays(2))


def test_a_killed_run_resumes_to_the_same_store_keeping_finished_shards(tmp_path, teacher, monkeypatch):
    straight = rollouts(tmp_path / "straight", teacher, n=12, shard_size=3)
    write = TrajectoryWriter.write
    calls = []

    def killed_after_two(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        write(self, *args)

    monkeypatch.setattr(TrajectoryWriter, "write", killed_after_two)
    path = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        rollouts(path, teacher, n=12, shard_size=3)
    monkeypatch.setattr(TrajectoryWriter, "write", write)
    with pytest.raises(ValueError, match="incomplete: 2 of 4 shards written .missing shard 2 and more.; resume"):
        TrajectoryStore(path)
    assert len(TrajectoryStore(path, allow_incomplete=True)) == 6
    finished = shard_files(path)
    (path / ".shard_00002.tmp").mkdir()  # a half-written shard, and a renamed one the manifest never recorded
    (path / "shard_00003").mkdir()
    (path / "shard_00003" / "z.npy").write_bytes(b"junk")
    resumed = rollouts(path, teacher, n=12, shard_size=3)
    after = shard_files(path)
    assert all(after[name] == finished[name] for name in finished)  # untouched: same mtime and bytes
    assert {name: data for name, (_, data) in after.items()} == \
           {name: data for name, (_, data) in shard_files(tmp_path / "straight").items()}
    assert resumed.manifest["shards"] == straight.manifest["shards"] and not list(path.glob(".*tmp*"))


def test_n_may_grow_but_not_shrink(tmp_path, teacher):
    path = tmp_path / "store"
    rollouts(path, teacher, n=6)  # shards of 4 and 2
    first = shard_files(path)["shard_00000/xs.npy"]
    grown = rollouts(path, teacher, n=10)
    assert shard_files(path)["shard_00000/xs.npy"] == first
    assert grown.manifest["shards"] == rollouts(tmp_path / "straight", teacher, n=10).manifest["shards"]
    with pytest.raises(ValueError, match="holds n=10 rollouts; asking for fewer"):
        rollouts(path, teacher, n=8)


def test_a_different_request_or_teacher_is_refused_and_the_store_left_alone(tmp_path, teacher):
    path = tmp_path / "store"
    rollouts(path, teacher)
    manifest = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(nfe: 5 there, 7 asked"):
        rollouts(path, teacher, nfe=7)
    with pytest.raises(ValueError, match="other settings .seed"):
        rollouts(path, teacher, seed=8)
    other = copy.deepcopy(teacher)
    other.means.mul_(2)
    with pytest.raises(ValueError, match="made by another teacher"):
        rollouts(path, other)
    assert (path / "manifest.json").read_bytes() == manifest
    with pytest.raises(ValueError, match="store made by another teacher"):
        TrajectoryStore(path, fingerprint=fingerprint(other))
    assert len(TrajectoryStore(path, fingerprint=fingerprint(teacher))) == 10


def test_corrupt_or_truncated_shards_are_a_one_line_error_naming_the_file(tmp_path, teacher):
    path = tmp_path / "store"
    rollouts(path, teacher)
    xs_file = path / "shard_00001" / "xs.npy"
    data = bytearray(xs_file.read_bytes())
    data[-3] ^= 0xFF
    xs_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard_00001/xs.npy is corrupt: its sha256") as error:
        TrajectoryStore(path)
    assert "\n" not in str(error.value)
    assert len(TrajectoryStore(path, verify=False)) == 10  # only the checksum sees a flipped data byte
    z_file = path / "shard_00002" / "z.npy"
    z_file.write_bytes(z_file.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"shard_00002/z.npy is truncated or corrupt: \d+ bytes"):
        TrajectoryStore(path, verify=False)


def test_select_serves_a_subset_of_the_saved_sigmas(tmp_path, teacher):
    store = rollouts(tmp_path / "store", teacher, nfe=9, save_sigmas=5)  # heun NFE 9: 5 steps, all 5 states kept
    grid = sigmas_for_nfe("heun", 9)
    z, xs, labels = store.batch(range(10))
    for k in range(1, 6):
        view = store.select(k)
        assert torch.equal(view.sigmas, saved_sigmas(grid, k))  # the same times a K-state store would hold
        columns = [i - 1 for i in saved_indices(grid, k)]
        assert torch.equal(view.batch(range(10))[1], xs[:, columns]) and torch.equal(view[3][1], xs[3, columns])
    picked = store.select([float(grid[4]), 0.0, float(grid[2])])
    assert torch.equal(picked.sigmas, grid[[2, 4, 5]])
    assert torch.equal(picked.batch([0, 9])[1], xs[[0, 9]][:, [1, 3, 4]])
    assert torch.equal(picked.select(1).sigmas, grid[[5]]) and len(store.sigmas) == 5
    with pytest.raises(ValueError, match="K larger than the stored trajectory"):
        store.select(6)
    with pytest.raises(ValueError, match="not among the stored sigmas"):
        store.select([1.2345])


def test_float16_stores_half_precision_states_and_serves_float32(tmp_path, teacher):
    full = rollouts(tmp_path / "full", teacher)
    half = rollouts(tmp_path / "half", teacher, dtype="float16")
    assert np.load(tmp_path / "half" / "shard_00000" / "xs.npy", mmap_mode="r").dtype == np.float16
    z16, xs16, _ = half.batch(range(10))
    z32, xs32, _ = full.batch(range(10))
    assert xs16.dtype == torch.float32 and torch.equal(z16, z32) and torch.equal(xs16, xs32.half().float())


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A conditional MLP teacher on the Gaussian mixture after 2 training steps."""
    from runs.train import make_config, parse_args, train
    run = tmp_path_factory.mktemp("runs") / "teacher"
    config = make_config(parse_args(["--backbone", "mlp", "--data", "gmm", "data.dim=2", "data.components=4",
                                     "data.n=64", "backbone.hidden=16", "backbone.num_blocks=1", "train.steps=2",
                                     "train.batch_size=16", "train.conditional=true", "train.device=cpu"]))[0]
    train(config, run)
    return run


def test_make_pairs_cli_rolls_out_a_trained_teacher(teacher_run, tmp_path, run_cli):
    from runs.build import load_run
    out = tmp_path / "pairs"
    result = run_cli("runs.make_pairs", "--teacher", teacher_run, "--nfe", 3, "--n", 6, "--save-sigmas", 2,
                     "--out", out, "--shard-size", 4, "--batch", 4, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "wrote 6 rollouts (heun, NFE 3, saved sigmas [" in result.stdout
    teacher = load_run(teacher_run)[1].denoiser()
    store = TrajectoryStore(out, fingerprint=fingerprint(teacher))
    assert len(store) == 6 and store.shape == (2,) and store.num_classes == 4
    z, xs, labels = store.batch(range(6))
    assert labels.min() >= 0 and labels.max() < 4
    trajectory = solve(teacher, z, labels, nfe=3)
    torch.testing.assert_close(xs, trajectory[saved_indices(sigmas_for_nfe("heun", 3), 2)].transpose(0, 1).float(),
                               rtol=0, atol=1e-6)
    assert str(teacher_run.resolve()) in store.manifest["description"]


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{tmp}/nothing"], "no checkpoint at"),
    (["--save-sigmas", "1.5,x"], "--save-sigmas must be an integer K or a comma-separated list"),
    (["--save-sigmas", "9"], "save_sigmas=9 is more than the 2 states"),
])
def test_make_pairs_bad_input_is_one_line_and_exit_2(teacher_run, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--teacher", str(teacher_run), "--nfe", "3", "--n", "4", "--out", str(tmp_path / "pairs"),
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        make_pairs.main(base + args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


def test_stochastic_solvers_are_refused_for_targets(tmp_path):
    """Distillation targets are the teacher's ODE map (METHODS E.12): an ancestral / SDE sampler is an error."""
    teacher = GaussianMixtureDenoiser.from_data(GaussianMixtureData(dim=2, components=2, n=8))
    with pytest.raises(ValueError, match="deterministic solver.*'euler_ancestral' is stochastic"):
        generate_rollouts(tmp_path / "s", teacher, solver="euler_ancestral", nfe=4, n=8, shape=(2,), progress=False)
    assert not (tmp_path / "s").exists()
