"""BOOT: the bootstrap target is one teacher solver step from the student's own state, the boundary term pins
g(eps, sigma_max) to the teacher's first prediction, the exact signal is a fixed point up to the step's truncation
error, and a short data-free run of an MLP beats the teacher's one-step Euler sample on a 2-D mixture."""
import pytest
import torch
from torch import nn

from data.mixtures import GaussianMixtureData
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from objectives.boot import BOOT
from solvers import sample_heun, sigmas_for_nfe


def mixture_teacher(components=4, seed=0):
    return GaussianMixtureDenoiser.from_data(GaussianMixtureData(dim=2, components=components, n=10, seed=seed))


def random_mlp(seed, **kwargs):
    """A small MLP with a nonzero output layer (MLP zero-initialises it), so that it computes something."""
    torch.manual_seed(seed)
    mlp = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16, **kwargs)
    nn.init.normal_(mlp.out.weight, std=0.3)
    return mlp


class ExactSignal(nn.Module):
    """The perfect student for a single Gaussian: y(sigma) = x(sigma) - sigma eps with x the exact ODE solution from
    x_T = sigma_max eps (GaussianMixtureDenoiser.exact_flow)."""

    def __init__(self, teacher, sigma_max):
        super().__init__()
        self.teacher, self.sigma_max = teacher, sigma_max

    def forward(self, eps, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=eps.dtype).expand(eps.shape[0])
        x = self.teacher.exact_flow(self.sigma_max * eps, torch.full_like(sigma, self.sigma_max), sigma)
        return x - sigma[:, None] * eps


def test_bootstrap_target_and_loss_by_hand():
    """target = Heun step of the teacher from x_t = g(eps, sigma_t) + sigma_t eps, minus sigma_s eps; the loss is
    the MSE to g(eps, sigma_s) over c^2, c = 1 - sigma_s / sigma_t, plus the weighted boundary MSE."""
    teacher = mixture_teacher()
    boot = BOOT(random_mlp(0), teacher=teacher, num_steps=8, boundary_weight=0.5)
    g = boot.networks["student"]
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = torch.tensor([0, 1, 3, 5, 6])
    levels = boot.levels
    assert len(levels) == 8 and levels[0] == pytest.approx(80.0) and levels[-1] == pytest.approx(0.002)
    bootstrap, boundary = boot.terms(eps, index)
    for b in range(5):
        t, s = float(levels[index[b]]), float(levels[index[b] + 1])
        e = eps[b:b + 1]
        with torch.no_grad():
            x = g(e, torch.tensor([t], dtype=torch.float64)) + t * e
            d = (x - teacher(x, t)) / t
            x_euler = x + (s - t) * d
            x_heun = x + (s - t) * 0.5 * (d + (x_euler - teacher(x_euler, s)) / s)
            target = x_heun - s * e
            y_s = g(e, torch.tensor([s], dtype=torch.float64))
            y_T = g(e, torch.tensor([80.0], dtype=torch.float64))
        torch.testing.assert_close(boot.bootstrap_target(e, torch.tensor([t], dtype=torch.float64),
                                                         torch.tensor([s], dtype=torch.float64)), target)
        expected = (y_s - target).square().mean() / (1 - s / t) ** 2
        torch.testing.assert_close(bootstrap[b].detach(), expected, rtol=2e-5, atol=1e-9)  # mse in float32
        torch.testing.assert_close(boundary[b].detach().double(), (y_T - teacher(80.0 * e, 80.0)).square().mean(),
                                   rtol=2e-5, atol=1e-9)
    assert bootstrap.requires_grad and boundary.requires_grad

    # loss(): data-free (the batch's values are ignored), replaying its draws of eps and the intervals
    images = torch.full((6, 2), 123.0)
    torch.manual_seed(7)
    loss, logs = boot.loss("student", (images, torch.zeros(6, dtype=torch.long)), step=0)
    torch.manual_seed(7)
    eps = torch.randn(6, 2)
    bootstrap, boundary = boot.terms(eps, boot.sample_intervals(6, "cpu"))
    torch.testing.assert_close(loss, bootstrap.mean() + 0.5 * boundary.mean())
    torch.testing.assert_close(logs["boundary"], boundary.mean().detach())
    torch.manual_seed(7)
    loss_other_images, _ = boot.loss("student", (-images, torch.zeros(6, dtype=torch.long)), step=0)
    assert torch.equal(loss, loss_other_images)


@pytest.mark.parametrize("parameterisation", ["edm", "v"])
def test_student_starts_at_the_teachers_first_prediction(parameterisation):
    """Initialised from a trained (here: random) Denoiser teacher, g(eps, sigma_max) = D(sigma_max eps, sigma_max)
    exactly, so the boundary term is zero; unnormalised, the bootstrap term is the plain MSE."""
    teacher = Denoiser(random_mlp(0), parameterisation, sigma_data=0.5).eval().requires_grad_(False)
    boot = BOOT(random_mlp(1), teacher=teacher, num_steps=4, step_normalised=False)
    eps = torch.randn(16, 2)
    _, boundary = boot.terms(eps, torch.zeros(16, dtype=torch.long))
    assert torch.equal(boundary, torch.zeros(16))
    assert torch.equal(boot.networks["student"](eps, 80.0), teacher(80.0 * eps, torch.full((16,), 80.0)))

    other = BOOT(random_mlp(1), teacher=mixture_teacher(), num_steps=4)  # analytic teacher: random init, g != D
    assert other.terms(eps, torch.zeros(16, dtype=torch.long))[1].min() > 0


def test_exact_signal_is_a_fixed_point_up_to_truncation():
    """With g = the exact signal of a Gaussian teacher, the bootstrap loss is the teacher step's truncation error:
    small, falling >= 16x per grid halving for Heun (error h^3 over c ~ h, squared: h^4), 4x for Euler (h^2)."""
    teacher = GaussianMixtureDenoiser(torch.tensor([[0.5, -0.3]]), torch.tensor([[0.2, 0.05]]), torch.ones(1))
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mean_bootstrap(num_steps, teacher_solver="heun"):
        boot = BOOT(random_mlp(0), teacher=teacher, num_steps=num_steps, teacher_solver=teacher_solver)
        boot.networks["student"] = ExactSignal(teacher, boot.sigma_max)
        intervals = torch.arange(num_steps - 1).repeat_interleave(len(eps))  # every interval, every eps
        bootstrap, boundary = boot.terms(eps.repeat(num_steps - 1, 1), intervals)
        return bootstrap.mean().item()

    heun = [mean_bootstrap(n) for n in (8, 16, 32)]
    assert heun[2] < 1e-5
    assert heun[0] / heun[1] > 8 and heun[1] / heun[2] > 8
    euler = [mean_bootstrap(n, "euler") for n in (16, 32)]
    assert 3 < euler[0] / euler[1] < 6
    assert euler[1] > 10 * heun[2]


def test_short_run_beats_the_teachers_one_step_euler():
    """Data-free training of an MLP on a 4-component 2-D mixture: the one-step sample g(z, sigma_min) lands far
    closer to the teacher's ODE map (a fine Heun solve) than the teacher's own 1-NFE Euler step D(80 z, 80)."""
    torch.manual_seed(0)
    teacher = mixture_teacher().float()
    boot = BOOT(MLP(dim=2, hidden=64, num_blocks=2, emb_channels=32), teacher=teacher, num_steps=16)
    student = boot.networks["student"]
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    grid = sigmas_for_nfe("heun", 79, sigma_min=0.002, sigma_max=80.0)
    with torch.no_grad():
        exact = sample_heun(teacher.double(), 80.0 * z.double(), grid).float()
        euler_error = (teacher.float()(80.0 * z, 80.0) - exact).norm(dim=1).mean()
    batch = (torch.zeros(256, 2), torch.zeros(256, dtype=torch.long))
    losses = []
    for step in range(300):
        loss, _ = boot.loss("student", batch, step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        error = (boot.generate(z, nfe=1) - exact).norm(dim=1).mean()
    assert sum(losses[-20:]) < 0.1 * sum(losses[:20])
    assert error < 0.3 * euler_error, (error, euler_error)
    with pytest.raises(ValueError, match="nfe=1"):
        boot.generate(z, nfe=2)


def test_needs_a_teacher_and_a_known_solver():
    with pytest.raises(ValueError, match="boot needs a teacher"):
        BOOT(random_mlp(0), teacher=None)
    with pytest.raises(ValueError, match="unknown boot teacher_solver 'rk4'"):
        BOOT(random_mlp(0), teacher=mixture_teacher(), teacher_solver="rk4")
