"""metrics/ (Frechet distance, MNIST feature net, Inception machinery, toy distances, registry) and runs.eval."""
import json
import math
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics import METRICS, fid_mnist
from metrics.frechet import feature_statistics, frechet_distance
from metrics.inception import (WEIGHTS_NAME, inception_features, inception_outputs, inception_score, load_inception,
                               load_reference_statistics, save_reference_statistics)
from metrics.mnist_net import (CHECKPOINT_NAME, accuracy, cache_dir, load_mnist_feature_net, mnist_features,
                               save_mnist_feature_net, train_mnist_classifier)
from metrics.toy import mmd, sliced_wasserstein
from runs.eval import main as eval_main


# ---------------------------------------------------------------- Frechet distance

def test_frechet_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # same eigenvectors -> commuting covariances
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_sqrtm_for_general_covariances_and_is_symmetric():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_singular_identical_covariances_is_the_mean_gap():
    features = np.random.default_rng(2).normal(size=(10, 40))  # 10 samples in 40-d: rank-9 covariance
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(40 * 0.25, rel=1e-6)


def test_feature_statistics_and_errors():
    features = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="mu"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- MNIST feature net

# the `mnist` and `tiny_net` fixtures: tests/conftest.py

def test_training_learns_and_records_heldout_accuracy(tiny_net, mnist):
    assert tiny_net.meta["heldout_accuracy"] > 0.75  # chance is 0.1
    assert accuracy(tiny_net, mnist.images[6000:6500], mnist.labels[6000:6500]) > 0.75  # never seen


def test_training_is_seeded_and_leaves_the_global_rng_alone(mnist):
    subset = types.SimpleNamespace(images=mnist.images[:96], labels=mnist.labels[:96])
    state = torch.get_rng_state()
    nets = [train_mnist_classifier(subset, epochs=1, seed=s, heldout=32, batch=32) for s in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(nets[0].feature.weight, nets[1].feature.weight)
    assert not torch.equal(nets[0].feature.weight, nets[2].feature.weight)
    with pytest.raises(ValueError, match="heldout"):
        train_mnist_classifier(subset, heldout=96)


def test_checkpoint_round_trip_gives_identical_features(tiny_net, mnist, tmp_path):
    path = tmp_path / "sub" / "net.pt"
    save_mnist_feature_net(tiny_net, path)
    assert [p.name for p in path.parent.iterdir()] == ["net.pt"]  # no temporary file left
    loaded = load_mnist_feature_net(path, train_if_missing=False)
    images = mnist.images[:64]
    torch.testing.assert_close(mnist_features(loaded, images), mnist_features(tiny_net, images), rtol=0, atol=0)
    assert loaded.meta["heldout_accuracy"] == tiny_net.meta["heldout_accuracy"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncate"])
def test_corrupt_checkpoint_is_a_value_error_naming_the_path(tiny_net, tmp_path, content):
    path = tmp_path / CHECKPOINT_NAME
    save_mnist_feature_net(tiny_net, path)
    path.write_bytes(path.read_bytes()[:2000] if content == "truncate" else content)
    with pytest.raises(ValueError, match="corrupt.*delete it") as info:
        load_mnist_feature_net(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint_without_training_and_cache_dir(tmp_path, monkeypatch):
    import metrics.mnist_net
    assert metrics.mnist_net.SHIPPED.exists() and load_mnist_feature_net(train_if_missing=False).meta["seed"] == 0
    monkeypatch.setattr(metrics.mnist_net, "SHIPPED", tmp_path / "absent.pt")  # no shipped net: the cache is used
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "c" / CHECKPOINT_NAME)):
        load_mnist_feature_net(train_if_missing=False)
    monkeypatch.delenv("FASTDIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "fastdiff"


def test_mnist_features_shapes_batching_and_errors(tiny_net, mnist):
    images = mnist.images[:37]
    features = mnist_features(tiny_net, images)
    assert features.shape == (37, 128) and features.dtype == torch.float32
    torch.testing.assert_close(mnist_features(tiny_net, images[:, 0].numpy(), batch=5), features)
    with pytest.raises(ValueError, match="uint8"):
        mnist_features(tiny_net, images.float())
    with pytest.raises(ValueError, match="28, 28"):
        mnist_features(tiny_net, torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_fid_mnist_is_zero_on_identical_sets_and_grows_with_corruption(tiny_net, mnist):
    real, other = mnist.images[:300].numpy(), mnist.images[300:600].numpy()
    noisy = np.clip(other.astype(int) + np.random.default_rng(0).integers(-80, 80, other.shape), 0, 255)
    assert fid_mnist(real, real, net=tiny_net) == pytest.approx(0, abs=1e-6)
    assert fid_mnist(real, other, net=tiny_net) < fid_mnist(real, noisy.astype(np.uint8), net=tiny_net)


# ---------------------------------------------------------------- Inception machinery

def test_inception_random_init_gives_pool3_features():
    torch.manual_seed(0)
    net = load_inception(random_init=True)
    images = torch.randint(0, 256, (4, 1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = inception_features(net, images, batch=3)
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="uint8"):
        inception_features(net, images.float())


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved as a weights file: the loading path runs for real."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(load_inception(random_init=True).state_dict(), path)
    return path


def test_inception_weights_file_loads_through_torch_fidelity(random_inception_file):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = load_inception(random_init=True)
    reference.load_state_dict(torch.load(random_inception_file, weights_only=True))
    loaded = load_inception(random_inception_file)
    assert torch.equal(inception_features(loaded, images), inception_features(reference, images))
    pool, logits = inception_outputs(loaded, images[:, :1], batch=2)  # grey images are repeated to RGB
    assert pool.shape == (5, 2048) and logits.shape == (5, 1008) and pool.dtype == torch.float64


def test_inception_weights_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / WEIGHTS_NAME
    torch.save({"fc.weight": torch.zeros(1), "payload": BatchNormLike}, path)
    with pytest.raises(ValueError, match="cannot load FID Inception weights"):
        load_inception(path)


class BatchNormLike:  # a class in a weights file: what weights_only=True refuses
    pass


def test_fid_against_saved_reference_statistics_equals_fid_against_the_images(random_inception_file, tmp_path):
    g = torch.Generator().manual_seed(2)
    samples = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    real = torch.randint(0, 128, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    net = load_inception(random_inception_file)
    stats = feature_statistics(inception_features(net, real))
    save_reference_statistics(tmp_path / "ref.npz", *stats)
    from_images = METRICS["fid-inception"](samples, real, net=net)
    from_stats = METRICS["fid-inception"](samples, tmp_path / "ref.npz", net=net)
    assert from_images > 0 and abs(from_images - from_stats) < 1e-6 * from_images
    np.savez(tmp_path / "bad.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match="must be mu \\[2048\\] and sigma"):
        load_reference_statistics(tmp_path / "bad.npz")


def test_inception_score_of_known_logits():
    uniform = torch.zeros(100, 1008, dtype=torch.float64)
    assert abs(inception_score(uniform, splits=2)[0] - 1.0) < 1e-9  # no class information: IS = 1
    confident = torch.full((100, 1008), -30.0, dtype=torch.float64)  # others at e^-30: certain, finite logs
    confident[torch.arange(100), torch.arange(100) % 10] = 0  # 10 classes, each certain, balanced
    mean, std = inception_score(confident, splits=1)
    assert abs(mean - 10.0) < 1e-6 and std == 0  # exp(log 10)


def test_eval_writes_and_uses_reference_statistics(random_inception_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_INCEPTION", str(random_inception_file))
    g = torch.Generator().manual_seed(3)
    np.savez(tmp_path / "real.npz", images=torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g))
    np.savez(tmp_path / "fake.npz", images=torch.randint(0, 64, (12, 3, 16, 16), dtype=torch.uint8, generator=g))
    eval_main([str(tmp_path / "real.npz"), "--write-stats", str(tmp_path / "stats.npz"), "--device", "cpu"])
    eval_main([str(tmp_path / "fake.npz"), "--metric", "fid-inception", "--ref-stats", str(tmp_path / "stats.npz"),
               "--json", "--device", "cpu"])
    value = json.loads(capsys.readouterr().out.splitlines()[-1])["value"]
    eval_main([str(tmp_path / "fake.npz"), "--metric", "fid-inception", "--ref", str(tmp_path / "real.npz"),
               "--json", "--device", "cpu"])
    assert abs(json.loads(capsys.readouterr().out.splitlines()[-1])["value"] - value) < 1e-6 * value
    np.savez(tmp_path / "small.npz", images=np.zeros((12, 3, 8, 8), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path / "small.npz"), "--metric", "fid-inception", "--ref", str(tmp_path / "real.npz")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "samples are 8x8 images, the reference 16x16" in err


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "w.pth")):
        load_inception(tmp_path / "w.pth")
    monkeypatch.delenv("FASTDIFF_INCEPTION", raising=False)
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / WEIGHTS_NAME)) as info:
        METRICS["fid-inception"](np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 3, 8, 8), np.uint8))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("FASTDIFF_INCEPTION", str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        load_inception()


# ---------------------------------------------------------------- toy distances

def test_sliced_wasserstein_exact_values():
    x = torch.randn(400, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == 0
    for p in (1, 2):
        assert sliced_wasserstein(x, x + 1.5, p=p) == pytest.approx(1.5, rel=1e-12)
    # unequal sizes, quantile functions {0, 1} vs {0, 0.5, 1}: W1 = 1/6, W2 = sqrt(1/12)
    assert sliced_wasserstein([0.0, 1.0], [0.0, 0.5, 1.0], p=1) == pytest.approx(1 / 6, rel=1e-12)
    assert sliced_wasserstein([1.0, 0.0], [0.5, 1.0, 0.0], p=2) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)


def test_sliced_wasserstein_shift_in_2d_symmetry_and_determinism():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 2, generator=g), torch.randn(200, 2, generator=g)
    shift = torch.tensor([3.0, 4.0])  # SW2^2 = E<theta, c>^2 = |c|^2 / 2 over directions in 2-D
    assert sliced_wasserstein(x, x + shift, projections=4000) == pytest.approx(5 / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein(x, y) == pytest.approx(sliced_wasserstein(y, x), rel=1e-12)
    assert sliced_wasserstein(x, y) < sliced_wasserstein(x, y + 1) < sliced_wasserstein(x, y + 2)
    assert METRICS["swd"](x, y, seed=3) == METRICS["swd"](x.numpy(), y.numpy(), seed=3)
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(x, torch.zeros(5, 3))


def test_mmd_matches_gaussian_closed_form_and_is_symmetric():
    g = torch.Generator().manual_seed(2)
    x, x2 = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    y = torch.randn(1000, 2, generator=g) + torch.tensor([1.0, 0.0])
    s = 1.0  # MMD^2(N(0, I), N(m, I)) = 2 (s^2 / (s^2 + 2))^(d/2) (1 - exp(-|m|^2 / (2 (s^2 + 2))))
    expected = 2 * (s * s / (s * s + 2)) * (1 - math.exp(-1 / (2 * (s * s + 2))))
    assert mmd(x, y, bandwidths=(s,)) == pytest.approx(expected, abs=0.01)
    assert abs(mmd(x, x2)) < 0.01 and abs(mmd(x, x)) < 0.01
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-12)
    assert mmd(x, y) < mmd(x, y + 1)
    with pytest.raises(ValueError, match="at least 2"):
        mmd(x, y[:1])


def test_registry_entries_are_documented_functions():
    assert set(METRICS) >= {"fid-mnist", "fid-inception", "swd", "mmd"}
    for fn in METRICS.values():
        assert callable(fn) and fn.__doc__ and len(fn.__doc__.strip().splitlines()) == 1


# ---------------------------------------------------------------- runs.eval

@pytest.fixture
def cached_net(tiny_net, tmp_path, monkeypatch):
    """The tiny net in a temporary FASTDIFF_CACHE (as the run_cli fixture sets it), so nothing trains."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    save_mnist_feature_net(tiny_net, tmp_path / "cache" / CHECKPOINT_NAME)
    return tmp_path


def test_eval_cli_scores_samples_and_writes_json(cached_net, mnist, run_cli):
    path = cached_net / "samples.npz"
    np.savez(path, images=mnist.images[:300].numpy(), labels=mnist.labels[:300].numpy())
    done = run_cli("runs.eval", path, "--metric", "fid-mnist", "--n", 200, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["metric"] == "fid-mnist" and result["n_samples"] == result["n_reference"] == 200
    assert 0 < result["value"] < 1000
    missing = run_cli("runs.eval", cached_net / "nope.npz")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "nope.npz" in missing.stderr


def test_eval_in_process_floor_vectors_and_json_file(cached_net, mnist, capsys):
    eval_main(["--floor", "--metric", "fid-mnist", "--n", "300", "--json", str(cached_net / "floor.json")])
    line = capsys.readouterr().out
    assert line.startswith("fid-mnist ") and "300 vs 300" in line
    assert json.loads((cached_net / "floor.json").read_text())["samples"] == "floor"
    g = np.random.default_rng(0)
    np.savez(cached_net / "a.npz", samples=g.normal(size=(100, 2)).astype(np.float32))
    np.savez(cached_net / "b.npz", samples=g.normal(size=(100, 2)) + 5)
    eval_main([str(cached_net / "a.npz"), "--metric", "swd", "--ref", str(cached_net / "b.npz"), "--json"])
    assert json.loads(capsys.readouterr().out)["value"] > 3


@pytest.mark.parametrize("arrays, args, message", [
    ({"labels": np.zeros(3)}, [], "expected 'images'"),
    ({"images": np.zeros((4, 1, 28, 28), np.float32)}, [], "uint8"),
    ({"images": np.zeros((4, 28), np.uint8)}, [], "uint8 \\[N, C, H, W\\]"),
    ({"images": np.zeros((4, 1, 28, 28), np.uint8)}, ["--metric", "fid-nope"], "known: .*fid-inception, fid-mnist"),
    ({"images": np.zeros((4, 1, 28, 28), np.uint8)}, ["--floor"], "either"),
    ({"images": np.zeros((4, 1, 28, 28), np.uint8)}, ["--n", "10"], "more than"),
    ({"samples": np.zeros((4, 2), np.float32)}, [], "--ref"),
])
def test_eval_bad_input_exits_2_with_one_line(cached_net, capsys, arrays, args, message):
    path = cached_net / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(SystemExit) as info:
        eval_main([str(path), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
