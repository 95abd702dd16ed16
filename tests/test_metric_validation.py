"""metrics/degrade.py (known degradations of real digits), the wide MNIST feature net (metrics/mnist_net_wide.py) and
the metric-validation bench's pieces (runs/bench_metric.py): the checks that a trustworthy MNIST-FID must pass."""
import types

import numpy as np
import pytest
import torch

from metrics.degrade import DEGRADATIONS, blur, degrade, drop_classes, duplicate, gaussian_kernel, gaussian_noise
from metrics.mnist_net_wide import (load_wide_feature_net, random_affine, save_wide_feature_net,
                                    train_wide_classifier)
from runs.bench_metric import FeatureNet, is_monotone, model_separation, seed_spread


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.images.numpy()[:400], mnist.labels.numpy()[:400]


# ---------------------------------------------------------------- degradations

@pytest.mark.parametrize("name,level", [("gaussian_noise", 0.1), ("blur", 1.0), ("duplicate", 0.5)])
def test_each_degradation_keeps_shape_and_dtype_is_seeded_and_level_zero_is_identity(digits, name, level):
    images = digits[0][:50]
    out = degrade(name, images, level, seed=3)
    assert out.shape == images.shape and out.dtype == np.uint8 and out is not images
    assert not np.array_equal(out, images)
    np.testing.assert_array_equal(out, degrade(name, images, level, seed=3))
    np.testing.assert_array_equal(degrade(name, images, 0, seed=3), images)
    np.testing.assert_array_equal(degrade(name, torch.from_numpy(images)[:, 0], level, seed=3), out[:, 0])  # [N, H, W]


def test_gaussian_noise_adds_the_asked_spread_and_stays_in_range(digits):
    images = np.full((200, 1, 28, 28), 128, np.uint8)
    for level in (0.02, 0.1):
        out = gaussian_noise(images, level, seed=0).astype(np.float64)
        assert out.std() / 255 == pytest.approx(level, rel=0.05)
        assert abs(out.mean() - 128) < 0.5
    out = gaussian_noise(digits[0], 1.0, seed=0)
    assert out.min() == 0 and out.max() == 255  # clipped, not wrapped
    assert not np.array_equal(gaussian_noise(digits[0], 0.1, seed=0), gaussian_noise(digits[0], 0.1, seed=1))


def test_blur_preserves_mass_spreads_a_point_and_grows_with_sigma():
    kernel = gaussian_kernel(1.0)
    assert kernel.sum() == pytest.approx(1) and len(kernel) == 7 and kernel.argmax() == 3
    point = np.zeros((1, 1, 28, 28), np.uint8)
    point[0, 0, 14, 14] = 255
    spreads = []
    for sigma in (0.5, 1.0, 2.0):
        out = blur(point, sigma).astype(np.float64)[0, 0]
        assert abs(out.sum() - 255) < 40  # rounding of many small values, nothing lost at the border
        ys, xs = np.mgrid[:28, :28]
        spreads.append(np.sqrt((out * ((ys - 14) ** 2 + (xs - 14) ** 2)).sum() / out.sum() / 2))
        np.testing.assert_array_equal(out, out.T)  # isotropic
    assert spreads[0] < spreads[1] < spreads[2] and spreads[1] == pytest.approx(1.0, rel=0.15)


def test_drop_classes_removes_nested_classes_and_keeps_n(digits):
    images, labels = digits
    previous = set(range(10))
    for level in range(0, 6):
        out, out_labels = drop_classes(images, labels, level, n=150, seed=4)
        assert out.shape == (150, 1, 28, 28) and out.dtype == np.uint8
        present = set(out_labels.tolist())
        assert len(present) == 10 - level and present <= previous  # a higher level drops a superset
        previous = present
        for image, label in zip(out[:5], out_labels[:5]):  # each image keeps its own label
            index = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
            assert label in labels[index]
    same, same_labels = drop_classes(images, labels, 0)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_array_equal(same_labels, labels)
    np.testing.assert_array_equal(drop_classes(images, labels, 3, n=100, seed=1)[0],
                                  degrade("drop_classes", images, 3, seed=1, labels=labels, n=100))


def test_duplicate_keeps_the_asked_number_of_distinct_images(digits):
    images = digits[0][:200]
    for level in (0.25, 0.5, 0.9):
        out = duplicate(images, level, seed=0)
        distinct = len(np.unique(out.reshape(len(out), -1), axis=0))
        assert distinct == round((1 - level) * 200) and out.shape == images.shape
        rows = {row.tobytes() for row in images.reshape(200, -1)}
        assert all(row.tobytes() in rows for row in out.reshape(200, -1))  # only originals, no new images


@pytest.mark.parametrize("call,match", [
    (lambda x, y: degrade("jpeg", x, 1), "unknown degradation 'jpeg'; known: gaussian_noise"),
    (lambda x, y: degrade("gaussian_noise", x, 1.5), r"gaussian_noise level must be in \[0.0, 1.0\]"),
    (lambda x, y: degrade("gaussian_noise", x, -0.1), "must be in"),
    (lambda x, y: degrade("blur", x, 6), r"blur level must be in \[0.0, 5.0\]"),
    (lambda x, y: degrade("blur", x, float("nan")), "must be a number"),
    (lambda x, y: degrade("duplicate", x, 1.0), r"duplicate level must be in \[0.0, 1.0\)"),
    (lambda x, y: degrade("drop_classes", x, 10, labels=y), r"must be in \[0, 9\]"),
    (lambda x, y: degrade("drop_classes", x, 1.5, labels=y), "whole number"),
    (lambda x, y: degrade("drop_classes", x, 1), "needs the images' labels"),
    (lambda x, y: degrade("drop_classes", x, 9, labels=y, n=len(x)), "between 1 and the"),
    (lambda x, y: degrade("blur", x, 1, n=5), "n is for drop_classes only"),
    (lambda x, y: degrade("blur", x.astype(np.float32), 1), "must be uint8"),
    (lambda x, y: degrade("blur", x[:0], 1), "N >= 1"),
])
def test_bad_input_is_a_one_line_value_error(digits, call, match):
    assert set(DEGRADATIONS) == {"gaussian_noise", "blur", "drop_classes", "duplicate"}
    with pytest.raises(ValueError, match=match) as error:
        call(*digits)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the metric on degraded digits


@pytest.fixture(scope="module")
def shipped(mnist):
    from metrics.mnist_net import load_mnist_feature_net
    return FeatureNet("shipped", load_mnist_feature_net(train_if_missing=False))


@pytest.fixture(scope="module")
def wide(mnist):
    return FeatureNet("wide", load_wide_feature_net(train_if_missing=False))


@pytest.mark.parametrize("net_name", ["shipped", "wide"])
def test_fid_rises_monotonically_with_noise_on_real_digits_and_a_scrambled_sequence_fails(mnist, net_name, request):
    """The check itself: FID of increasingly noisy real digits against other real digits must rise at every step, with
    each shipped feature net; a monotonicity check that could not fail would prove nothing, so a scrambled sequence
    fails it."""
    shipped = request.getfixturevalue(net_name)
    images = mnist.images.numpy()
    reference, other = images[:400], images[400:800]
    levels = [0, 0.05, 0.1, 0.2, 0.4]
    real = shipped.features(reference)
    fids = [shipped.scores(shipped.features(degrade("gaussian_noise", other, level, seed=0)), real,
                           fid_only=True)["fid"] for level in levels]
    assert is_monotone(fids), fids
    assert fids[-1] > 5 * fids[0]
    assert not is_monotone([fids[0], fids[2], fids[1], *fids[3:]])
    assert not is_monotone([1.0, 1.0, 2.0])  # ties are not a rise


def test_seed_spread_is_finite_positive_and_seeded(mnist, shipped):
    images = mnist.images.numpy()[:1000]
    spread = seed_spread(shipped, images[:300], images, n=300, seeds=[0, 1, 2])
    assert set(spread) >= {"fid", "precision", "recall", "classes_covered"}
    for key, (mean, std, values) in spread.items():
        assert np.isfinite(mean) and np.isfinite(std) and std >= 0 and len(values) == 3
    assert spread["fid"][1] > 0  # different reference splits give different FIDs
    assert seed_spread(shipped, images[:300], images, n=300, seeds=[0, 1, 2])["fid"] == spread["fid"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_spread(shipped, images[:300], images, n=300, seeds=[0])


def test_model_separation_reports_ratio_excess_and_z():
    better, worse, floor = (10.0, 1.0, [9, 10, 11]), (30.0, 2.0, [28, 30, 32]), (5.0, 0.5, [4.5, 5, 5.5])
    result = model_separation(better, worse, floor)
    assert result["ratio"] == pytest.approx(3.0) and result["excess_ratio"] == pytest.approx(5.0)
    assert result["z"] == pytest.approx(20 / np.sqrt(5)) and result["separated"]
    assert not model_separation(better, (11.0, 2.0, [9, 11, 13]), floor)["separated"]


# ---------------------------------------------------------------- the wide feature net


def test_wide_net_trains_seeded_saves_and_loads(mnist, tmp_path):
    subset = types.SimpleNamespace(images=mnist.images[:160], labels=mnist.labels[:160])
    state = torch.get_rng_state()
    nets = [train_wide_classifier(subset, epochs=1, seed=s, heldout=32, batch=64, widths=(4, 8, 8), fc_dim=16)
            for s in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(nets[0].fc.weight, nets[1].fc.weight) and not torch.equal(nets[0].fc.weight, nets[2].fc.weight)
    assert nets[0].meta["weights_sha256"] == nets[1].meta["weights_sha256"] != nets[2].meta["weights_sha256"]
    net = nets[0]
    assert net.meta["feature_dim"] == 4 + 8 + 8 + 16 and 0 <= net.meta["heldout_accuracy"] <= 1
    x = torch.from_numpy(mnist.images.numpy()[:300]).float() / 127.5 - 1
    features = net.features(x).double()
    blocks = [features[:, :4], features[:, 4:12], features[:, 12:20], features[:, 20:]]
    fc_total = blocks[3].var(0).sum().item()
    for block in blocks[:3]:  # scaled to the fc block's total variance on the training digits: about so on others
        assert 0.5 < block.var(0).sum().item() / fc_total < 2
    with torch.no_grad():  # the head reads the class off the feature vector exactly as forward does
        torch.testing.assert_close(net.head(torch.relu(net.features(x))), net(x))
    save_wide_feature_net(net, tmp_path / "wide.pt")
    loaded = load_wide_feature_net(tmp_path / "wide.pt", train_if_missing=False)
    torch.testing.assert_close(loaded.features(x), net.features(x))
    assert loaded.meta == net.meta
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a wide MNIST feature net"):
        load_wide_feature_net(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="python -m metrics.mnist_net_wide --out"):
        load_wide_feature_net(tmp_path / "missing.pt", train_if_missing=False)


def test_random_affine_is_seeded_and_keeps_background():
    x = -torch.ones(4, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1
    a, b = (random_affine(x, torch.Generator().manual_seed(0)) for _ in range(2))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and a[:, :, 0, 0].eq(-1).all() and a.max() > 0.5


def test_feature_net_scores_are_the_project_metrics_numbers(mnist, shipped):
    from metrics import mnist_metrics
    images = mnist.images.numpy()
    samples, reference = degrade("blur", images[:300], 0.7), images[300:600]
    ours = shipped.scores(shipped.features(samples), shipped.features(reference))
    theirs = mnist_metrics(samples, reference, net=shipped.net)
    assert ours["fid"] == pytest.approx(theirs["fid_mnist"], rel=1e-9)
    for key in ("precision", "recall", "density", "coverage", "classes_covered", "class_tv_reference"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_bench_writes_tables_that_state_monotonicity_and_separation(mnist, tmp_path):
    """The whole bench on stand-in 'model samples' (real digits, blurred more for the worse models) in its cache."""
    import json
    import runs.bench_metric as bench
    images = mnist.images.numpy()
    n = 150
    for i, (name, solver, nfe) in enumerate(bench.TEACHER_SETS):
        info = {"name": name, "source": "stand-in", "solver": solver, "nfe": nfe, "n": n, "seed": 0,
                "images_per_sec": 1.0, "seconds": 0.0}
        np.savez(tmp_path / bench._cache_name(name, n, 0), images=degrade("blur", images[-n:], [0.0, 1.0, 2.0][i]),
                 info=json.dumps(info))
    summary = bench.bench_metric(n=n, seeds=2, degrade_seeds=2, nets=("shipped",), out=tmp_path / "metric",
                                 cache=tmp_path, students=False,
                                 levels={"gaussian_noise": [0, 0.1, 0.3], "drop_classes": [0, 2]})
    entry = summary["nets"]["shipped"]
    assert entry["degradations"]["gaussian_noise"]["monotone_mean"] is True
    assert [p["separated"] for p in entry["separation"]] == [True, True, True]
    text = (tmp_path / "metric.md").read_text()
    assert "gaussian_noise" in text and "monotone in the mean" in text and "not present; not scored" in text
    assert (tmp_path / "metric.csv").read_text().startswith("net,check,name,level,metric,mean,std,per_seed")
    with pytest.raises(ValueError, match="at least 2"):
        bench.bench_metric(n=n, seeds=1, nets=("shipped",), out=tmp_path / "x", cache=tmp_path)
    with pytest.raises(ValueError, match="unknown feature net 'nope'"):
        bench.load_feature_nets(["nope"])
