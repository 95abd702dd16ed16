"""Mode-coverage metrics: k-NN precision / recall / density / coverage (metrics.precision_recall), the predicted-class
histogram (metrics.classes), their MNIST wrappers and runs.eval's --metric lists and mnist_report."""
import json
import math

import numpy as np
import pytest
import torch

from metrics import METRICS, mnist_metrics
from metrics.classes import class_coverage, class_histogram, kl_divergence
from metrics.mnist_net import CHECKPOINT_NAME, save_mnist_feature_net
from metrics.precision_recall import knn_radii, manifold_metrics
from runs.eval import main as eval_main
from runs.eval import mnist_report


def gaussian(n, d, seed, scale=1.0, shift=0.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def brute_force(fake, real, k):
    """The definitions written out with whole numpy distance matrices (Kynkaanniemi et al. eq. 1-2, Naeem et al.)."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    real_r = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_r = np.sort(dist(fake, fake), axis=1)[:, k]
    cross = dist(fake, real)  # [M, N]
    inside = cross <= real_r[None, :]
    return {"precision": inside.any(1).mean(), "recall": (cross <= fake_r[:, None]).any(0).mean(),
            "density": inside.sum() / (k * len(fake)), "coverage": inside.any(0).mean()}


# ---------------------------------------------------------------- precision / recall / density / coverage

def test_hand_computed_one_dimensional_case_and_ties_count_as_inside():
    # real 0,1,2,3 with k=1: radii 1 each; fake 0.5 and 5: the two fakes are each other's neighbour, radii 4.5.
    # 0.5 lies in the balls of 0 and 1, 5 in none -> precision 1/2, density 2 / (1 * 2), coverage 2/4; every real
    # point is within 4.5 of 0.5 -> recall 1.
    got = manifold_metrics([[0.5], [5.0]], [[0.0], [1.0], [2.0], [3.0]], k=1)
    assert got == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}
    # 3 is exactly at distance r = 1 from real 2: inside (<=, eq. 1)
    assert manifold_metrics([[3.0], [10.0]], [[0.0], [1.0], [2.0]], k=1)["precision"] == 0.5
    torch.testing.assert_close(knn_radii(torch.tensor([[0.0], [1.0], [3.0], [7.0]]), k=2),
                               torch.tensor([3.0, 2.0, 3.0, 6.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_brute_force_definitions_for_any_block_size(dtype):
    fake, real = gaussian(150, 5, 0, scale=1.3), gaussian(120, 5, 1, shift=0.3)
    expected = brute_force(fake, real, k=3)
    for block in (1, 700, 10 ** 6):  # one row per block, several rows, everything at once
        got = manifold_metrics(fake, real, k=3, dtype=dtype, block_elements=block)
        assert got == pytest.approx(expected, abs=1e-12), block


def test_identical_sets_give_precision_recall_coverage_one_and_density_k_plus_one_over_k():
    x = gaussian(500, 16, 2, scale=4, shift=3)
    for k in (1, 3):
        got = manifold_metrics(x, x, k=k, dtype=torch.float64)
        assert got["precision"] == got["recall"] == got["coverage"] == 1.0
        # each ball holds its centre and its k neighbours: sum_i |B_i| = N (k + 1), up to rounding on the surface
        assert got["density"] == pytest.approx((k + 1) / k, abs=0.01)


def expected_coverage(m, n, k):
    """E[coverage] of m fakes and n reals from the same continuous distribution (Naeem et al. 2020, section 3.2):
    a real ball is empty when the k points nearest its centre (others than it) are all real, which by exchangeability
    has probability (n-1)...(n-k) / ((m+n-1)...(m+n-k)), whatever the distribution and dimension."""
    return 1 - math.prod(n - i for i in range(1, k + 1)) / math.prod(m + n - i for i in range(1, k + 1))


@pytest.mark.parametrize("m, n, k, d, density_tol", [(1000, 1000, 3, 4, 0.05), (1000, 250, 3, 8, 0.15),
                                                    (600, 600, 5, 2, 0.05)])
def test_same_distribution_matches_the_expected_coverage_and_density_one(m, n, k, d, density_tol):
    got = manifold_metrics(gaussian(m, d, 20 + d), gaussian(n, d, 30 + d), k=k)
    assert got["coverage"] == pytest.approx(expected_coverage(m, n, k), abs=0.035)  # 1 - 1/2^k when m = n
    # E[density] = 1: Y_j is in X_i's ball with probability k / n; one draw's spread grows with d and with m / n
    assert got["density"] == pytest.approx(1, abs=density_tol)
    assert got["precision"] > 0.75 and got["recall"] > 0.75


def test_disjoint_far_apart_gaussians_give_zero():
    got = manifold_metrics(gaussian(300, 8, 3), gaussian(300, 8, 4, shift=50.0))
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def two_mode_real(n=1000, d=2, seed=5):
    """n points, exactly half around +10 e1 and half around -10 e1 (unit variance)."""
    signs = torch.ones(n, 1, dtype=torch.float64)
    signs[n // 2:] = -1
    return gaussian(n, d, seed) + signs * torch.eye(d, dtype=torch.float64)[0] * 10


def test_generator_covering_half_of_a_two_mode_mixture_has_high_precision_and_recall_near_half():
    got = manifold_metrics(gaussian(1000, 2, 6, shift=torch.tensor([10.0, 0.0])), two_mode_real())
    assert got["precision"] > 0.95
    assert 0.44 < got["recall"] <= 0.5 and 0.44 < got["coverage"] <= 0.5  # the other mode's half is never reached


def test_recall_and_coverage_count_the_modes_kept():
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = 10 * torch.stack([angles.cos(), angles.sin()], 1).double()
    real = gaussian(800, 2, 7, scale=0.5) + centres.repeat_interleave(100, 0)
    results = {}
    for kept in (8, 4, 2):  # 800 samples spread over the first `kept` modes
        fake = gaussian(800, 2, 8 + kept, scale=0.5) + centres[:kept].repeat_interleave(800 // kept, 0)
        results[kept] = got = manifold_metrics(fake, real)
        assert got["precision"] > 0.9
        assert got["recall"] == pytest.approx(kept / 8, abs=0.06)
        # a kept mode's 100 real balls vs its 800 / kept fakes: the expected coverage of identical distributions
        assert got["coverage"] == pytest.approx(kept / 8 * expected_coverage(800 // kept, 100, 3), abs=0.05)
    assert results[8]["recall"] > results[4]["recall"] > results[2]["recall"]


def test_wider_than_data_keeps_recall_and_loses_precision():
    real = gaussian(1000, 2, 9)
    same = manifold_metrics(gaussian(1000, 2, 10), real)
    wide = manifold_metrics(gaussian(1000, 2, 11, scale=2.0), real)
    assert wide["recall"] > 0.95 and same["recall"] > 0.95
    assert wide["precision"] < 0.9 < same["precision"] - 0.05
    narrow = manifold_metrics(gaussian(1000, 2, 12, scale=0.5), real)  # the mode-seeking case: the other way round
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.9 and narrow["coverage"] < 0.7


def test_ranks_known_better_samples_better():
    real, base = gaussian(1000, 2, 13), gaussian(1000, 2, 14)
    noise = gaussian(1000, 2, 15)
    # fidelity: added noise widens the samples, so precision (and density) fall with its size
    small, large = (manifold_metrics(base + s * noise, real) for s in (0.1, 1.0))
    assert small["precision"] > large["precision"] + 0.02 and small["density"] > large["density"]
    # both: a shift moves the samples off the data, so all four fall with its size
    near, middle, far = (manifold_metrics(base + shift, real) for shift in (0.2, 1.5, 3.0))
    for key in ("precision", "recall", "density", "coverage"):
        assert near[key] > middle[key] > far[key] and near[key] > far[key] + 0.5, key


def test_bad_inputs_are_one_line_value_errors():
    x = gaussian(10, 3, 16)
    cases = [((x[:3], x), "more than 3 points"), ((x, x[:3]), "more than 3 points"),
             ((x, x[:, :2]), "same feature dimension"), ((x[None], x), r"\[N, D\]"),
             ((torch.full((5, 3), float("nan")), x), "NaN"), ((x, x, 0), "positive integer")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            manifold_metrics(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="dtype"):
        manifold_metrics(x, x, dtype=torch.float16)


# ---------------------------------------------------------------- class histogram

def test_class_coverage_closed_forms():
    one = class_coverage(torch.full((50,), 7), reference_labels=torch.arange(10).repeat(5))
    assert one["classes_covered"] == 1 and one["class_shares"][7] == 1.0
    assert one["class_tv_uniform"] == pytest.approx(0.9) and one["class_kl_uniform"] == pytest.approx(math.log(10))
    assert one["class_tv_reference"] == pytest.approx(0.9) and one["reference_classes_covered"] == 10
    uniform = class_coverage(np.arange(10).repeat(3))
    assert uniform["classes_covered"] == 10 and uniform["class_tv_uniform"] == pytest.approx(0, abs=1e-12)
    assert uniform["class_kl_uniform"] == pytest.approx(0, abs=1e-12) and "class_kl_reference" not in uniform
    # shares 0.5, 0.3, 0.15, 0.05: the default threshold 1 / (2 * 10) = 0.05 counts the last one (>=)
    skewed_labels = [0] * 10 + [1] * 6 + [2] * 3 + [3]
    skewed = class_coverage(torch.tensor(skewed_labels))
    assert skewed["classes_covered"] == 4 and class_coverage(skewed_labels, min_share=0.1)["classes_covered"] == 3
    assert skewed["class_kl_uniform"] == pytest.approx(sum(p * math.log(10 * p) for p in (0.5, 0.3, 0.15, 0.05)))
    # over 4 classes: TV = (|0.5 - 0.25| + |0.3 - 0.25| + |0.15 - 0.25| + |0.05 - 0.25|) / 2
    assert class_coverage(skewed_labels, num_classes=4)["class_tv_uniform"] == pytest.approx(0.3)
    assert kl_divergence(class_histogram([0, 1], 3), class_histogram([0, 0], 3)) == math.inf


def test_class_coverage_errors():
    for labels, message in (([10], r"\[0, 10\)"), ([-1], r"\[0, 10\)"), ([0.5], "integers"), ([], "integers")):
        with pytest.raises(ValueError, match=message):
            class_histogram(labels)
    with pytest.raises(ValueError, match="min_share"):
        class_coverage([0, 1], min_share=0)


# ---------------------------------------------------------------- MNIST (a tiny classifier trained here)

# the `mnist` and `tiny_net` fixtures: tests/conftest.py

def test_mnist_metrics_see_noise_and_dropped_classes(tiny_net, mnist):
    images, labels = mnist.images.numpy(), mnist.labels.numpy()
    real, other = images[2000:2300], images[2300:2600]
    rng = np.random.default_rng(0)
    def noisy(s):
        return np.clip(other.astype(int) + rng.integers(-s, s + 1, other.shape), 0, 255).astype(np.uint8)
    pool = np.arange(2300, 8000)
    five = images[pool[np.isin(labels[pool], [0, 1, 3, 4, 9])][:300]]  # the five classes the tiny net knows best
    ones = images[pool[labels[pool] == 1][:150]]
    got = {name: mnist_metrics(samples, real, net=tiny_net)
           for name, samples in (("other", other), ("small", noisy(40)), ("large", noisy(120)), ("five", five),
                                 ("ones", ones))}
    assert got["other"]["precision"] > 0.85 and got["other"]["recall"] > 0.85 and got["other"]["classes_covered"] == 10
    for key in ("precision", "recall"):  # pixel noise moves digits off the feature manifold: both fall
        assert got["small"][key] > got["large"][key], key
    assert got["small"]["fid_mnist"] < got["large"]["fid_mnist"]
    assert got["five"]["precision"] > 0.85 and got["five"]["classes_covered"] == 5
    assert got["five"]["class_kl_uniform"] == pytest.approx(math.log(2), abs=0.15)  # half the classes, evenly
    assert got["ones"]["classes_covered"] == 1 and got["ones"]["class_kl_uniform"] > 2.0  # log 10 = 2.30
    assert got["other"]["coverage"] > got["five"]["coverage"] > got["ones"]["coverage"]
    assert got["other"]["recall"] > got["five"]["recall"] + 0.15
    only_pr = METRICS["precision-recall-mnist"](ones, real, net=tiny_net)
    assert only_pr == {key: got["ones"][key] for key in ("precision", "recall", "density", "coverage")}


def test_mnist_report_takes_float_tensors_and_checks_n(tiny_net, mnist):
    samples = mnist.images[2400:2700].float() / 127.5 - 1  # what a sampler returns
    report = mnist_report(samples, n=200, net=tiny_net)
    assert report["n"] == 200 and {"fid_mnist", "precision", "recall", "classes_covered"} <= set(report)
    assert report == mnist_report(mnist.images[2400:2600].numpy(), net=tiny_net)  # uint8 in, same n, same digits
    for n, message in ((3, "more than k=3"), (301, "at most the 300 samples")):
        with pytest.raises(ValueError, match=message):
            mnist_report(samples, n=n, net=tiny_net)


# ---------------------------------------------------------------- runs.eval

@pytest.fixture
def cached_net(tiny_net, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    save_mnist_feature_net(tiny_net, tmp_path / "cache" / CHECKPOINT_NAME)
    return tmp_path


def test_eval_prints_a_metric_list_and_writes_json(cached_net, capsys):
    eval_main(["--floor", "--n", "200", "--metric", "fid-mnist,precision-recall-mnist,class-histogram-mnist"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("fid-mnist ") and "200 vs 200" in lines[2]
    assert lines[1].startswith("precision-recall-mnist: precision ") and "recall " in lines[1]
    assert lines[2].startswith("class-histogram-mnist: classes_covered ")
    eval_main(["--floor", "--n", "200", "--metric", "precision-recall-mnist", "--k", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 5 and result["value"] == result["values"]["precision-recall-mnist"]
    assert 0.5 < result["value"]["precision"] <= 1 and 0.5 < result["value"]["recall"] <= 1
    # a list goes through the feature net once (runs.eval.score_all) and gives the same numbers as one at a time
    eval_main(["--floor", "--n", "200", "--metric", "class-histogram-mnist,precision-recall-mnist", "--k", "5",
               "--json"])
    combined = json.loads(capsys.readouterr().out)
    assert "value" not in combined and combined["values"]["precision-recall-mnist"] == result["value"]
    assert combined["values"]["class-histogram-mnist"]["classes_covered"] >= 9
    g = np.random.default_rng(0)
    np.savez(cached_net / "a.npz", samples=g.normal(size=(100, 2)).astype(np.float32))
    np.savez(cached_net / "b.npz", samples=g.normal(size=(100, 2)) + 50)
    eval_main([str(cached_net / "a.npz"), "--metric", "precision-recall,swd", "--ref", str(cached_net / "b.npz"),
               "--json"])
    values = json.loads(capsys.readouterr().out)["values"]
    assert values["precision-recall"]["precision"] == values["precision-recall"]["recall"] == 0 and values["swd"] > 40


@pytest.mark.parametrize("args, message", [
    (["--metric", "fid-mnist,nope"], "unknown metric 'nope'; known: class-histogram-mnist, .*precision-recall"),
    (["--metric", "precision-recall", "--n", "3"], "more than 3 points"),
    (["--metric", "precision-recall", "--k", "0"], "--k"),
    (["--metric", "swd,swd"], "twice"),
    (["--metric", "precision-recall-mnist,fid-inception", "--n", "20"], "Inception weights not found"),  # not MNIST net
])
def test_eval_bad_input_exits_2_with_one_line(cached_net, capsys, monkeypatch, args, message):
    monkeypatch.delenv("FASTDIFF_INCEPTION", raising=False)
    with pytest.raises(SystemExit) as info:
        eval_main(["--floor", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


def test_eval_cli_exit_code_2_in_a_subprocess(run_cli, tmp_path):
    np.savez(tmp_path / "v.npz", samples=np.zeros((10, 3), np.float32))
    np.savez(tmp_path / "w.npz", samples=np.zeros((10, 4), np.float32))
    done = run_cli("runs.eval", tmp_path / "v.npz", "--metric", "precision-recall", "--ref", tmp_path / "w.npz")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "not the same kind of data" in done.stderr
