"""Tests for models/unet.py: shapes, config errors, gradients, labels, attention backends, bf16 and compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import models.unet as unet
from models.unet import UNet
from tests.nets import wake

SMALL = dict(img_resolution=16, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
             attn_resolutions=(8,))



def inputs(net, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.img_resolution, net.img_resolution, generator=g)
    noise_labels = torch.randn(batch, generator=g)
    return x, noise_labels


@pytest.mark.parametrize("config, labels", [
    (dict(img_resolution=28, in_channels=1, model_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(7,)), None),
    (dict(img_resolution=32, in_channels=3, model_channels=16, channel_mult=(1, 2), attn_resolutions=(),
          mid_attention=False, label_dim=10), "index"),
    (dict(img_resolution=16, in_channels=3, out_channels=6, model_channels=16, channel_mult=(1, 2, 2),
          attn_resolutions=(16, 4), label_dim=5, embedding="fourier", adaptive_scale=False), "onehot"),
])
def test_output_shape(config, labels):
    torch.manual_seed(0)
    net = UNet(**config).eval()
    x, noise_labels = inputs(net, batch=3)
    class_labels = None
    if labels == "index":
        class_labels = torch.tensor([0, 9, 4])
    elif labels == "onehot":
        class_labels = F.one_hot(torch.tensor([0, 4, 2]), config["label_dim"]).float()
    with torch.no_grad():
        out = net(x, noise_labels, class_labels)
    out_channels = config.get("out_channels", config["in_channels"])
    assert out.shape == (3, out_channels, config["img_resolution"], config["img_resolution"])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_attention_placement():
    net = UNet(**dict(SMALL, attn_resolutions=(16,), mid_attention=False))
    assert [b.num_heads > 0 for b in net.enc] == [True, False, False]       # 16x16 block; down; 8x8 block
    assert [b.num_heads > 0 for b in net.mid] == [False, False]
    assert [b.num_heads > 0 for b in net.dec] == [False, False, False, False, True]  # 8x8 x2; up; 16x16 x2
    heads = UNet(**dict(SMALL, model_channels=64, channels_per_head=32)).mid[0].num_heads
    assert heads == 4  # 128 channels at 8x8 / 32 per head


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by 2"):
        UNet(img_resolution=28, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[16, 8\]"):
        UNet(**dict(SMALL, attn_resolutions=(7,)))
    with pytest.raises(ValueError, match="positional, fourier"):
        UNet(**dict(SMALL, embedding="sinusoid"))
    with pytest.raises(ValueError, match="heads"):
        UNet(**dict(SMALL, num_heads=3))
    with pytest.raises(ValueError, match="dropout"):
        UNet(**dict(SMALL, dropout=1.5))


def test_input_errors():
    net = UNet(**SMALL)
    x, noise_labels = inputs(net)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, noise_labels, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x of shape \[B, 1, 16, 16\]"):
        net(x[:, :, :8], noise_labels)
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, noise_labels[:2])
    with pytest.raises(ValueError, match="unexpected inputs"):
        net(x, noise_labels, augment_labels=None)
    cond = UNet(**dict(SMALL, label_dim=3))
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, noise_labels, torch.zeros(4, 5))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    for config in (dict(SMALL, label_dim=10, dropout=0.1), dict(SMALL, label_dim=10, adaptive_scale=False,
                                                                 embedding="fourier")):
        net = UNet(**config).train()
        x, noise_labels = inputs(net)
        out = net(x, noise_labels, torch.tensor([1, 2, 3, 4]))
        loss = ((out - x) ** 2).mean()
        loss.backward()
        dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"parameters without gradient: {dead}"


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    net = wake(UNet(**dict(SMALL, label_dim=10, label_dropout=1.0)))
    x, noise_labels = inputs(net)
    labels = torch.tensor([1, 2, 3, 4])
    net.train()
    assert torch.equal(net(x, noise_labels, labels), net(x, noise_labels, None))  # every label dropped
    net.eval()
    with torch.no_grad():
        cond, null = net(x, noise_labels, labels), net(x, noise_labels, None)
    assert (cond - null).abs().max() > 1e-3 * null.abs().max()


def test_onehot_equals_index_labels():
    torch.manual_seed(0)
    net = wake(UNet(**dict(SMALL, label_dim=10))).eval()
    x, noise_labels = inputs(net)
    labels = torch.tensor([7, 0, 3, 3])
    with torch.no_grad():
        by_index = net(x, noise_labels, labels)
        by_onehot = net(x, noise_labels, F.one_hot(labels, 10).float())
        other = net(x, noise_labels, torch.tensor([1, 0, 3, 3]))
    torch.testing.assert_close(by_index, by_onehot)
    assert not torch.allclose(by_index[0], other[0]) and torch.allclose(by_index[1:], other[1:])


def test_eval_is_deterministic_and_train_uses_dropout():
    torch.manual_seed(0)
    net = wake(UNet(**dict(SMALL, dropout=0.3)))
    x, noise_labels = inputs(net)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, noise_labels), net(x, noise_labels))
        net.train()
        assert not torch.equal(net(x, noise_labels), net(x, noise_labels))


def test_noise_labels_change_the_output_and_broadcast():
    torch.manual_seed(0)
    net = wake(UNet(**SMALL)).eval()
    x, _ = inputs(net)
    with torch.no_grad():
        a = net(x, torch.full((4,), 0.5))
        b = net(x, torch.tensor(0.5))
        c = net(x, torch.full((4,), -0.5))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_untrained_output_is_small():
    torch.manual_seed(0)
    net = UNet().eval()
    x, noise_labels = inputs(net, batch=2)
    with torch.no_grad():
        out = net(x * 3, noise_labels)
    assert out.abs().max() < 1e-3


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    net = wake(UNet(**dict(SMALL, label_dim=10))).eval()
    x, noise_labels = inputs(net)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        reference = net(x, noise_labels, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, noise_labels * 10, labels)  # wide noise-label range through the embedding
            out_same = net(x, noise_labels, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out_same - reference).norm() / reference.norm()
    assert rel < 0.05, f"bf16 deviates from float32 by {rel:.3f}"


def test_default_and_earlier_mnist_sizes():
    n = UNet().num_params()
    assert n == 344161  # the CPU-sized default (16 channels, 1 block per level)
    assert n == sum(p.numel() for p in UNet().parameters())
    assert UNet(model_channels=32, num_blocks=2).num_params() == 1901601  # the count the docstring gives


def test_sdpa_attention_matches_softmax_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(unet.attention(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_xformers_not_used_on_cpu_and_runtime_failure_falls_back(monkeypatch):
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)

    class BrokenXformers:
        @staticmethod
        def memory_efficient_attention(*args):
            raise NotImplementedError("no operator for these inputs")

    monkeypatch.setattr(unet, "xformers_ops", BrokenXformers)
    assert not unet.use_xformers(q)  # importable but on CPU: SDPA
    torch.testing.assert_close(unet.attention(q, k, v), expected)
    monkeypatch.setattr(unet, "use_xformers", lambda q: True)  # pretend CUDA: the kernel fails, SDPA answers
    torch.testing.assert_close(unet.attention(q, k, v), expected)


def test_embeddings_closed_form():
    emb = unet.PositionalEmbedding(8, max_positions=10000)
    torch.testing.assert_close(emb.freqs, torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4]))
    out = emb(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(out[1, 0], torch.tensor(math.cos(2.0)))
    torch.testing.assert_close(out[1, 4], torch.tensor(math.sin(2.0)))
    four = unet.FourierEmbedding(6, scale=16.0)
    t = torch.tensor([0.3])
    angles = 2 * math.pi * 0.3 * four.freqs
    torch.testing.assert_close(four(t)[0], torch.cat([angles.cos(), angles.sin()]))


def test_group_count_divides():
    for channels in (1, 3, 16, 32, 48, 96, 160, 200, 384, 768):
        groups = unet.group_count(channels)
        assert channels % groups == 0 and 1 <= groups <= 32


def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = UNet(**dict(SMALL, label_dim=10, label_dropout=0.2)).eval()
    x, noise_labels = inputs(net)
    labels = torch.tensor([1, 2, 3, 4])
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, noise_labels, labels), net(x, noise_labels, labels))
