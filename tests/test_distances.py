"""objectives/distances.py: mse, l1, pseudo-Huber against hand computations; LPIPS and the MNIST feature distance
with random weights (the machinery), the backbone-weights loading and its errors."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from objectives.distances import (DISTANCES, LPIPS_BACKBONE_ENV, LPIPS_BACKBONE_FILES, LPIPS_MIN_SIZE,
                                  make_distance, unit_normalise)


def images(b=3, c=3, size=32, seed=0):
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_frozen(distance):
    assert all(not p.requires_grad for p in distance.parameters())
    distance.train()  # e.g. a parent module switching to training mode: dropout in the heads must stay off
    assert not any(m.training for m in distance.modules())


# ---------------------------------------------------------------- mse, l1, pseudo-Huber

def test_mse_and_l1_by_hand():
    pred = torch.tensor([[[1.0, -2.0], [0.5, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.5, 1.0]], [[1.0, 1.0], [-1.0, 3.0]]])
    assert torch.allclose(make_distance("mse")(pred, target), torch.tensor([(1 + 4 + 0 + 4) / 4, (1 + 1 + 1 + 9) / 4]))
    assert torch.allclose(make_distance("l1")(pred, target), torch.tensor([(1 + 2 + 0 + 2) / 4, (1 + 1 + 1 + 3) / 4]))


def test_pseudo_huber_by_hand_and_its_two_regimes():
    pred, target = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert make_distance("pseudo_huber", c=1.0)(pred, target).item() == pytest.approx(math.sqrt(26) - 1, rel=1e-6)
    d = 3 * 8 * 8
    default_c = 0.00054 * math.sqrt(d)  # iCT's c for d = 192 elements
    diff = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    huber = make_distance("pseudo_huber")
    norm = diff.flatten(1).norm(dim=1)
    assert torch.allclose(huber(diff, torch.zeros_like(diff)), norm - default_c, rtol=1e-5)  # large: ~ L2 norm
    small = diff * 1e-6
    quadratic = small.flatten(1).square().sum(1) / (2 * default_c)
    assert torch.allclose(huber(small, torch.zeros_like(small)), quadratic, rtol=1e-3)  # small: ~ ||d||^2 / (2c)


def test_unknown_distance_lists_the_names():
    with pytest.raises(ValueError, match="unknown distance 'ssim'") as error:
        make_distance("ssim")
    for name in ("mse", "l1", "pseudo_huber", "lpips", "mnist_feature"):
        assert name in str(error.value) and name in DISTANCES


# ---------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return make_distance("lpips", random_init=True)


@pytest.fixture(scope="module")
def alex():
    torch.manual_seed(0)
    return make_distance("lpips", net="alex", random_init=True)


def test_lpips_shape_zero_positive_symmetric_and_gradient(vgg):
    assert vgg.net == "vgg" and vgg.resize is None
    x, y = images(seed=0), images(seed=1)
    d = vgg(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(vgg(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(vgg(y, x), d, rtol=1e-5)
    pred = x.clone().requires_grad_(True)
    vgg(pred, y).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())
    assert_frozen(vgg)


def test_lpips_is_zhang_et_al_eq1(alex):
    """sum over layers of the spatial mean of sum_c w_c (unit(f0) - unit(f1))^2, and the lpips=False baseline."""
    x, y = images(seed=2), images(seed=3)
    scaled = [alex.model.scaling_layer(v) for v in (x, y)]
    feats = [alex.model.net(v) for v in scaled]
    diffs = [(unit_normalise(a) - unit_normalise(b)).square() for a, b in zip(*feats)]
    heads = [lin.model[-1].weight.flatten() for lin in alex.model.lins]
    calibrated = sum((w[None, :, None, None] * diff).sum(1).mean((1, 2)) for w, diff in zip(heads, diffs))
    assert torch.allclose(alex(x, y), calibrated, rtol=1e-4)
    baseline = make_distance("lpips", net="alex", lpips=False, random_init=True)
    baseline.model.net.load_state_dict(alex.model.net.state_dict())
    assert not hasattr(baseline.model, "lins")
    assert torch.allclose(baseline(x, y), sum(diff.sum(1).mean((1, 2)) for diff in diffs), rtol=1e-4)


def test_lpips_linear_heads_are_the_shipped_calibrated_ones(alex):
    import lpips
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                         weights_only=True)
    for i, lin in enumerate(alex.model.lins):
        assert torch.equal(lin.model[-1].weight, shipped[f"lin{i}.model.1.weight"])


def test_lpips_one_channel_is_repeated(vgg):
    x, y = images(c=1, seed=4), images(c=1, seed=5)
    assert torch.allclose(vgg(x, y), vgg(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_lpips_resize_and_minimum_size(alex):
    x, y = images(c=1, size=28, seed=6), images(c=1, size=28, seed=7)
    with pytest.raises(ValueError, match=f"at least {LPIPS_MIN_SIZE['alex']} pixels.*resize"):
        alex(x, y)
    resized = make_distance("lpips", net="alex", resize=40, random_init=True)
    resized.load_state_dict(alex.state_dict())
    up = [F.interpolate(v.repeat(1, 3, 1, 1), size=(40, 40), mode="bilinear", align_corners=False) for v in (x, y)]
    assert torch.allclose(resized(x, y), alex(*up), rtol=1e-5)
    with pytest.raises(ValueError, match="resize must be at least 31"):
        make_distance("lpips", net="alex", resize=16, random_init=True)
    with pytest.raises(ValueError, match="one shape"):
        alex(images(size=32), images(size=40))


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """HOME in a temporary directory with no torch hub cache and no overrides."""
    for name in ("TORCH_HOME", "XDG_CACHE_HOME", LPIPS_BACKBONE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / ".cache" / "torch" / "hub" / "checkpoints"


def test_lpips_missing_backbone_weights_says_what_to_put_where(no_hub_cache, tmp_path, monkeypatch):
    expected = no_hub_cache / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="put vgg16-397923af.pth") as error:
        make_distance("lpips")
    assert str(expected) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.pth'}"):
        make_distance("lpips", net="alex", weights=str(tmp_path / "nope.pth"))
    monkeypatch.setenv(LPIPS_BACKBONE_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'env.pth'}.*{LPIPS_BACKBONE_ENV}"):
        make_distance("lpips", net="alex")


def random_alexnet_features(seed):
    import torchvision
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.05 for k, v in torchvision.models.alexnet().features.state_dict().items()}


def assert_backbone_is(distance, features):
    loaded = distance.model.net.state_dict()
    assert len(loaded) == 10  # AlexNet's 5 convs, weight and bias
    for key, value in loaded.items():
        assert torch.equal(value, features[key.split(".", 1)[1]])


def test_lpips_loads_backbone_from_weights_env_and_hub_cache(no_hub_cache, tmp_path, monkeypatch):
    features = random_alexnet_features(seed=1)
    torch.save(features, tmp_path / "alex_features.pth")  # a `.features` state_dict: keys "0.weight", ...
    assert_backbone_is(make_distance("lpips", net="alex", weights=str(tmp_path / "alex_features.pth")), features)

    monkeypatch.setenv(LPIPS_BACKBONE_ENV, str(tmp_path / "alex_features.pth"))
    assert_backbone_is(make_distance("lpips", net="alex"), features)
    monkeypatch.delenv(LPIPS_BACKBONE_ENV)

    # a whole-model state_dict, as torchvision caches it: keys "features.0.weight", ..., "classifier.*"
    no_hub_cache.mkdir(parents=True)
    whole = {f"features.{k}": v for k, v in features.items()} | {"classifier.1.weight": torch.zeros(2, 2)}
    torch.save(whole, no_hub_cache / "alexnet-owt-7be5be79.pth")
    distance = make_distance("lpips", net="alex")
    assert_backbone_is(distance, features)
    assert_frozen(distance)


def test_lpips_rejects_a_backbone_of_another_architecture(tmp_path):
    features = random_alexnet_features(seed=2)
    features["3.weight"] = features["3.weight"][:, :10]
    torch.save(features, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision alexnet state_dict.*features.3.weight"):
        make_distance("lpips", net="alex", weights=str(tmp_path / "bad.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read backbone weights"):
        make_distance("lpips", net="alex", weights=str(tmp_path / "garbage.pth"))


def test_lpips_backbone_file_names_are_torchvisions():
    from torchvision.models import AlexNet_Weights, VGG16_Weights
    assert VGG16_Weights.IMAGENET1K_V1.url.endswith("/" + LPIPS_BACKBONE_FILES["vgg"])
    assert AlexNet_Weights.IMAGENET1K_V1.url.endswith("/" + LPIPS_BACKBONE_FILES["alex"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_perceptual_distances_move_to_the_gpu(alex):
    for distance in (alex, make_distance("mnist_feature", random_init=True)):
        distance.to("cuda")
        size, c = (32, 3) if distance is alex else (28, 1)
        pred = images(c=c, size=size, seed=8).cuda().requires_grad_(True)
        value = distance(pred, images(c=c, size=size, seed=9).cuda())
        value.sum().backward()
        assert value.device.type == "cuda" and pred.grad.abs().sum() > 0
        distance.to("cpu")


# ---------------------------------------------------------------- MNIST feature distance

@pytest.fixture(scope="module")
def mnist_feature():
    torch.manual_seed(0)
    return make_distance("mnist_feature", random_init=True)


def test_mnist_feature_zero_positive_symmetric_and_gradient(mnist_feature):
    x, y = images(c=1, size=28, seed=10), images(c=1, size=28, seed=11)
    d = mnist_feature(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert (d <= 4 * 4).all()  # four unit-normalised layers, each contributing at most 4
    assert torch.allclose(mnist_feature(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(mnist_feature(y, x), d, rtol=1e-5)
    pred = x.clone().requires_grad_(True)
    mnist_feature(pred, y).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in mnist_feature.parameters())
    assert_frozen(mnist_feature)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        mnist_feature(images(c=1, size=32), images(c=1, size=32))


def test_mnist_feature_plain_is_the_layers_mean_squared_difference(mnist_feature):
    plain = make_distance("mnist_feature", normalize=False, random_init=True)
    plain.load_state_dict(mnist_feature.state_dict())
    x, y = images(c=1, size=28, seed=12), images(c=1, size=28, seed=13)
    net = plain.net
    acts = []
    for v in (x, y):
        h1 = net.convs[1](net.convs[0](v))
        h2 = net.convs[3](net.convs[2](h1))
        h3 = net.convs[6](net.convs[5](net.convs[4](h2)))
        acts.append([h1, h2, h3, net.features(v)])
    expected = sum((a - b).square().flatten(1).mean(1) for a, b in zip(*acts))
    assert torch.allclose(plain(x, y), expected, rtol=1e-5)


def test_mnist_feature_loads_the_given_checkpoint(tmp_path):
    from metrics.mnist_net import MnistNet, save_mnist_feature_net
    torch.manual_seed(3)
    net = MnistNet()
    save_mnist_feature_net(net, tmp_path / "net.pt")
    distance = make_distance("mnist_feature", path=str(tmp_path / "net.pt"))
    for key, value in net.state_dict().items():
        assert torch.equal(distance.net.state_dict()[key], value)
