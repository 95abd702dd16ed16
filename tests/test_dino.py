"""The dino discriminator (models/dino.py) and DiffAugment (models/diffaug.py), on timm's tiny `test_vit`
(depth 6, width 64, patch 16) at img_size=32 (2x2 = 4 tokens) with random weights: fast on one CPU core."""
import os

import pytest
import torch

from models.diffaug import diff_augment
from models.dino import DinoDiscriminator

SMALL = dict(model="test_vit", weights="random", img_size=32, taps=(1, 3, 5))
TOKENS = 4


def make(**kw):
    torch.manual_seed(0)
    return DinoDiscriminator(**{**SMALL, "img_resolution": 16, **kw})


def one_line_value_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_shapes(channels, label_dim):
    d = make(in_channels=channels, label_dim=label_dim)
    x = torch.randn(5, channels, 16, 16).clamp(-1, 1)
    labels = torch.arange(5) if label_dim else None
    for mode in (True, False):
        out = d.train(mode)(x, torch.ones(5), labels)
        assert out.shape == (5, (len(SMALL["taps"]) + 1) * TOKENS) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_larger_images_crop_and_area_resize():
    d = make(img_resolution=48)  # > img_size: random crop (p=0.5) in training, area downsampling
    torch.manual_seed(1)
    for _ in range(4):
        assert d.train()(torch.rand(3, 3, 48, 48) * 2 - 1).shape == (3, 4 * TOKENS)
    assert d.eval()(torch.rand(3, 3, 48, 48)).shape == (3, 4 * TOKENS)


def test_bad_inputs():
    one_line_value_error(lambda: make(in_channels=2), "in_channels")
    d = make()
    one_line_value_error(lambda: d(torch.randn(2, 3, 32, 32)), "[B, 3, 16, 16]")
    one_line_value_error(lambda: d(torch.randn(2, 1, 16, 16)), "[B, 3, 16, 16]")
    one_line_value_error(lambda: d(torch.randn(2, 3, 16, 16), class_labels=torch.arange(2)), "unconditional")
    one_line_value_error(lambda: make(label_dim=4)(torch.randn(2, 3, 16, 16)), "class_labels")
    one_line_value_error(lambda: make(taps=(2, 6)), "depth 6")
    one_line_value_error(lambda: make(model="no_such_vit"), "no_such_vit")


def test_labels_int_and_one_hot_agree_and_eval_is_deterministic():
    d = make(label_dim=4).eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 1])
    a = d(x, class_labels=y)
    torch.testing.assert_close(a, d(x, class_labels=torch.nn.functional.one_hot(y, 4).float()))
    assert not torch.allclose(a, d(x, class_labels=torch.tensor([1, 0, 2])))


def test_frozen_vit_and_training_step():
    d = make(label_dim=3)
    d.train()
    assert not d.vit.training and all(m.training for m in d.heads.modules())
    assert all(not p.requires_grad for p in d.vit.parameters())
    trainable = [p for p in d.parameters() if p.requires_grad]
    assert trainable and not {id(p) for p in trainable} & {id(p) for p in d.vit.parameters()}
    vit_before = {k: v.clone() for k, v in d.vit.state_dict().items()}
    head_before = {k: p.detach().clone() for k, p in d.heads.named_parameters()}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    torch.manual_seed(2)
    real, fake, y = torch.rand(10, 3, 16, 16) * 2 - 1, torch.randn(10, 3, 16, 16), torch.randint(3, (10,))
    loss = torch.relu(1 - d(real, class_labels=y)).mean() + torch.relu(1 + d(fake, class_labels=(y + 1) % 3)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in d.vit.parameters())
    for k, v in d.vit.state_dict().items():
        assert torch.equal(v, vit_before[k]), k
    changed = {k for k, p in d.heads.named_parameters() if not torch.equal(p, head_before[k])}
    # every parameter moves except the biases of convs right before a BatchNorm (it cancels them: zero gradient)
    assert {k for k in head_before if not k.endswith(("pre.0.bias", "res.0.bias"))} <= changed
    d.train()
    assert not d.vit.training and d.training


def test_gradient_reaches_input_with_augmentation():
    d = make().train()
    assert d.augment == "color,translation,cutout"
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_()
    d(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_augment_only_in_training_and_off_switch():
    x = torch.randn(4, 3, 16, 16)
    d = make()
    torch.manual_seed(3)
    assert not torch.equal(d.train()(x), d(x))  # fresh augmentations each call
    off = make(augment="")
    off.train()
    torch.testing.assert_close(off(x), off(x))
    torch.testing.assert_close(d.eval()(x), off.eval()(x))  # same seed -> same heads; eval never augments


def test_diff_augment():
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_()
    out = diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    again = diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, diff_augment(x, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(diff_augment(x, policy=""), x)
    same = torch.rand(1, 3, 16, 16).expand(6, -1, -1, -1)
    for policy in ("color", "translation", "cutout"):
        aug = diff_augment(same, policy, generator=torch.Generator().manual_seed(0))
        assert aug.shape == same.shape and len({tuple(a.flatten().tolist()) for a in aug}) > 1, policy
    zeros = diff_augment(torch.ones(64, 1, 16, 16), "cutout", generator=torch.Generator().manual_seed(0))
    assert ((zeros == 0).float().mean((1, 2, 3)) <= 0.25 + 1e-6).all() and (zeros == 0).any()
    with pytest.raises(ValueError):
        diff_augment(x, "colour")


def test_missing_weights_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.delenv("FASTDIFF_DINO", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    offline_before = hf_constants.HF_HUB_OFFLINE
    msg = one_line_value_error(lambda: DinoDiscriminator(), "vit_small_patch16_224.dino", "FASTDIFF_DINO",
                               "disc_args={weights: ")
    assert "offline" in msg
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE == offline_before  # restored
    one_line_value_error(lambda: DinoDiscriminator(weights="/nonexistent/file"), "/nonexistent/file")
    monkeypatch.setenv("FASTDIFF_DINO", "/nonexistent/env_file")
    one_line_value_error(lambda: DinoDiscriminator(), "/nonexistent/env_file", "FASTDIFF_DINO")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_file_round_trip(fmt, tmp_path, monkeypatch):
    import timm
    torch.manual_seed(123)
    src = timm.create_model("test_vit", img_size=32, num_classes=0)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    for d in (make(weights=str(path)), None):
        if d is None:  # the same file through the environment variable
            monkeypatch.setenv("FASTDIFF_DINO", str(path))
            d = make(weights=None)
        loaded = d.vit.state_dict()
        assert loaded.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(loaded[k], v), k
        assert not any(p.requires_grad for p in d.vit.parameters())
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"foo": torch.zeros(2)}, str(bad))
    one_line_value_error(lambda: make(weights=str(bad)), "could not load")
