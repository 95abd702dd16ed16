"""TimeGenerator (models/generator.py) and DSNO: the generator is the teacher's denoiser at sigma_max and takes [B]
or [K] / [B, K] targets; DSNO's loss is the paper's SNR-weighted sum over the saved times, it refuses a backbone
without a trajectory output, a short run on analytic-teacher rollouts beats the teacher's one-step Euler sample, and
an FNOUNet initialised from a UNet teacher starts as the teacher on every slice."""
import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from data.mixtures import GaussianMixtureData
from data.trajectories import saved_indices
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.generator import TimeGenerator
from models.mlp import MLP
from models.unet import UNet
from objectives.dsno import DSNO, dsno_weights
from solvers import options_for_nfe, sample_heun, sigmas_for_nfe

SHAPE = (1, 8, 8)


class TinyTrajectoryNet(nn.Module):
    """A toy trajectory backbone: forward(x [B, *shape], noise_labels [B, K] or [K]) -> [B, K, *shape]."""

    TEACHER_FREE_PREFIXES = ("time_mix",)

    def __init__(self, shape=SHAPE, hidden=128, num_times=4):
        super().__init__()
        dim = math.prod(shape)
        self.inp, self.emb = nn.Linear(dim, hidden), nn.Linear(1, hidden)
        self.mid, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, dim)
        self.time_mix = nn.Parameter(torch.zeros(num_times, num_times))

    def forward(self, x, noise_labels, class_labels=None):
        labels = noise_labels.expand(x.shape[0], -1) if noise_labels.ndim == 1 else noise_labels
        h = self.inp(x.flatten(1))[:, None] + self.emb(labels[..., None])  # [B, K, hidden]
        h = self.out(F.silu(self.mid(F.silu(h))))
        h = h + torch.einsum("kj,bjd->bkd", self.time_mix, h)
        return h.reshape(x.shape[0], labels.shape[1], *x.shape[1:])


def image_mixture_teacher():
    data = GaussianMixtureData(dim=64, components=4, n=10, seed=0, image_shape=list(SHAPE))
    return GaussianMixtureDenoiser.from_data(data).float().eval()


def tiny_unet(**kwargs):
    return UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(), **kwargs)


def rollouts(teacher, z, dsno):
    """What the loop feeds dsno: xs [B, K, ...], the teacher's Heun states at dsno.rollout_sigmas from grid[0] z."""
    plan = dsno.rollouts
    grid = sigmas_for_nfe(plan["solver"], plan["nfe"], plan["schedule"], sigma_min=plan["sigma_min"],
                          sigma_max=plan["sigma_max"], rho=plan["rho"])
    with torch.no_grad():
        _, trajectory = sample_heun(teacher, grid[0] * z, grid, return_trajectory=True,
                                    **options_for_nfe("heun", plan["nfe"]))
    return trajectory[saved_indices(grid, plan["save_sigmas"])].transpose(0, 1)


# ----------------------------------------------------------------------------------------------- TimeGenerator

def test_generator_at_sigma_max_is_the_teachers_denoiser():
    torch.manual_seed(0)
    backbone = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16)
    nn.init.normal_(backbone.out.weight, std=0.3)
    for parameterisation in ("edm", "eps", "flow"):
        teacher = Denoiser(backbone, parameterisation, sigma_data=0.7)
        student = TimeGenerator(MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16), sigma_max=80.0,
                                parameterisation=parameterisation, sigma_data=0.7)
        student.backbone.load_state_dict(backbone.state_dict())
        z = torch.randn(8, 2)
        assert torch.equal(student(z, torch.full((8,), 80.0)), teacher(80.0 * z, torch.full((8,), 80.0)))
        assert torch.equal(student(z, 80.0), teacher(80.0 * z, 80.0))
        assert not torch.allclose(student(z, torch.full((8,), 1.0)), teacher(80.0 * z, 80.0))


def test_generator_shapes_and_noise_labels():
    """Plain backbone: [B] targets -> [B, *shape]; trajectory backbone: [K] or [B, K] -> [B, K, *shape]; sigma_out
    enters only as the noise label ln(max(sigma, sigma_min)) / 4."""
    torch.manual_seed(0)
    z = torch.randn(3, *SHAPE)
    plain = TimeGenerator(tiny_unet(), sigma_min=0.002)
    assert plain(z, torch.tensor([80.0, 1.0, 0.0])).shape == (3, *SHAPE)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        plain(z, torch.tensor([1.0, 0.0]))

    trajectory = TimeGenerator(TinyTrajectoryNet(), sigma_min=0.002)
    sigmas = torch.tensor([12.0, 2.0, 0.06, 0.0])
    out = trajectory(z, sigmas)
    assert out.shape == (3, 4, *SHAPE)
    torch.testing.assert_close(trajectory(z, sigmas.expand(3, -1)), out)
    assert not torch.allclose(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match=r"\[K\] or \[3, K\]"):
        trajectory(z, torch.tensor(1.0))

    seen = []
    probe = TimeGenerator(TinyTrajectoryNet(), sigma_min=0.002)
    probe.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    probe(z, sigmas)
    torch.testing.assert_close(seen[0], (sigmas.clamp_min(0.002).log() / 4).expand(3, -1))


# ------------------------------------------------------------------------------------------------------- DSNO

def test_loss_by_hand_and_weights():
    """L = mean_b sum_k w_k mean((alpha_k (x_hat_k - xs_k))^2), w = clamp(1 / sigma, 1, 1e4), alpha_k = (1 + sigma_k^2)^-1/2,
    x_hat the EDM-preconditioned
    output at sigma_max with the noise label of each saved time."""
    torch.manual_seed(0)
    teacher = image_mixture_teacher()
    dsno = DSNO(TinyTrajectoryNet(), teacher=teacher)
    sigmas = dsno.rollout_sigmas
    assert len(sigmas) == 4 and sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])
    torch.testing.assert_close(dsno.weights, torch.tensor([min(max(1 / s, 1.0), 1e4) if s > 0 else 1e4
                                                           for s in sigmas.tolist()], dtype=torch.float64))
    torch.testing.assert_close(dsno_weights(torch.tensor([1.218, 0.414, 0.0985, 0.0])),
                               torch.tensor([1.0, 2.4155, 10.1523, 1e4]), rtol=1e-4, atol=0)  # the paper's CIFAR w

    z, xs = torch.randn(5, *SHAPE), torch.randn(5, 4, *SHAPE)
    loss, logs = dsno.loss("student", (z, xs, torch.zeros(5, dtype=torch.long)), step=0)
    sd, smax = 0.5, dsno.networks["student"].sigma_max  # an analytic teacher: EDM preconditioning, sigma_data 0.5
    with torch.no_grad():
        labels = torch.log(torch.tensor([max(s, 0.002) for s in sigmas.tolist()])) / 4
        F_out = dsno.networks["student"].backbone(smax * z / math.sqrt(smax**2 + sd**2), labels.float())
        x_hat = sd**2 / (smax**2 + sd**2) * smax * z[:, None] + smax * sd / math.sqrt(smax**2 + sd**2) * F_out
        alpha = [1 / math.sqrt(1 + s**2) for s in sigmas.tolist()]  # the paper's VP states
        expected = sum(float(dsno.weights[k]) * (alpha[k] * (x_hat[:, k] - xs[:, k])).square().flatten(1).mean(1)
                       for k in range(4)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert set(logs) == {"loss", "d_0", "d_1", "d_2", "d_3"}

    normalised = DSNO(TinyTrajectoryNet(), teacher=teacher, normalise_weights=True)
    normalised.networks["student"].load_state_dict(dsno.networks["student"].state_dict())
    loss_n, _ = normalised.loss("student", (z, xs, torch.zeros(5, dtype=torch.long)), step=0)
    torch.testing.assert_close(loss_n, loss / dsno.weights.sum().float())


def test_refuses_a_backbone_without_a_trajectory_and_a_missing_teacher():
    with pytest.raises(ValueError, match=re.escape("dsno needs a backbone that outputs a trajectory (fno); got unet")):
        DSNO(tiny_unet(), teacher=image_mixture_teacher())
    with pytest.raises(ValueError, match="dsno needs a teacher"):
        DSNO(TinyTrajectoryNet(), teacher=None)


def test_short_run_beats_the_teachers_one_step_euler():
    """Adam on analytic-teacher rollouts (image-shaped 4-component mixture): the loss falls, and the one-pass x0 on
    held-out noise is far closer to the teacher's ODE map than the teacher's 1-NFE Euler sample D(80 z, 80)."""
    torch.manual_seed(0)
    teacher = image_mixture_teacher()
    dsno = DSNO(TinyTrajectoryNet(), teacher=teacher)
    z = torch.randn(768, *SHAPE, generator=torch.Generator().manual_seed(1))
    xs = rollouts(teacher, z, dsno)
    (z_train, xs_train), (z_test, xs_test) = (z[:512], xs[:512]), (z[512:], xs[512:])
    optimiser = torch.optim.Adam(dsno.networks["student"].parameters(), lr=3e-3)
    labels = torch.zeros(128, dtype=torch.long)
    losses = []
    for step in range(300):
        batch = torch.randint(0, 512, (128,))
        loss, _ = dsno.loss("student", (z_train[batch], xs_train[batch], labels), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        error = (dsno.generate(z_test, nfe=1) - xs_test[:, -1]).flatten(1).norm(dim=1).mean()
        euler_error = (teacher(80.0 * z_test, 80.0) - xs_test[:, -1]).flatten(1).norm(dim=1).mean()
        assert torch.equal(dsno.trajectory(z_test)[:, -1], dsno.generate(z_test, nfe=1))
    assert sum(losses[-20:]) < 0.1 * sum(losses[:20])
    assert error < 0.5 * euler_error, (error, euler_error)
    with pytest.raises(ValueError, match="nfe=1"):
        dsno.generate(z_test, nfe=2)


def test_fno_student_starts_as_the_unet_teacher_on_every_slice():
    """FNOUNet initialised from a trained UNet Denoiser: zero temporal layers, so slice k is the teacher's network
    at sigma_k's noise label (TimeGenerator over the teacher's UNet); one loss reaches the temporal layers."""
    from models.fno import FNOUNet

    torch.manual_seed(0)
    unet = tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = Denoiser(unet, "edm", sigma_data=0.5).eval().requires_grad_(False)
    dsno = DSNO(FNOUNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                        attn_resolutions=(), num_times=4), teacher=teacher)
    z = torch.randn(2, *SHAPE)
    per_slice = TimeGenerator(unet, sigma_max=dsno.networks["student"].sigma_max, sigma_data=0.5)
    expected = torch.stack([per_slice(z, torch.full((2,), s)) for s in dsno.rollout_sigmas.tolist()], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(dsno.trajectory(z), expected, rtol=1e-4, atol=1e-5)
    loss, _ = dsno.loss("student", (z, torch.randn(2, 4, *SHAPE), torch.zeros(2, dtype=torch.long)), step=0)
    loss.backward()
    grads = [p.grad for name, p in dsno.networks["student"].named_parameters() if ".time_layers." in f".{name}"]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_save_sigmas_takes_a_list_of_sigmas_through_the_config():
    """The paper's output times are a list; the config checks by the default's type (an int) unless the argument's
    annotation widens it (runs.config.widened_annotation)."""
    from runs.config import resolve_component
    listed = resolve_component("objective", {"name": "dsno", "save_sigmas": [1.218, 0.414, 0.0985, 0]})
    assert listed["save_sigmas"] == [1.218, 0.414, 0.0985, 0]
    assert resolve_component("objective", {"name": "dsno", "save_sigmas": 3})["save_sigmas"] == 3
    with pytest.raises(ValueError, match="objective.sigma_max"):  # other arguments are still checked by type
        resolve_component("objective", {"name": "dsno", "sigma_max": "high"})
