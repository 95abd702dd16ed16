"""Tests for models/dit.py: shapes, adaLN-Zero init, the paper's parameter counts, labels, attention paths, jvp,
input and config errors, and short training runs through runs.train."""
import logging
import math
import sys

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

import models.dit as dit
from models import BACKBONES, Denoiser
from models.dit import DiT
from objectives.base import init_from_teacher

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.jvp's own import

SMALL = dict(img_resolution=16, in_channels=1, depth=2, hidden_size=32, num_heads=2, patch_size=4)


def wake(net, std=0.05, seed=0):
    """Give the zero-initialised adaLN-Zero Linears (modulation and output) small random values, so that outputs
    and gradients depend visibly on every input and parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * std)
    return net


def inputs(net, batch=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.img_resolution, net.img_resolution, generator=g, dtype=dtype)
    return x, torch.randn(batch, generator=g, dtype=dtype)


def test_registered_and_plugs_into_a_denoiser():
    assert BACKBONES["dit"] is DiT
    torch.manual_seed(0)
    net = DiT(**SMALL)
    x, _ = inputs(net)
    D = Denoiser(net, "edm", sigma_data=0.5)
    sigma = torch.full((4,), 2.0)
    torch.testing.assert_close(D(x, sigma), x * 0.25 / (4 + 0.25))  # fresh DiT: F = 0, D = c_skip x


@pytest.mark.parametrize("config, labels", [
    (dict(patch_size=2), None),
    (dict(patch_size=4), None),
    (dict(patch_size=7, label_dim=10), "index"),
    (dict(img_resolution=16, in_channels=3, out_channels=2, label_dim=5, pos_embed="learned"), "onehot"),
])
def test_shapes_and_zero_output_at_init(config, labels):
    torch.manual_seed(0)
    net = DiT(**dict(dict(depth=2, hidden_size=32, num_heads=2), **config)).eval()
    x, noise_labels = inputs(net, batch=3)
    class_labels = {None: None, "index": torch.tensor([0, 9, 4]),
                    "onehot": F.one_hot(torch.tensor([0, 4, 2]), 5).float()}[labels]
    with torch.no_grad():
        out = net(x, noise_labels, class_labels)
    out_channels = config.get("out_channels", net.in_channels)
    assert out.shape == (3, out_channels, net.img_resolution, net.img_resolution) and out.dtype == torch.float32
    assert not out.any()  # adaLN-Zero: exactly 0
    with torch.no_grad():
        awake = wake(net)(x, noise_labels, class_labels)
    assert awake.abs().max() > 1e-3 and torch.isfinite(awake).all()


def test_adaln_modulation_and_final_layer_start_at_zero():
    net = DiT(**dict(SMALL, label_dim=3))
    zero = [net.final.linear, net.final.adaLN_modulation[-1]] + [b.adaLN_modulation[-1] for b in net.blocks]
    for layer in zero:
        assert not layer.weight.any() and not layer.bias.any()
    assert len(zero) == 2 + SMALL["depth"]
    nonzero = [net.blocks[0].attn.qkv.weight, net.blocks[0].mlp.fc1.weight, net.patch_embed.proj.weight,
               net.noise_embed.mlp[0].weight, net.label_embed.table.weight]
    assert all(p.abs().max() > 0 for p in nonzero)
    assert isinstance(net.blocks[0].mlp, timm.layers.Mlp)
    assert isinstance(net.patch_embed, timm.layers.PatchEmbed)


def paper_count(size):
    """The reference implementation's count for 256 x 256 ImageNet (latents 32 x 32 x 4, patch 2, 1000 classes,
    learned sigma) from depth d and width h: 18 h^2 + 15 h per block, plus embeddings, decoder, the fixed table."""
    depth, h, _ = dit.SIZES[size]
    tokens, out = (32 // 2) ** 2, 2 * 2 * 8
    blocks = depth * (18 * h * h + 15 * h)
    embeddings = (2 * 2 * 4 * h + h) + (256 * h + h + h * h + h) + 1001 * h + tokens * h
    decoder = 2 * h * h + 2 * h + h * out + out
    return blocks + embeddings + decoder


@pytest.mark.parametrize("size, paper_millions, ours", [
    ("S", 33, 32_858_896), ("B", 130, 130_303_504), ("L", 458, 457_824_272), ("XL", 675, 674_816_272)])
def test_named_sizes_match_the_paper(size, paper_millions, ours):
    with torch.device("meta"):
        net = DiT(img_resolution=32, in_channels=4, label_dim=1000, size=size, patch_size=2)
    assert (net.depth, net.hidden_size, net.num_heads) == dit.SIZES[size]
    n = net.num_params()
    assert n == ours  # the docstring's numbers
    h = net.hidden_size
    # ours + the fixed sincos table (a buffer here) + the learned-sigma half of the output Linear = the reference
    assert n + 256 * h + (16 * h + 16) == paper_count(size)
    assert abs(n - paper_millions * 1e6) < 0.01 * paper_millions * 1e6
    if size == "XL":
        assert paper_count("XL") == 675_129_632  # DiT-XL/2 as the reference implementation prints it


def test_overrides_and_the_default_size():
    net = DiT(size="S", depth=2, num_heads=3)
    assert (net.depth, net.hidden_size, net.num_heads) == (2, 384, 3)
    default = DiT()
    assert (default.depth, default.hidden_size, default.num_heads, default.patch_size) == (6, 192, 3, 4)
    assert default.num_params() == 4_165_456 and DiT(label_dim=10).num_params() == 4_167_568


def test_sincos_table_closed_form():
    table = dit.sincos_2d(8, 3)  # 9 tokens, row-major; channels 0-3 the row, 4-7 the column
    assert table.shape == (9, 8)
    token = 1 * 3 + 2  # row 1, column 2
    omega = [1.0, 0.01]  # 10000^(-i / 2), i < 2
    expected = [math.sin(1 * omega[0]), math.sin(1 * omega[1]), math.cos(1 * omega[0]), math.cos(1 * omega[1]),
                math.sin(2 * omega[0]), math.sin(2 * omega[1]), math.cos(2 * omega[0]), math.cos(2 * omega[1])]
    torch.testing.assert_close(table[token], torch.tensor(expected))
    net = DiT(**SMALL)
    assert "pos_embed" not in net.state_dict() and not any(n == "pos_embed" for n, _ in net.named_parameters())
    assert "pos_embed" in dict(DiT(**dict(SMALL, pos_embed="learned")).named_parameters())


def test_labels_null_class_and_dropout():
    torch.manual_seed(0)
    net = wake(DiT(**dict(SMALL, label_dim=10, label_dropout=1.0)))
    x, noise_labels = inputs(net)
    labels = torch.tensor([7, 0, 3, 3])
    net.train()
    null = net(x, noise_labels, None)
    assert torch.equal(net(x, noise_labels, labels), null)  # every label dropped: the null class
    assert torch.equal(net(x, noise_labels, F.one_hot(labels, 10).float()), null)
    net.eval()
    with torch.no_grad():
        by_index = net(x, noise_labels, labels)
        by_onehot = net(x, noise_labels, F.one_hot(labels, 10).float())
        by_int32 = net(x, noise_labels, labels.int())
        zeros = net(x, noise_labels, torch.zeros(4, 10))  # the U-Net's null label is the null class here
        null = net(x, noise_labels, None)
        other = net(x, noise_labels, torch.tensor([1, 0, 3, 3]))
    torch.testing.assert_close(by_index, by_onehot)
    assert torch.equal(by_index, by_int32)
    torch.testing.assert_close(zeros, null)
    assert (by_index - null).abs().max() > 1e-3 * null.abs().max()
    assert not torch.allclose(by_index[0], other[0]) and torch.allclose(by_index[1:], other[1:])
    table = net.label_embed.table.weight  # soft labels mix rows, the missing mass on the null row
    soft = torch.tensor([[0.25, 0.5] + [0.0] * 8])
    torch.testing.assert_close(net.label_embed(soft, 1, "cpu")[0], 0.25 * table[0] + 0.5 * table[1] + 0.25 * table[10])


def test_label_dropout_rate():
    torch.manual_seed(0)
    embed = dit.LabelEmbedding(10, 8, dropout=0.3).train()
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = (embed(labels, 4000, "cpu") == embed.table.weight[10]).all(1).float().mean()
    assert abs(dropped - 0.3) < 0.03


def test_attention_paths_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    for mode in ("auto", "sdpa", "math"):
        torch.testing.assert_close(dit.attention(q, k, v, mode), expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    nets = {mode: DiT(**dict(SMALL, attention=mode)) for mode in ("sdpa", "math")}
    nets["math"].load_state_dict(wake(nets["sdpa"]).state_dict())
    x, noise_labels = inputs(nets["sdpa"])
    with torch.no_grad():
        torch.testing.assert_close(nets["math"](x, noise_labels), nets["sdpa"](x, noise_labels), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(dit.xformers_ops is None or not torch.cuda.is_available(), reason="needs xformers and CUDA")
def test_xformers_matches_sdpa_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 32, generator=g, device="cuda", dtype=torch.float16) for _ in range(3))
    torch.testing.assert_close(dit.attention(q, k, v, "xformers"), dit.attention(q, k, v, "sdpa"),
                               atol=2e-3, rtol=2e-3)


def test_xformers_failure_falls_back_and_forced_xformers_needs_cuda(monkeypatch):
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))

    class BrokenXformers:
        @staticmethod
        def memory_efficient_attention(*args):
            raise NotImplementedError("no operator for these inputs")

    monkeypatch.setattr(dit, "xformers_ops", BrokenXformers)
    torch.testing.assert_close(dit.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # CPU: SDPA
    with pytest.raises(ValueError, match="needs xformers installed and CUDA"):
        dit.attention(q, k, v, "xformers")
    monkeypatch.setattr(dit, "xformers_ops", None)
    with pytest.raises(ValueError, match="xformers is not importable"):
        DiT(**dict(SMALL, attention="xformers"))


def test_chosen_path_is_logged_once_per_path(monkeypatch, caplog):
    monkeypatch.setattr(dit, "_reported", set())
    net = DiT(**SMALL)
    x, noise_labels = inputs(net)
    with caplog.at_level(logging.INFO, logger="models.dit"):
        for _ in range(3):
            net(x, noise_labels)
        torch.func.jvp(lambda a: net(a, noise_labels), (x,), (torch.ones_like(x),))
    messages = [r.getMessage() for r in caplog.records if r.name == "models.dit"]
    assert len(messages) == 2 and messages[0].startswith("dit attention: sdpa")
    assert messages[1].startswith("dit attention: math (forward-mode AD")


@pytest.mark.parametrize("attention", ["auto", "math"])
def test_jvp_matches_finite_differences(attention):
    torch.manual_seed(0)
    net = wake(DiT(**dict(SMALL, label_dim=4, attention=attention))).double().eval()
    x, t = inputs(net, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(1)
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)

    def f(a, b):
        return net(a, b, labels)

    out, tangent = torch.func.jvp(f, (x, t), (dx, dt))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * dx, t + eps * dt) - f(x - eps * dx, t - eps * dt)) / (2 * eps)
        torch.testing.assert_close(out, f(x, t))
    assert tangent.abs().max() > 1e-2
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)


def test_forced_sdpa_has_no_jvp_on_cpu():
    """The documented reason for the math path: torch's CPU SDPA kernel has no forward-mode AD (torch < 2.15)."""
    net = DiT(**dict(SMALL, attention="sdpa"))
    x, t = inputs(net)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda a: net(a, t), (x,), (torch.ones_like(x),))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = wake(DiT(**dict(SMALL, label_dim=10, pos_embed="learned"))).train()
    x, noise_labels = inputs(net)
    ((net(x, noise_labels, torch.tensor([1, 2, 3, 4])) - x) ** 2).mean().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_student_takes_the_teacher_weights():
    torch.manual_seed(0)
    teacher = Denoiser(wake(DiT(**dict(SMALL, label_dim=3))))
    student = DiT(**dict(SMALL, label_dim=3))
    assert init_from_teacher(student, teacher)
    x, noise_labels = inputs(student)
    with torch.no_grad():
        assert torch.equal(student(x, noise_labels), teacher.backbone(x, noise_labels))
    with pytest.raises(ValueError, match="shape"):
        init_from_teacher(DiT(**dict(SMALL, label_dim=3, hidden_size=64)), teacher)


def test_config_errors():
    with pytest.raises(ValueError, match=r"^patch_size 3 does not divide img_resolution 28; choose one of 1, 2, 4, 7"):
        DiT(patch_size=3)
    with pytest.raises(ValueError, match="patch_size 8 does not divide img_resolution 28"):
        DiT(patch_size=8)
    with pytest.raises(ValueError, match="unknown DiT size 'M'; known: tiny, S, B, L, XL"):
        DiT(size="M")
    with pytest.raises(ValueError, match="num_heads 5 does not divide hidden_size 192"):
        DiT(num_heads=5)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        DiT(depth=0)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        DiT(attention="flash")
    with pytest.raises(ValueError, match="unknown pos_embed"):
        DiT(pos_embed="rope")
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(hidden_size=6, num_heads=3)


def test_input_errors():
    net = DiT(**SMALL)
    x, noise_labels = inputs(net)
    with pytest.raises(ValueError, match=r"^DiT expects x of shape \[B, 1, 16, 16\]; got \[4, 1, 8, 16\]$"):
        net(x[:, :, :8], noise_labels)
    with pytest.raises(ValueError, match=r"x of shape"):
        net(x[0], noise_labels)
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, noise_labels[:2])
    with pytest.raises(ValueError, match="unconditional"):
        net(x, noise_labels, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unexpected inputs"):
        net(x, noise_labels, augment_labels=None)
    with pytest.raises(ValueError, match="class_labels"):
        DiT(**dict(SMALL, label_dim=3))(x, noise_labels, torch.zeros(4, 5))
    torch.testing.assert_close(net(x, torch.tensor(0.5)), net(x, torch.full((4,), 0.5)))


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"^the dit backbone needs timm .*pip install") as error:
        DiT(**SMALL)
    assert "\n" not in str(error.value)


def test_bf16_autocast_and_compile():
    torch.manual_seed(0)
    net = wake(DiT(**dict(SMALL, label_dim=10, label_dropout=0.2))).eval()
    x, noise_labels = inputs(net)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        reference = net(x, noise_labels, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, noise_labels, labels)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, noise_labels, labels), reference)
    assert out.dtype == torch.float32 and (out - reference).norm() / reference.norm() < 0.05


# -- through the training loop

TINY_RUN = ["--backbone", "dit", "--data", "mnist", "data.limit=64", "backbone.depth=1", "backbone.hidden_size=32",
            "backbone.num_heads=2", "backbone.patch_size=7", "train.steps=3", "train.batch_size=8",
            "train.sample_every=0", "train.log_every=1"]


@pytest.mark.parametrize("conditional", [False, True])
def test_three_step_training_run(tmp_path, conditional, capsys):
    from runs import train as runs_train
    from runs.checkpoint import load_checkpoint
    run = tmp_path / "run"
    runs_train.main([*TINY_RUN, f"train.conditional={str(conditional).lower()}", "--out", str(run)])
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["backbone"]["name"] == "dit"
    assert state["config"]["backbone"]["label_dim"] == (10 if conditional else 0)
    assert (run / "metrics.jsonl").read_text().count("\n") == 3


def test_training_with_a_patch_that_does_not_fit_exits_2(tmp_path, capsys):
    from runs import train as runs_train
    with pytest.raises(SystemExit) as exit_info:
        runs_train.main(["--backbone", "dit", "--data", "mnist", "data.limit=64", "backbone.patch_size=8",
                         "train.steps=3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "patch_size 8 does not divide img_resolution 28" in err
