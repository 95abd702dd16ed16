"""sCM (Lu & Song 2024): the TrigFlow conversions against closed forms, the JVP against finite differences, the tangent
and loss at the exact solution of a single Gaussian (zero for sCD; zero on average for sCT), the shared dropout mask
and the DDP-safe passes, bf16 autocast, short runs that learn a 2-D mixture's exact ODE map, runs through runs.train
(one and two processes) and the one-line errors."""
import math

import pytest
import torch
from torch import nn

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from models.trigflow import TrigFlowConsistency, noise_label, trigflow_sigma, trigflow_t, trigflow_velocity
from models.unet import UNet
from objectives import OBJECTIVES
from objectives.consistency import random_state, replayed_random_draws
from objectives.scm import SCD, SCT
from solvers import sample_heun, sigmas_for_nfe

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.jvp's own import

SD = 0.5


class TinyNet(nn.Module):
    """A float64 backbone (x, noise_labels) -> like x, smooth in both, for finite differences."""

    def __init__(self, dim=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(dim + 1, 16, dtype=torch.float64)
        self.b = nn.Linear(16, dim, dtype=torch.float64)

    def forward(self, x, noise_labels, class_labels=None):
        return self.b(torch.tanh(self.a(torch.cat([x, noise_labels[:, None]], dim=1))))


class ExactGaussian(nn.Module):
    """The exact sCM backbone for data N(mu, var I): its f is the exact ODE map to sigma = 0,
    f = mu + sqrt(var / (var + sigma^2)) (x_VE - mu), returned as the EDM-signed F = -(cos t x_t - f) / (sd sin t).
    `gain` (1) gives the loss a parameter to differentiate."""

    def __init__(self, mu, var, time_label="t"):
        super().__init__()
        self.mu, self.var, self.time_label = mu, var, time_label
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x_in, noise_labels, class_labels=None):
        t = noise_labels if self.time_label == "t" else torch.atan2((4 * noise_labels).exp(), torch.full_like(
            noise_labels, SD))
        cos, sin = t.cos()[:, None], t.sin()[:, None]
        x_t = SD * x_in
        sigma = SD * t.tan()[:, None]
        f = self.mu + (self.var / (self.var + sigma**2)).sqrt() * (x_t / cos - self.mu)
        return -self.gain * (cos * x_t - f) / (SD * sin)


def gaussian(dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, var = torch.randn(dim, generator=g, dtype=torch.float64), 0.3
    teacher = GaussianMixtureDenoiser(mu[None], torch.full((1, dim), var, dtype=torch.float64), torch.ones(1))
    return mu, var, teacher


def mixture():
    return GaussianMixtureDenoiser(**gaussian_mixture_params(2, 4, seed=0)).float()


def small_mlp(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16, embedding="positional", **kwargs)
    nn.init.normal_(net.out.weight, std=0.3)  # MLP zero-initialises its output layer
    return net


def batch_of(x0):
    return x0, torch.zeros(x0.shape[0], dtype=torch.long)


# -- TrigFlow in the project's sigma space


def test_trigflow_student_is_an_edm_denoiser_with_the_sign_of_F_flipped():
    """c_noise = "edm": f(x, sigma) = c_skip x + c_out F_EDM(c_in x, ln(sigma)/4) with F_EDM = the backbone: a student
    on a copy of an EDM teacher's backbone starts as exactly the teacher's denoiser."""
    backbone = small_mlp(1)
    student, edm = TrigFlowConsistency(backbone, SD, "edm"), Denoiser(backbone, "edm", SD)
    x = torch.randn(6, 2) * 3
    for sigma in (0.002, 0.3, 2.0, 80.0):
        torch.testing.assert_close(student(x, torch.full((6,), sigma)), edm(x, torch.full((6,), sigma)),
                                   rtol=1e-5, atol=1e-5)
    t = torch.tensor([0.01, 0.7, 1.5])
    torch.testing.assert_close(trigflow_t(trigflow_sigma(t, SD), SD), t)
    torch.testing.assert_close(noise_label(t, "edm", SD), (SD * t.tan()).log() / 4)
    assert float(trigflow_t(torch.tensor(float("inf")), SD)) == pytest.approx(math.pi / 2)


def test_velocity_and_consistency_function_against_the_gaussians_closed_forms():
    """dx_t/dt from the denoiser equals the time derivative of x_t = cos t x_VE(sd tan t) along the exact VE flow, and
    the exact backbone's f is the exact ODE map to sigma = 0, in VE space."""
    mu, var, teacher = gaussian()
    x1 = torch.randn(5, 3, dtype=torch.float64)
    s1 = 2.0
    t = torch.tensor([0.05, 0.4, 0.9, 1.3, 1.55], dtype=torch.float64)

    def x_t(tt):  # TrigFlow state on the ODE path through (x1, s1)
        return tt.cos()[:, None] * teacher.exact_flow(x1, torch.full((5,), s1, dtype=torch.float64),
                                                       trigflow_sigma(tt, SD))

    h = 1e-6
    finite = (x_t(t + h) - x_t(t - h)) / (2 * h)
    torch.testing.assert_close(trigflow_velocity(teacher, x_t(t), t, SD), finite, rtol=1e-6, atol=1e-7)
    student = TrigFlowConsistency(ExactGaussian(mu, var), SD, "t")
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64) * 4
    torch.testing.assert_close(student(x, sigma), teacher.exact_flow(x, sigma, torch.zeros(5, dtype=torch.float64)))


# -- the JVP and the tangent


@pytest.mark.parametrize("label", ["t", "edm"])
def test_jvp_term_matches_finite_differences(label):
    """cos t sin t dF/dt along (dx_t/dt, 1), float64, near both ends of [t_min, t_max] too."""
    sct = SCT(TinyNet(), c_noise=label)
    student = sct.networks["student"]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    dxdt = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([sct.t_min, 0.02, 0.5, 1.0, 1.5, sct.t_max], dtype=torch.float64)
    with torch.no_grad():
        F, dF = sct.time_derivative(x_t, t, dxdt, None)
        cs, h = (t.cos() * t.sin())[:, None], 1e-6
        finite = (student.F(x_t + h * cs * dxdt, t + h * cs[:, 0]) - student.F(x_t - h * cs * dxdt, t - h * cs[:, 0]))
        finite = finite / (2 * h)
    torch.testing.assert_close(F, student.F(x_t, t))
    torch.testing.assert_close(dF, finite, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("label", ["t", "edm"])
def test_scd_with_the_exact_teacher_has_zero_tangent_loss_and_gradient_at_the_exact_solution(label):
    """F = the exact consistency function, dx_t/dt = the exact PF-ODE: g = cos t df/dt along the ODE = 0 once r = 1,
    so the residual F - F- - g and the loss vanish and the gradient is 0. Before the warm-up ends g = (1 - r) g(r=0)."""
    mu, var, teacher = gaussian()
    scd = SCD(ExactGaussian(mu, var, label), teacher=teacher, c_noise=label, sigma_data=SD, tangent_warmup_steps=10)
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(1))
    t = scd.draw_times(64, "cpu", torch.float64)
    z = SD * torch.randn_like(x0)
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * z
    with torch.no_grad():
        v = scd.velocity(x0, z, x_t, t, None)
        F, dF = scd.time_derivative(x_t, t, v, None)
        g = scd.tangent(F, dF, x_t, v, t, step=10)
        g0, g_half = scd.tangent(F, dF, x_t, v, t, step=0), scd.tangent(F, dF, x_t, v, t, step=5)
    assert g.abs().max() < 1e-9 and g0.abs().max() > 0.1
    torch.testing.assert_close(g_half, 0.5 * g0)
    torch.manual_seed(0)
    loss, logs = scd.loss("student", batch_of(x0), step=10)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12 and float(logs["residual"]) < 1e-18
    assert abs(float(scd.networks["student"].backbone.gain.grad)) < 1e-12


def test_sct_tangent_is_the_exact_tangent_on_average_over_the_posterior():
    """sCT's dx_t/dt = cos t z - sin t x0 = (cos t x_t - x0) / sin t given x_t, affine in x0, and so is g: at the
    exact solution the tangents of two draws x0 = m +- delta around the posterior mean m = D(x_VE, sigma) average to
    the sCD tangent, 0, while each is far from it."""
    mu, var, teacher = gaussian()
    sct = SCT(ExactGaussian(mu, var), sigma_data=SD, tangent_warmup_steps=0)
    t = torch.tensor([0.1, 0.6, 1.1, 1.5], dtype=torch.float64)
    x_t = torch.randn(4, 3, dtype=torch.float64)
    m = teacher(x_t / t.cos()[:, None], trigflow_sigma(t, SD))
    delta = torch.randn(4, 3, dtype=torch.float64)
    tangents = []
    with torch.no_grad():
        for x0 in (m + delta, m - delta):
            z = (x_t - t.cos()[:, None] * x0) / t.sin()[:, None]
            v = sct.velocity(x0, z, x_t, t, None)
            tangents.append(sct.tangent(*sct.time_derivative(x_t, t, v, None), x_t, v, t, step=0))
    assert min(g.abs().max() for g in tangents) > 0.1
    torch.testing.assert_close((tangents[0] + tangents[1]) / 2, torch.zeros_like(x_t), atol=1e-10, rtol=0)


def test_graded_pass_through_the_wrapper_jvp_on_the_module_with_the_same_dropout_mask():
    """The loss calls self.networks["student"] (a DDP stand-in exposing .module) once for the graded pass and runs the
    JVP on the unwrapped module, with the graded pass's dropout mask (a fresh mask would give another F-)."""

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.outputs = module, []

        def forward(self, *args, **kwargs):
            out = self.module(*args, **kwargs)
            self.outputs.append(out[0].detach())
            return out

    sct = SCT(small_mlp(2, dropout=0.5))
    student = sct.networks["student"]
    sct.networks["student"] = Wrapper(student)
    primals, jvp = [], sct.time_derivative
    sct.time_derivative = lambda *args: primals.append(jvp(*args)) or primals[-1]
    torch.manual_seed(0)
    loss, _ = sct.loss("student", batch_of(torch.randn(32, 2)), step=1)
    loss.backward()
    assert len(sct.networks["student"].outputs) == 1 and len(primals) == 1
    assert torch.equal(sct.networks["student"].outputs[0], primals[0][0])
    assert all(p.grad is not None for p in student.parameters())
    assert student.weighting.net[-1].bias.grad.abs() > 0  # w(t) is trained by the same loss
    # and the mask is what makes them equal
    x_t, t = torch.randn(32, 2), torch.rand(32)
    draws = random_state(x_t.device)
    graded = student(x_t, t, trigflow=True)[0]
    with torch.no_grad(), replayed_random_draws(draws, x_t.device):
        assert torch.equal(sct.time_derivative(x_t, t, torch.ones_like(x_t), None)[0], graded)
    with torch.no_grad():
        assert not torch.equal(sct.time_derivative(x_t, t, torch.ones_like(x_t), None)[0], graded)


def tangents_of(objective, batch, step, amp=None):
    """(loss, [tangent before normalisation], [cos t sin t dF/dt]) of one loss call, under bf16 autocast if amp."""
    seen, derivatives = [], []
    tangent, jvp = objective.tangent, objective.time_derivative
    objective.tangent = lambda *args: seen.append(tangent(*args)) or seen[-1]
    objective.time_derivative = lambda *args: derivatives.append(jvp(*args)) or derivatives[-1]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        loss, _ = objective.loss("student", batch, step)
    del objective.tangent, objective.time_derivative
    return loss, seen[0], derivatives[0][1]


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_bf16_autocast_on_cpu_keeps_the_tangent_finite_and_in_fp32(kind):
    """The graded pass runs in bf16; the JVP (through SDPA attention in the U-Net: math kernel), the teacher's velocity
    and the tangent run in fp32: dF/dt is bit-identical to an fp32 run's and the tangent is finite and close to it."""
    if kind == "mlp":
        objective, x0 = SCD(small_mlp(3), teacher=mixture()), mixture().sample(64)
    else:
        torch.manual_seed(3)
        unet = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))
        objective, x0 = SCT(unet, c_noise="edm"), torch.randn(8, 1, 8, 8)
    loss, g, dF = tangents_of(objective, batch_of(x0), step=200, amp="bf16")
    loss32, g32, dF32 = tangents_of(objective, batch_of(x0), step=200)
    assert g.dtype == dF.dtype == torch.float32 and torch.isfinite(g).all() and torch.isfinite(loss)
    assert torch.equal(dF, dF32)
    assert (g - g32).norm() < 0.05 * g32.norm()


# -- learning the exact ODE map of a 2-D mixture


@pytest.mark.parametrize("name", ["scd", "sct"])
def test_short_runs_lower_the_one_step_map_error(name):
    """150 Adam steps: the one-step error to the exact map (a fine Heun solve of the exact denoiser) drops well below
    its initial value (the student starts as D = c_skip x, i.e. as bad as the teacher's one Euler step)."""
    teacher = mixture()
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = sample_heun(teacher.double(), 80.0 * z.double(), sigmas_for_nfe("heun", 79)).float()
    torch.manual_seed(0)
    backbone = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=32, embedding="positional")
    objective = SCD(backbone, teacher=teacher, tangent_warmup_steps=30) if name == "scd" else \
        SCT(backbone, tangent_warmup_steps=30)
    assert objective.networks["student"].time_label == "t" and objective.p_std == 1.4

    def error():
        with torch.no_grad():
            return float((objective.generate(z, 1) - exact).norm(dim=1).mean())

    initial = error()
    optimiser = torch.optim.Adam(objective.networks["student"].parameters(), lr=3e-3, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(2)
    for step in range(150):
        loss, _ = objective.loss("student", batch_of(teacher.sample(128, generator=generator).float()), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error() < 0.5 * initial, (error(), initial)


# -- defaults, sampling, errors


def test_scd_from_a_trained_teacher_keeps_its_label_and_weights_and_samples_by_algorithm_1():
    torch.manual_seed(4)
    teacher = Denoiser(small_mlp(5, label_dim=3), "edm", 0.6).eval().requires_grad_(False)
    scd = SCD(small_mlp(6, label_dim=3), teacher=teacher, guidance=2.0)
    student = scd.networks["student"]
    assert student.time_label == "edm" and scd.p_std == 1.8 and scd.sigma_data == 0.6
    x, labels = torch.randn(5, 2) * 3, torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(student(x, torch.full((5,), 1.5), labels), teacher(x, torch.full((5,), 1.5), labels))
        t = torch.full((5,), 0.8)
        v_c, v_u = (trigflow_velocity(teacher, x, t, 0.6, lab) for lab in (labels, None))
        torch.testing.assert_close(scd.velocity(None, None, x, t, labels), 2 * v_c - v_u)
        z = torch.randn(5, 2)
        torch.testing.assert_close(scd.generate(z, 1, {"class_labels": labels}),
                                   student(80.0 * z, torch.full((5,), 80.0), labels))
        torch.manual_seed(7)
        two = scd.generate(z, 2, {"class_labels": labels})
        torch.manual_seed(7)
        x0 = student(80.0 * z, torch.full((5,), 80.0), labels)
        x_mid = x0 + math.sqrt(0.821**2 - 0.002**2) * torch.randn_like(x0)
        torch.testing.assert_close(two, student(x_mid, torch.full((5,), 0.821), labels))
    assert scd.eval_nfe == 1 and scd.state_dict() == {} and SCD.needs_teacher and not SCT.needs_teacher
    assert OBJECTIVES["scd"] is SCD and OBJECTIVES["sct"] is SCT


class FlashOnly(nn.Module):
    """A backbone whose attention calls the CPU flash kernel directly: no forward-mode AD."""

    def forward(self, x, noise_labels, class_labels=None):
        q = (x * noise_labels[:, None])[:, None, None, :].expand(-1, 1, 4, -1).contiguous()
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0][:, 0, 0, :]


class Square(torch.autograd.Function):  # an autograd.Function without a jvp (as a fused attention kernel's)
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return grad


class CustomKernel(nn.Module):
    def forward(self, x, noise_labels, class_labels=None):
        return Square.apply(x * noise_labels[:, None])


@pytest.mark.parametrize("make, message", [
    (lambda: SCD(small_mlp()), "scd distils a teacher"),
    (lambda: SCT(small_mlp(), sigma_max=float("inf")), "sigma_max < infinity"),
    (lambda: SCT(small_mlp(), sigma_min=0.0), "0 < sigma_min < sigma_max"),
    (lambda: SCT(small_mlp(), sigma_min=5.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
    (lambda: SCT(small_mlp(), p_std=-1.0), "p_std > 0"),
    (lambda: SCD(small_mlp(), teacher=mixture(), p_std="wide"), "p_std > 0"),
    (lambda: SCD(small_mlp(), teacher=mixture(), sigma_data="x"), "sigma_data must be a number > 0"),
    (lambda: SCT(small_mlp(), c_noise="log"), "c_noise must be one of: t, edm"),
    (lambda: SCT(small_mlp(), tangent_warmup_steps=-1), "tangent_warmup_steps must be an integer >= 0"),
    (lambda: SCT(small_mlp(), tangent_warmup_steps=2.5), "tangent_warmup_steps must be an integer >= 0"),
    (lambda: SCT(small_mlp(), tangent_norm_const=0.0), "tangent_norm_const"),
    (lambda: SCT(small_mlp(), sigma_data=0.0), "sigma_data > 0"),
    (lambda: SCT(small_mlp(), sample_sigmas=(0.5, 2.0)), "sample_sigmas"),
    (lambda: SCD(small_mlp(), teacher=mixture(), guidance=2.0), "needs a class-conditional run"),
    (lambda: SCD(small_mlp(), teacher=mixture(), guidance=-1.0), "guidance"),
    (lambda: SCD(small_mlp(), teacher=Denoiser(small_mlp(1), "v")), "edm-parameterised"),
    (lambda: SCD(small_mlp(), teacher=Denoiser(small_mlp(1)), sigma_data=0.7), "keeps its sigma_data"),
    (lambda: SCT(FlashOnly()).loss("student", batch_of(torch.randn(4, 2)), 0), "forward-mode AD"),
    (lambda: SCT(CustomKernel()).loss("student", batch_of(torch.randn(4, 2)), 0), "forward-mode AD"),
])
def test_bad_settings_are_one_line_value_errors(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


# -- through runs.train


def test_both_entries_train_through_the_loop_reload_sample_and_resume_exactly(tmp_path, capsys):
    """Each entry trains a few steps through runs.train (dropout on), reloads from its run directory and samples in
    one step (f(80 z, 80)) and two; scd writes its quality report; a resumed sct run equals a straight one bit for
    bit (the JVP's replayed dropout draws leave the RNG as the loop expects); a bad value is one CLI line."""
    import json
    from runs.build import load_run
    from runs.checkpoint import load_checkpoint
    from runs.train import main, make_config, parse_args, train
    from tests.test_distill_runs import VECTOR, assert_same_run_state
    for name in ("scd", "sct"):
        overrides = VECTOR if name == "scd" else [o for o in VECTOR if not o.startswith("teacher.")]
        args = ["--backbone", "mlp", "--objective", name, "--data", "gmm", *overrides, "backbone.dropout=0.1",
                "backbone.embedding=positional", "objective.tangent_warmup_steps=2"]
        train(make_config(parse_args(args + ["train.steps=4"]))[0], tmp_path / name)
        config, loaded = load_run(tmp_path / name)
        assert config["objective"]["c_noise"] == ("auto" if name == "scd" else "t")
        assert tuple(config["optim"]["student"]["betas"]) == (0.9, 0.99)
        z = torch.randn(16, 2)
        with torch.no_grad():
            one = loaded.generate(z, 1)
            torch.testing.assert_close(one, loaded.networks["student"](80.0 * z, torch.full((16,), 80.0)))
        assert torch.isfinite(one).all() and torch.isfinite(loaded.generate(z, 2)).all()
        if name == "scd":
            report = json.loads((tmp_path / name / "quality.json").read_text())
            assert math.isfinite(report["map_rmse"]) and report["nfe"] == 1
        else:
            train(make_config(parse_args(args + ["train.steps=2"]))[0], tmp_path / "resumed")
            train(make_config(parse_args(["--resume", str(tmp_path / "resumed"), "train.steps=4"]))[0],
                  tmp_path / "resumed", resume=True)
            assert_same_run_state(load_checkpoint(tmp_path / name), load_checkpoint(tmp_path / "resumed"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a bad value through the CLI: one line, exit 2, nothing written
        main(["--objective", "sct", "--backbone", "mlp", "--data", "gmm", "objective.p_std=-1", "train.steps=1",
              "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "p_std > 0" in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


DDP_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, {root!r})
from runs.train import make_config, parse_args, train
objective, _ = train(make_config(parse_args(sys.argv[1:]))[0], {run!r})
torch.save(objective.networks["student"].state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def test_two_process_ddp_keeps_the_ranks_weights_identical(tmp_path, run_cli):
    """torchrun, 2 processes (gloo), different data and dropout masks per rank: the graded pass goes through DDP, so
    the gradients are averaged and both ranks end with the same weights, which moved from their start."""
    from tests.conftest import ROOT
    script = tmp_path / "ddp_scm.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), run=str(tmp_path / "run"), out=str(tmp_path)))
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", script, "--objective", "sct",
                     "--backbone", "mlp", "--data", "gmm", "data.n=256", "backbone.hidden=16", "backbone.num_blocks=1",
                     "backbone.dropout=0.1", "backbone.embedding=positional", "train.batch_size=32", "train.steps=3",
                     "train.warmup_steps=0", "train.sample_every=0", "objective.tangent_warmup_steps=1", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["weighting.net.2.bias"].abs() > 0 and torch.isfinite(torch.cat([v.flatten() for v in a.values()])).all()
