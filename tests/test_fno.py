"""Tests for models/fno.py (DSNO's FNOUNet): shapes for any K, the temporal Fourier layer against an FFT reference,
teacher equivalence at the zero init, time mixing once the spectral weights move, gradients, loading a UNet's weights,
clear errors, bf16 autocast and torch.compile."""
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

from models.denoiser import Denoiser
from models.fno import FNOUNet, TemporalFourierLayer
from models.unet import UNet
from objectives.base import init_from_teacher
from tests.nets import wake

TINY = dict(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(4,))
B = 3



def perturb(net, std=0.3):
    """Move every spectral weight away from its zero init."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(FNOUNet.TEACHER_FREE_PREFIXES):
                p.normal_(0, std)
    return net


def inputs(K, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.randn(batch, K, generator=g)


def teacher_and_student(label_dim=5, **fno):
    torch.manual_seed(0)
    teacher = Denoiser(wake(UNet(**TINY, label_dim=label_dim))).eval().requires_grad_(False)
    student = FNOUNet(**TINY, label_dim=label_dim, **fno)
    assert init_from_teacher(student, teacher, allow_missing=FNOUNet.TEACHER_FREE_PREFIXES)
    return teacher.backbone, student


@pytest.mark.parametrize("K", [1, 2, 4, 5])
@pytest.mark.parametrize("labels", [None, "index", "onehot"])
def test_output_shape(K, labels):
    torch.manual_seed(0)
    net = perturb(wake(FNOUNet(**TINY, label_dim=0 if labels is None else 5))).eval()
    x, noise_labels = inputs(K)
    class_labels = {None: None, "index": torch.tensor([0, 4, 2]),
                    "onehot": F.one_hot(torch.tensor([1, 3, 0]), 5).float()}[labels]
    with torch.no_grad():
        out = net(x, noise_labels, class_labels)
    assert out.shape == (B, K, 1, 8, 8)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"must be \[3, K\].*not as a Denoiser"):
        net(x, noise_labels[:, 0], class_labels)  # [B], as a Denoiser would pass: refused, not read as K = B


@pytest.mark.parametrize("time_modes", [1, 2, 3])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_temporal_layer_is_the_truncated_spectral_convolution(time_modes, K):
    """h + LeakyReLU(irfft(W_m rfft(h)_m for the lowest time_modes frequencies)) along K, per pixel and channel."""
    torch.manual_seed(0)
    C, H, W = 4, 3, 2
    layer = TemporalFourierLayer(C, time_modes, init="dsno")
    weight = torch.complex(torch.randn(C, C, time_modes), torch.randn(C, C, time_modes))
    with torch.no_grad():
        layer.spectral.weight.real_imag.copy_(torch.view_as_real(weight))
    h = torch.randn(2 * K, C, H, W)
    spectrum = torch.fft.rfft(h.view(2, K, C, H, W), dim=1)            # [2, K//2+1, C, H, W]
    kept = min(time_modes, K // 2 + 1)
    mixed = torch.einsum("bmihw,iom->bmohw", spectrum[:, :kept], weight[:, :, :kept])
    mixed = torch.cat([mixed, torch.zeros_like(spectrum[:, kept:])], dim=1)
    expected = h + F.leaky_relu(torch.fft.irfft(mixed, n=K, dim=1).reshape(2 * K, C, H, W), 0.01)
    torch.testing.assert_close(layer(h, K), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [1, 4])
def test_teacher_equivalence_at_init(K):
    """Zero spectral weights + the teacher's weights: slice k is the teacher at noise_labels[:, k]."""
    teacher, student = teacher_and_student()
    x, noise_labels = inputs(K)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        out = student(x, noise_labels, labels)
        for k in range(K):
            # a batch of B instead of B*K may round differently in the convolutions
            torch.testing.assert_close(out[:, k], teacher(x, noise_labels[:, k], labels), rtol=1e-5, atol=1e-5)
        # on the same B*K batch the computation is the teacher's, op for op: bit-identical
        flat = teacher(x.repeat_interleave(K, 0), noise_labels.reshape(-1), labels.repeat_interleave(K))
    assert torch.equal(out.reshape(B * K, 1, 8, 8), flat)
    assert out.abs().mean() > 0.1  # a woken net: the comparison is not between two near-zero outputs


def test_slices_interact_only_after_the_spectral_weights_move():
    teacher, student = teacher_and_student()
    x, noise_labels = inputs(4)
    moved = noise_labels.clone()
    moved[:, 1] += 1.0  # change one output time's label
    with torch.no_grad():
        before, after = student(x, noise_labels), student(x, moved)
        assert torch.equal(before[:, [0, 2, 3]], after[:, [0, 2, 3]])  # independent slices at init
        assert not torch.allclose(before[:, 1], after[:, 1])
        perturb(student)
        before, after = student(x, noise_labels), student(x, moved)
    for k in (0, 2, 3):
        change = (after[:, k] - before[:, k]).abs().max()
        assert change > 1e-3, f"slice {k} does not see slice 1's label after perturbation ({change:.2e})"


@pytest.mark.parametrize("init", ["zero", "dsno"])
def test_gradient_reaches_every_spectral_weight(init):
    torch.manual_seed(0)
    net = wake(FNOUNet(**TINY, time_layer_init=init))
    x, noise_labels = inputs(4)
    net(x, noise_labels).square().mean().backward()
    spectral = {n: p for n, p in net.named_parameters() if n.startswith("time_layers.")}
    assert len(spectral) == len(net.enc) + len(net.mid) + len(net.dec)
    for name, p in spectral.items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in net.parameters())


def test_parameters_are_real_so_ema_works():
    """The complex spectral weights are stored as real (re, im) pairs: EMA's float32 lerp must keep them intact."""
    from models.ema import make_ema, update_ema
    torch.manual_seed(0)
    net = perturb(FNOUNet(**TINY))
    assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point() or v.is_complex())
    ema = make_ema(net)
    perturb(net)
    update_ema(ema, net, beta=0.0)
    for (name, p), q in zip(net.named_parameters(), ema.parameters()):
        assert torch.equal(p, q), name


def test_unet_state_dict_loads_with_only_the_time_layers_missing():
    torch.manual_seed(0)
    unet, fno = UNet(**TINY, label_dim=5), FNOUNet(**TINY, label_dim=5, num_times=3, time_modes=2)
    result = fno.load_state_dict(unet.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(FNOUNet.TEACHER_FREE_PREFIXES) for k in result.missing_keys)
    assert set(unet.state_dict()) == {k for k in fno.state_dict() if not k.startswith("time_layers.")}
    with pytest.raises(ValueError, match="student has .* parameters the teacher lacks"):
        init_from_teacher(fno, Denoiser(unet))  # the temporal layers are allowed missing only when asked


def test_wrong_shape_teacher_is_a_value_error():
    torch.manual_seed(0)
    teacher = Denoiser(UNet(**dict(TINY, model_channels=16))).eval()
    with pytest.raises(ValueError, match="shape"):
        init_from_teacher(FNOUNet(**TINY), teacher, allow_missing=FNOUNet.TEACHER_FREE_PREFIXES)


@pytest.mark.parametrize("shape", [(), (B + 1, 4), (B, 4, 1), (B, 0), (0,)])
def test_wrong_noise_labels_shape_is_a_value_error(shape):
    net = FNOUNet(**TINY)
    x, _ = inputs(4)
    with pytest.raises(ValueError, match=r"noise_labels must be \[3, K\]"):
        net(x, torch.zeros(shape))


def test_config_errors_and_signature():
    unet = inspect.signature(UNet).parameters
    fno = inspect.signature(FNOUNet).parameters
    assert all(fno[name].default == p.default for name, p in unet.items()), "FNOUNet must take UNet's arguments"
    assert {"num_times", "time_modes", "time_layer_init"} <= set(fno)
    with pytest.raises(ValueError, match="time_layer_init"):
        FNOUNet(**TINY, time_layer_init="random")
    with pytest.raises(ValueError, match="time_modes"):
        FNOUNet(**TINY, time_modes=0)
    with pytest.raises(ValueError, match="unconditional"):
        FNOUNet(**TINY)(*inputs(2), class_labels=torch.tensor([0, 1, 2]))


def test_missing_neuraloperator_is_a_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "neuralop.layers.spectral_convolution", None)
    with pytest.raises(ImportError, match="pip install neuraloperator") as error:
        FNOUNet(**TINY)
    assert "\n" not in str(error.value)


def test_bf16_autocast_forward():
    teacher, student = teacher_and_student()
    perturb(student, std=0.05)
    x, noise_labels = inputs(4)
    with torch.no_grad():
        reference = student(x, noise_labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student(x, noise_labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.05, f"bf16 deviates from float32 by {rel:.3f}"


def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = perturb(FNOUNet(**TINY, label_dim=5, label_dropout=0.2)).eval()
    x, noise_labels = inputs(4)
    labels = torch.tensor([1, 2, 3])
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, noise_labels, labels), net(x, noise_labels, labels))
