"""MeanFlow (Geng et al. 2025; objectives/meanflow.py): the jvp term against finite differences through the VE <-> flow
conversion, the MeanFlow target against the exact average velocity of a Gaussian (an exact identity with the marginal
velocity, unbiased with the conditional one, zero loss on a point mass), the shared dropout mask, fp32 targets under
bf16 autocast, CFG in training, one- and two-step sampling of the exact flow map, a short from-scratch run that learns
the exact ODE map of a 2-D mixture, runs through the training loop (resume, 2-process DDP with identical weights on
both ranks) and one-line errors for bad settings.

Run as a script (under torchrun) it trains through runs.train and saves each rank's weights: the DDP test's worker."""
import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from models.dit import DiT
from models.mlp import MLP
from models.noise import flow_sigma, flow_t
from models.unet import UNet
from objectives.consistency import random_state, replayed_random_draws
from objectives.meanflow import MeanFlow
from solvers import sample_heun, sigmas_for_nfe

VAR = 0.25  # Gaussian data variance (sigma_data = 0.5)


# -- test networks


class SmoothTwoTime(nn.Module):
    """A small float64 two-time backbone on [B, 1, 2, 2] images: F(x, c, c_to) = MLP(x, sin c, cos c, c_to, c c_to)."""

    two_time, label_dim = True, 0

    def __init__(self, seed=0, hidden=16):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(8, hidden).double(), nn.Linear(hidden, 4).double()

    def forward(self, x, noise_labels, class_labels=None, target_noise_labels=None):
        c, s = noise_labels.double(), target_noise_labels.double()
        h = torch.cat([x.double().flatten(1), torch.stack([c.sin(), c.cos(), s, c * s], 1)], 1)
        return self.out(torch.tanh(self.inp(h))).reshape(x.shape)


def exact_average_velocity(z, r, t, mu, var):
    """u*(z_t, r, t) of data N(mu, var I) in flow coordinates. On a trajectory x_VE(sigma) - mu = C sqrt(var + sigma^2)
    (the exact map G* below), so z_s = (1 - s) mu + C S_s with S_s = sqrt(var (1 - s)^2 + s^2), and
    u* = (z_t - z_r) / (t - r) = -mu + C (S_t - S_r) / (t - r), (S_t - S_r) / (t - r) = (t + r - var (2 - t - r)) /
    (S_t + S_r) (no cancellation as r -> t)."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    t, r = t.reshape(shape), r.reshape(shape)
    s_t, s_r = (var * (1 - t) ** 2 + t**2).sqrt(), (var * (1 - r) ** 2 + r**2).sqrt()
    return -mu + (z - (1 - t) * mu) / s_t * ((t + r) - var * (2 - t - r)) / (s_t + s_r)


def exact_flow_map(x, sigma, sigma_to, mu, var):
    """G*(x, sigma, sigma_to) = mu + sqrt((var + sigma_to^2) / (var + sigma^2)) (x - mu), VE."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return mu + ((var + sigma_to.reshape(shape) ** 2) / (var + sigma.reshape(shape) ** 2)).sqrt() * (x - mu)


class ExactGaussianBackbone(nn.Module):
    """The backbone of an exact MeanFlow student for data N(mu, var I): F(z_t, ln sigma_t / 4, ln sigma_r / 4) =
    u*(z_t, r, t) (t = sigmoid(ln sigma)), plus `perturb` sin(3 z) for a wrong one. float64, no parameters."""

    two_time, label_dim = True, 0

    def __init__(self, mu, var=VAR, perturb=0.0):
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.var, self.perturb = var, perturb

    def forward(self, x, noise_labels, class_labels=None, target_noise_labels=None):
        z = x.double()
        t, r = torch.sigmoid(4 * noise_labels.double()), torch.sigmoid(4 * target_noise_labels.double())
        return exact_average_velocity(z, r, t, self.mu, self.var) + self.perturb * torch.sin(3 * z)


def randomised(module, std=0.05, seed=0):
    """`module` with its zero- or near-zero-initialised parameters (adaLN-Zero, output layers) drawn random."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, std)
    return module


def mlp(dim=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomised(MLP(dim=dim, hidden=32, num_blocks=1, emb_channels=16, embedding="positional", **kwargs), 0.3)


def times(n, seed, t_max=0.98):
    """(t, r) [n] float64 with 0.002 < r < t < t_max, well inside the objective's level range."""
    g = torch.Generator().manual_seed(seed)
    a, b = (0.005 + (t_max - 0.005) * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2))
    return torch.maximum(a, b), torch.minimum(a, b)


# -- 1. the jvp term


def central_difference(function, z, t, tangent, h):
    return (function(z + h * tangent, t + h) - function(z - h * tangent, t - h)) / (2 * h)


def test_jvp_term_equals_central_differences_through_the_ve_conversion():
    """d/dt u_theta(z, r, t) along (v, 0, 1) by torch.func.jvp equals central differences of u_theta in flow
    coordinates (float64), and u_theta read through the FlowMap's VE jump is the MeanFlow jump z_r = z_t - (t - r) u."""
    objective = MeanFlow(SmoothTwoTime())
    student = objective.networks["student"]
    t, r = times(6, seed=1)
    g = torch.Generator().manual_seed(2)
    z, v = (torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    u, dudt = objective.velocity_and_derivative(z, t, r, v)
    assert u.dtype == dudt.dtype == torch.float64
    finite = central_difference(lambda z_, t_: student.velocity(z_, t_, r), z, t, v, 1e-6)
    torch.testing.assert_close(dudt, finite, rtol=1e-6, atol=1e-8)
    # the chain rule through the conversion matters: the same tangent (v, 1) applied to the VE inputs (x, sigma) of
    # the backbone, as a jvp of the Denoiser's inputs would, gives another (wrong) derivative
    def of_ve_inputs(x, sigma):
        return student.velocity(x * (1 - flow_t(sigma)).reshape(-1, 1, 1, 1), flow_t(sigma), r)

    x_ve, sigma = z / (1 - t).reshape(-1, 1, 1, 1), flow_sigma(t)
    _, naive = torch.func.jvp(of_ve_inputs, (x_ve, sigma), (v, torch.ones_like(sigma)))
    assert (dudt - naive).abs().max() > 1e-2
    # the same weights as a VE flow map: G(z / (1 - t), sigma_t, sigma_r) = z_r / (1 - r)
    shape = (-1, 1, 1, 1)
    with torch.no_grad():
        jump = student(z / (1 - t).reshape(shape), flow_sigma(t), flow_sigma(r))
    torch.testing.assert_close(jump * (1 - r).reshape(shape), z - (t - r).reshape(shape) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "dit", "unet"])
def test_jvp_runs_through_the_project_backbones(kind):
    """float32 backbones (the MLP with positional embedding; a DiT, whose attention takes its math path under jvp; a
    U-Net with an attention layer, whose SDPA call is held to the math kernel in the jvp): jvp against central
    differences to float32 accuracy."""
    if kind == "mlp":
        objective, shape = MeanFlow(mlp(dim=4)), (4, 4)
    elif kind == "dit":
        objective = MeanFlow(randomised(DiT(img_resolution=8, in_channels=1, depth=1, hidden_size=32, num_heads=2,
                                            patch_size=4)))
        shape = (4, 1, 8, 8)
    else:
        objective = MeanFlow(randomised(UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=[1, 2],
                                             num_blocks=1, attn_resolutions=[4])))
        shape = (4, 1, 8, 8)
    t, r = (s.float() for s in times(4, seed=3))
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    objective.networks["student"].eval()
    _, dudt = objective.velocity_and_derivative(z, t, r, v)
    with torch.no_grad():
        finite = central_difference(lambda z_, t_: objective.networks["student"].velocity(z_, t_, r), z, t, v, 1e-3)
    assert (dudt - finite).abs().max() < 2e-2 * finite.abs().max(), (dudt - finite).abs().max()


# -- 2. the target on a single Gaussian


def test_exact_student_is_the_gaussians_flow_map():
    """The exact backbone's u* agrees with G* (VE closed form) read in flow coordinates, and its g(x, sigma, sigma)
    (denoiser()) is the Gaussian's exact denoiser."""
    mu = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).reshape(1, 2, 2)
    objective = MeanFlow(ExactGaussianBackbone(mu))
    t, r = times(8, seed=5)
    z = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    shape = (-1, 1, 1, 1)
    u = objective.networks["student"].velocity(z, t, r)
    z_r = (1 - r).reshape(shape) * exact_flow_map(z / (1 - t).reshape(shape), flow_sigma(t), flow_sigma(r), mu, VAR)
    torch.testing.assert_close(u, (z - z_r) / (t - r).reshape(shape), rtol=1e-9, atol=1e-9)
    sigma = flow_sigma(t)
    x = z / (1 - t).reshape(shape)
    torch.testing.assert_close(objective.denoiser()(x, sigma),
                               mu + VAR / (VAR + sigma.reshape(shape) ** 2) * (x - mu), rtol=1e-5, atol=1e-5)


def test_meanflow_target_of_the_exact_student_is_its_own_output():
    """u_tgt = v - (t - r) d/dt u is the MeanFlow identity: with the marginal velocity v* = u*(z, t, t) as tangent it
    returns u* exactly; with the conditional velocity e - x it returns u* on average over the posterior of (x, e)
    given z_t (the target is affine in v). A perturbed student's target is not its output."""
    mu = torch.tensor([0.7, -0.3, 0.2], dtype=torch.float64)
    exact, wrong = MeanFlow(ExactGaussianBackbone(mu)), MeanFlow(ExactGaussianBackbone(mu, perturb=0.1))
    t, r = times(16, seed=7)
    t[:4] = r[:4]  # rows with r = t: plain flow matching
    x0 = mu + math.sqrt(VAR) * torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    e = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    z = (1 - t)[:, None] * x0 + t[:, None] * e
    u_star = exact_average_velocity(z, r, t, mu, VAR)
    v_star = exact_average_velocity(z, t, t, mu, VAR)
    torch.testing.assert_close(exact.target(z, t, r, v_star), u_star, rtol=1e-9, atol=1e-9)
    gap = wrong.target(z, t, r, v_star) - wrong.networks["student"].velocity(z, t, r)
    assert gap[4:].norm(dim=1).min() > 1e-3  # r != t rows: the identity fails for a wrong u

    # the conditional velocity: posterior draws of x0 given z_t (Gaussian), e = (z_t - (1 - t) x0) / t
    n, k = 4, 20000
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.05, 0.01],
                                                                                dtype=torch.float64)
    z = (1 - t)[:, None] * x0[:n] + t[:, None] * e[:n]
    precision = 1 / VAR + ((1 - t) / t) ** 2
    mean = (mu / VAR + ((1 - t) / t**2)[:, None] * z) / precision[:, None]
    g = torch.Generator().manual_seed(10)
    x_post = (mean[:, None] + torch.randn(n, k, 3, dtype=torch.float64, generator=g)
              / precision.sqrt()[:, None, None]).reshape(-1, 3)
    tt, rr = (s[:, None].expand(n, k).reshape(-1) for s in (t, r))
    zz = z[:, None].expand(n, k, 3).reshape(-1, 3)
    v_cond = (zz - (1 - tt)[:, None] * x_post) / tt[:, None] - x_post
    for student, close in ((exact, True), (wrong, False)):
        average = student.target(zz, tt, rr, v_cond).reshape(n, k, 3).mean(1)
        error = (average - student.networks["student"].velocity(z, t, r)).abs().max()
        assert error < 0.03 if close else error > 0.1, (close, float(error))


def test_loss_of_the_exact_student_is_zero_on_a_point_mass():
    """With data a point mass (var = 0) the conditional velocity is the marginal one, so the whole loss (times drawn by
    the objective, noise, graded pass, jvp target, adaptive weight) is zero for the exact student, not for a
    perturbed one."""
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    x = mu.expand(64, 2).clone()
    labels = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    loss, logs = MeanFlow(ExactGaussianBackbone(mu, var=0.0)).loss("student", (x, labels), 0)
    assert float(logs["mse"]) < 1e-20 and float(loss) < 1e-12
    torch.manual_seed(0)
    loss, logs = MeanFlow(ExactGaussianBackbone(mu, var=0.0, perturb=0.1)).loss("student", (x, labels), 0)
    assert float(logs["mse"]) > 1e-3


# -- shared dropout mask, precision, guidance


def test_graded_and_jvp_passes_share_one_dropout_mask():
    objective = MeanFlow(mlp(dropout=0.5))
    student = objective.networks["student"]
    t, r = (s.float() for s in times(32, seed=11))
    z, v = torch.randn(32, 2), torch.randn(32, 2)
    draws = random_state(z.device)
    graded = student(z, t, r, None, flow=True)
    with replayed_random_draws(draws, z.device):
        primal, _ = objective.velocity_and_derivative(z, t, r, v)
    assert torch.equal(primal, graded.detach())
    other, _ = objective.velocity_and_derivative(z, t, r, v)  # fresh masks
    assert not torch.equal(other, graded.detach())


def test_bf16_autocast_on_cpu_keeps_the_target_in_float32():
    objective = MeanFlow(mlp())
    t, r = (s.float() for s in times(64, seed=12))
    z, v = torch.randn(64, 2), torch.randn(64, 2)
    plain = objective.target(z, t, r, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = objective.target(z, t, r, v)
        loss, logs = objective.loss("student", (torch.randn(64, 2), torch.zeros(64, dtype=torch.long)), 0)
    assert target.dtype == torch.float32 and torch.isfinite(target).all() and torch.equal(target, plain)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(logs["mse"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in objective.networks["student"].parameters() if p.grad is not None)


def test_guided_velocity_is_the_papers_cfg_with_label_dropout():
    """v_g = omega v + (1 - omega - kappa) u(z, t, t | null) + kappa u(z, t, t | c) inside cfg_interval, v outside and
    on the label_dropout rows, whose labels become the null (all-zero) row."""
    objective = MeanFlow(mlp(label_dim=3), cfg_omega=2.0, cfg_kappa=0.5, cfg_interval=(0.0, 0.5), label_dropout=0.3)
    student = objective.networks["student"]
    n = 64
    t = torch.rand(n, generator=torch.Generator().manual_seed(13)) * 0.9 + 0.05
    z, v = torch.randn(n, 2), torch.randn(n, 2)
    rows = objective.class_rows(torch.arange(n) % 3, n, z.device)
    torch.manual_seed(5)
    dropped, v_g = objective.guided_velocity(z, t, v, rows)
    torch.manual_seed(5)
    keep = torch.rand(n) >= 0.3
    assert torch.equal(dropped, rows * keep[:, None]) and 0 < int(keep.sum()) < n
    with torch.no_grad():
        student.eval()
        guided = 2.0 * v + (1 - 2.0 - 0.5) * student.velocity(z, t, t, torch.zeros_like(rows)) \
            + 0.5 * student.velocity(z, t, t, rows)
        student.train()
    inside = keep & (t <= 0.5)
    assert 0 < int(inside.sum()) < n
    torch.testing.assert_close(v_g[inside], guided[inside])
    assert torch.equal(v_g[~inside], v[~inside])
    assert student.training  # its mode is restored


# -- 6. sampling


def test_one_and_two_step_samples_of_the_exact_student_are_the_exact_map():
    mu = torch.tensor([[0.4, -0.2], [0.1, 0.6]], dtype=torch.float64).reshape(1, 2, 2)
    objective = MeanFlow(ExactGaussianBackbone(mu))
    z = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    exact = exact_flow_map(80.0 * z, torch.full((16,), 80.0), torch.zeros(16), mu, VAR)
    for nfe in (1, 2, 3):
        with torch.no_grad():
            sample = objective.generate(z, nfe)
        assert sample.shape == z.shape and sample.dtype == torch.float64
        torch.testing.assert_close(sample, exact, rtol=0, atol=1e-4)
    assert objective.sample_levels(2) == [80.0, flow_sigma(80 / 81 / 2), 0.0]
    given = MeanFlow(ExactGaussianBackbone(mu), sample_sigmas=(1.5,))
    assert given.sample_levels(2) == [80.0, 1.5, 0.0]
    with torch.no_grad():
        torch.testing.assert_close(given.generate(z, 2), exact, rtol=0, atol=1e-4)
    random = MeanFlow(mlp())
    for nfe in (1, 2):
        with torch.no_grad():
            assert random.generate(torch.randn(5, 2), nfe).shape == (5, 2)


# -- 3. learning from scratch


def test_short_run_from_scratch_learns_the_exact_ode_map_of_a_mixture():
    """A 4-component 2-D mixture; the exact map z -> x0 by a fine Heun solve of its exact denoiser (what MeanFlow
    trained on its data learns). 150 steps from random weights (evaluated with an EMA of them, as the loop samples)
    bring the one-step error far below its start and below the exact denoiser's own one-step Euler error."""
    from models.ema import update_ema
    from objectives.base import using_networks
    teacher = GaussianMixtureDenoiser(**gaussian_mixture_params(2, 4, seed=0))
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = sample_heun(teacher, 80.0 * z.double(), sigmas_for_nfe("heun", 79)).float()
        euler = float((teacher(80.0 * z.double(), 80.0).float() - exact).norm(dim=1).mean())
    torch.manual_seed(0)
    objective = MeanFlow(MLP(dim=2, hidden=48, num_blocks=1, emb_channels=32, embedding="positional"))
    student = objective.networks["student"]
    average = copy.deepcopy(student).requires_grad_(False)

    def error(nfe):
        with torch.no_grad(), using_networks(objective, {"student": average}):
            return float((objective.generate(z, nfe) - exact).norm(dim=1).mean())

    start = error(1)
    optimiser = torch.optim.Adam(student.parameters(), lr=4e-3)
    generator = torch.Generator().manual_seed(2)
    for step in range(150):
        x0 = teacher.sample(128, generator=generator).float()
        loss, _ = objective.loss("student", (x0, torch.zeros(128, dtype=torch.long)), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        update_ema(average, student, 0.9)
    one, two = error(1), error(2)
    assert one < 0.5 * start and one < 0.5 * euler, (one, start, euler)
    assert two < 0.5 * start, (two, start)


# -- 4. through the training loop


RUN = ["--objective", "meanflow", "--backbone", "mlp", "--data", "gmm", "data.n=256", "backbone.hidden=16",
       "backbone.num_blocks=1", "backbone.embedding=positional", "train.batch_size=16", "train.sample_every=0",
       "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=0"]


def test_runs_train_resumes_exactly_and_the_run_samples(tmp_path):
    from runs.build import load_run
    from runs.checkpoint import load_checkpoint
    from runs.train import make_config, parse_args, train
    from tests.test_distill_runs import assert_same_run_state
    args = RUN + ["backbone.dropout=0.1"]
    train(make_config(parse_args(args + ["train.steps=4"]))[0], tmp_path / "straight")
    train(make_config(parse_args(args + ["train.steps=2"]))[0], tmp_path / "stopped")
    train(make_config(parse_args(["--resume", str(tmp_path / "stopped"), "train.steps=4"]))[0], tmp_path / "stopped",
          resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "stopped")
    assert a["step"] == b["step"] == 4 and "teacher" not in a["config"]
    assert_same_run_state(a, b)
    assert all(torch.isfinite(w).all() for w in a["networks"]["student"].values())
    _, objective = load_run(tmp_path / "straight")
    z = torch.randn(8, 2)
    with torch.no_grad():
        for nfe in (1, 2):
            assert torch.isfinite(objective.generate(z, nfe)).all() and objective.generate(z, nfe).shape == (8, 2)


def test_two_process_ddp_keeps_the_weights_identical_on_both_ranks(tmp_path, run_cli):
    """torchrun with 2 gloo processes, dropout on: each rank draws its own batch, times and masks, the graded pass goes
    through DDP, so after the steps both ranks hold the same weights (those of the checkpoint)."""
    from runs.checkpoint import load_checkpoint
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/test_meanflow.py",
                     *RUN, "backbone.dropout=0.1", "train.steps=2", "--out", tmp_path / "ddp",
                     env={"MEANFLOW_RANK_DIR": str(ranks)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(ranks / f"rank{i}.pt", weights_only=True) for i in range(2))
    saved = load_checkpoint(tmp_path / "ddp")["networks"]["student"]
    initial = torch.load(ranks / "initial0.pt", weights_only=True)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
        assert torch.equal(value, saved[name]), name
    assert any(not torch.equal(value, initial[name]) for name, value in first.items())  # it trained


# -- 7. bad input


@pytest.mark.parametrize("settings, message", [
    (dict(p_std=0.0), "p_std > 0"),
    (dict(p_std=float("nan")), "p_std must be a finite number"),
    (dict(r_neq_t=1.5), "0 <= r_neq_t <= 1"),
    (dict(norm_p=-0.1), "0 <= norm_p <= 1"),
    (dict(norm_c=0.0), "norm_c > 0"),
    (dict(sigma_min=0.001), "0.002 <= sigma_min < sigma_max"),
    (dict(sigma_max=0.001), "0.002 <= sigma_min < sigma_max"),
    (dict(sample_sigmas=(1.0, 2.0)), "must decrease strictly"),
    (dict(sample_sigmas=(100.0,)), "must decrease strictly"),
    (dict(cfg_omega=2.0), "need class labels"),
    (dict(cfg_kappa=1.0), "0 <= cfg_kappa < 1"),
    (dict(cfg_omega=0.0), "cfg_omega > 0"),
    (dict(cfg_interval=(0.5, 0.2)), "cfg_interval must be"),
    (dict(label_dropout=1.0), "0 <= label_dropout < 1"),
    (dict(teacher=nn.Identity()), "takes no teacher"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=None) as info:
        MeanFlow(mlp(), **settings)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_bad_conditional_and_sampling_inputs_are_one_line_errors():
    for settings, message in [(dict(cfg_omega=2.0, label_dropout=0.0), "needs label_dropout > 0"),
                              (dict(cfg_omega=2.0), "set backbone.label_dropout=0")]:
        backbone = mlp(label_dim=3, label_dropout=0.1 if "backbone" in message else 0.0)
        with pytest.raises(ValueError) as info:
            MeanFlow(backbone, **settings)
        assert message in str(info.value) and "\n" not in str(info.value)
    objective = MeanFlow(mlp())
    for nfe in (0, 1.5, True):
        with pytest.raises(ValueError, match="integer nfe >= 1"):
            objective.generate(torch.randn(2, 2), nfe)
    with pytest.raises(ValueError, match="below sigma_min"):
        objective.generate(torch.randn(2, 2), 600)


def test_backbone_without_a_second_time_input_is_a_one_line_error():
    class OneTime(nn.Module):
        def forward(self, x, noise_labels, class_labels=None):
            return x

    for backbone in (OneTime(), nn.Linear(2, 2)):
        with pytest.raises(ValueError) as info:
            MeanFlow(backbone)
        assert "second time input" in str(info.value) and "\n" not in str(info.value)


def test_bad_values_on_the_command_line_exit_2_with_one_line(tmp_path, capsys):
    from runs.train import main
    for override, message in [("objective.p_std=0", "p_std > 0"), ("objective.r_neq_t=2", "0 <= r_neq_t <= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(RUN + ["train.steps=1", "--out", str(tmp_path / "run"), override])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main(["--objective", "meanflow", "--backbone", "fno", "--data", "gmm", "data.dim=64",
              "data.image_shape=[1,8,8]", "backbone.attn_resolutions=[]", "train.steps=1",
              "--out", str(tmp_path / "fno")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "second time input" in err and err.count("\n") == 1, err


if __name__ == "__main__":  # the DDP test's worker: python -m torch.distributed.run ... tests/test_meanflow.py ARGS
    import runs.train
    from runs.train import make_config, parse_args

    rank, where = int(os.environ.get("RANK", 0)), Path(os.environ["MEANFLOW_RANK_DIR"])
    original = runs.train.build_objective

    def build(config, **injected):  # record the initial weights (rank 0's, which DDP broadcasts)
        objective = original(config, **injected)
        torch.save(objective.networks["student"].state_dict(), where / f"initial{rank}.pt")
        return objective

    runs.train.build_objective = build
    args = parse_args(sys.argv[1:])
    config, dataset = make_config(args)
    trained, _ = runs.train.train(config, Path(args.out), dataset=dataset)
    torch.save(trained.networks["student"].state_dict(), where / f"rank{rank}.pt")
