"""Reflow (Liu, Gong & Liu 2023): the flow loss is the velocity MSE on the teacher's coupling, training on it
straightens the flow (few Euler steps follow the teacher's map better than the teacher's own), distill mode trains
at sigma_max only, and the result samples through any solver."""
import math

import pytest
import torch

from models.mlp import MLP
from models.noise import flow_t
from objectives.base import using_networks
from objectives.reflow import Reflow
from solvers.schedules import flow_uniform
from solvers import SOLVERS, CountingDenoiser, options_for_nfe, sigmas_for_nfe
from tests.test_kd import gmm_teacher, mlp_denoiser_teacher, teacher_pairs


class Recording(MLP):
    """An MLP that records the inputs it was called with."""

    def forward(self, x, noise_labels, class_labels=None):
        self.x_in, self.noise_labels = x, noise_labels
        return super().forward(x, noise_labels, class_labels)


def random_mlp(**kwargs):
    torch.manual_seed(1)
    net = Recording(dim=2, hidden=32, num_blocks=1, **kwargs)
    torch.nn.init.normal_(net.out.weight)  # MLP zero-initialises its output layer
    return net


def test_flow_loss_is_the_velocity_mse_at_uniform_t():
    """||(z - x0) - v(x_t, t)||^2 with x_t = (1-t) x0 + t z, t ~ U(t(sigma_min), t(sigma_max)); for the flow
    parameterisation the backbone sees x_t itself and outputs v."""
    reflow = Reflow(random_mlp(), teacher=gmm_teacher(), sigma_min=0.002, sigma_max=80.0)
    backbone = reflow.networks["student"].backbone
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(5)
    loss, _ = reflow.loss("student", (z, x0[:, None], torch.zeros(64, dtype=torch.long)), step=0)
    torch.manual_seed(5)  # replay the t draw
    t_min, t_max = 0.002 / 1.002, 80 / 81
    t = (t_min + (t_max - t_min) * torch.rand(64, dtype=torch.float64))[:, None]
    with torch.no_grad():
        v = backbone(((1 - t) * x0 + t * z).float(), (t / (1 - t)).log().flatten().float() / 4).double()
    torch.testing.assert_close(loss.double(), ((z - x0) - v).square().mean(), rtol=1e-5, atol=1e-7)
    assert t.min() >= t_min and t.max() <= t_max


def test_reflow_straightens_the_teachers_flow():
    """Trained on the teacher's coupling, 1 and 2 Euler steps land closer to the teacher's map than the teacher's own
    1 and 2 Euler steps (on either schedule)."""
    torch.manual_seed(0)
    teacher = gmm_teacher()
    z, x0 = teacher_pairs(teacher, 4096, seed=0)
    z_test, x0_test = teacher_pairs(teacher, 1000, seed=1)
    reflow = Reflow(MLP(dim=2, hidden=64, num_blocks=2), teacher=teacher)
    optimizer = torch.optim.Adam(reflow.networks["student"].parameters(), lr=3e-3)
    for step in range(400):
        i = torch.randint(0, len(z), (256,))
        loss, _ = reflow.loss("student", (z[i], x0[i][:, None], torch.zeros(256, dtype=torch.long)), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def error(x):
        return float((x.float() - x0_test).square().sum(1).mean())

    with torch.no_grad():
        for nfe in (1, 2):
            teacher_error = min(
                error(SOLVERS["euler"](teacher, sigmas[0] * z_test.double(), sigmas))
                for sigmas in (sigmas_for_nfe("euler", nfe, "karras"), flow_uniform(nfe, sigma_max=80.0)))
            reflow_error = error(reflow.generate(z_test, nfe))
            assert reflow_error < 0.5 ** nfe * teacher_error, (nfe, reflow_error, teacher_error)


def test_distill_mode_trains_at_sigma_max_only():
    reflow = Reflow(random_mlp(), teacher=gmm_teacher(), mode="distill", distance="l1", sigma_max=80.0)
    backbone = reflow.networks["student"].backbone
    z, x0 = torch.randn(32, 2), torch.randn(32, 2)
    for step in range(3):
        loss, _ = reflow.loss("student", (z, x0[:, None], torch.zeros(32, dtype=torch.long)), step)
        assert torch.equal(backbone.noise_labels, torch.full((32,), math.log(80) / 4))
        torch.testing.assert_close(backbone.x_in, 80 * z / 81)  # flow: c_in = 1 / (1 + sigma)
    with torch.no_grad():  # D(80 z, 80) = x_t - t v with x_t = 80 z / 81, t = 80 / 81
        x0_hat = 80 * z / 81 - 80 / 81 * backbone(80 * z / 81, torch.full((32,), math.log(80) / 4))
    torch.testing.assert_close(loss.detach(), (x0_hat - x0).abs().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reflow.generate(z, nfe=1), x0_hat)
    assert reflow.denoiser() is None
    with pytest.raises(ValueError, match="exactly one step"):
        reflow.generate(z, nfe=2)


@pytest.mark.parametrize("solver, schedule, nfe", [("euler", "flow_uniform", 3), ("heun", "karras", 5)])
def test_denoiser_samples_with_any_solver_at_exact_nfe(solver, schedule, nfe):
    reflow = Reflow(random_mlp(), teacher=gmm_teacher(), solver=solver, schedule=schedule)
    z = torch.randn(8, 2)
    counting = CountingDenoiser(reflow.denoiser())
    with torch.no_grad(), using_networks(reflow, {"student": counting}):
        x = reflow.generate(z, nfe)
    assert counting.nfe == nfe
    sigmas = (flow_uniform(nfe) if schedule == "flow_uniform" else sigmas_for_nfe(solver, nfe, schedule))
    with torch.no_grad():
        expected = SOLVERS[solver](reflow.denoiser(), sigmas[0] * z, sigmas, **options_for_nfe(solver, nfe))
    torch.testing.assert_close(x, expected)


def test_flow_uniform_is_uniform_in_t():
    sigmas = flow_uniform(4, sigma_max=80.0)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0 and len(sigmas) == 5
    torch.testing.assert_close(flow_t(sigmas), torch.linspace(80 / 81, 0, 5, dtype=torch.float64))


def test_teacher_initialisation_and_errors():
    teacher = mlp_denoiser_teacher("edm", sigma_data=0.5, hidden=32)
    reflow = Reflow(MLP(dim=2, hidden=32, num_blocks=1), teacher=teacher)
    assert reflow.initialised_from_teacher and reflow.parameterisation == "edm"  # the teacher's, not "flow"
    z = torch.randn(4, 2)
    sigma = torch.full((4,), 3.0)
    torch.testing.assert_close(reflow.denoiser()(z, sigma), teacher(z, sigma))
    assert Reflow(MLP(dim=2, hidden=8, num_blocks=1), teacher=gmm_teacher()).parameterisation == "flow"
    with pytest.raises(ValueError, match="reflow needs a teacher"):
        Reflow(MLP(dim=2, hidden=8, num_blocks=1))
    with pytest.raises(ValueError, match="known: distill, flow"):
        Reflow(MLP(dim=2, hidden=8, num_blocks=1), teacher=gmm_teacher(), mode="lpips")
    with pytest.raises(ValueError, match="unknown schedule"):
        Reflow(MLP(dim=2, hidden=8, num_blocks=1), teacher=gmm_teacher(), schedule="linear")
