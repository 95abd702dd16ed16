"""TRACT (Berthelot et al. 2023): the target by hand (a teacher Heun step, then the self-teacher's Euler jump to the
segment's end, then the x0 of the equivalent single jump), the teacher's own x0 at the grid's last step, phase
teachers stepped with Euler, the phase schedule, and short runs that learn the exact ODE map in one step."""
import pytest
import torch
from torch import nn

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from models.mlp import MLP
from objectives.progressive import nested_sigmas
from objectives.tract import TRACT
from solvers import euler_step, heun_step, sample_heun, sigmas_for_nfe


def mixture():
    return GaussianMixtureDenoiser(**gaussian_mixture_params(2, 4, seed=0)).float()


def tract(steps=(8, 2), **kwargs):
    torch.manual_seed(0)
    mlp = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16)
    nn.init.normal_(mlp.out.weight, std=0.3)  # MLP zero-initialises its output layer
    objective = TRACT(mlp, teacher=mixture(), steps=steps, **kwargs)
    objective.loss("student", (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), 0)  # makes the self-teacher
    return objective


def test_target_by_hand():
    obj = tract((8, 2))
    grid = nested_sigmas(8)
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    fine, end = torch.tensor([0, 2, 5]), torch.tensor([4, 4, 8])
    x_s0, sigma_s0, x0_tilde = obj.target(x0, noise, fine, end, None)
    for b in range(3):
        s0, s1, s2 = (float(grid[i]) for i in (fine[b], fine[b] + 1, end[b]))
        x = x0[b:b + 1] + s0 * noise[b:b + 1]
        x1 = heun_step(obj.teacher, x, s0, s1)[0]
        if fine[b] + 1 < end[b]:
            x1 = euler_step(obj.self_teacher, x1, s1, s2)[0]
        expected = (s0 * x1 - s2 * x) / (s0 - s2)
        torch.testing.assert_close(x0_tilde[b:b + 1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_s0[b:b + 1], x)
    assert torch.equal(sigma_s0, grid[fine].float())


def test_last_fine_step_targets_the_teachers_x0_and_phase_teachers_step_with_euler():
    obj = tract((8, 2, 1), steps_per_phase=3)
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    last = torch.full((5,), 7)
    x_s0, sigma_s0, x0_tilde = obj.target(x0, noise, last, last + 1, None)
    torch.testing.assert_close(x0_tilde, obj.teacher(x_s0, sigma_s0), rtol=1e-5, atol=1e-5)
    assert obj.phase_at(2) == 0 and obj.phase_at(3) == 1 and obj.phase_at(10**6) == 1 and obj.eval_nfe == 2
    obj.advance(3)
    assert obj.phase == 1 and obj.eval_nfe == 1 and not any(p.requires_grad for p in obj.phase_teacher.parameters())
    for a, b in zip(obj.phase_teacher.parameters(), obj.networks["student"].parameters()):
        assert torch.equal(a, b)
    grid = nested_sigmas(2)  # phase 1: 2 -> 1, one segment of two fine steps
    x_s0, _, x0_tilde = obj.target(x0, noise, torch.zeros(5, dtype=torch.long), torch.full((5,), 2), None)
    x1 = euler_step(obj.phase_teacher, x_s0, float(grid[0]), float(grid[1]))[0]
    x2 = euler_step(obj.self_teacher, x1, float(grid[1]), 0.0)[0]
    torch.testing.assert_close(x0_tilde, x2, rtol=1e-5, atol=1e-5)  # sigma_s2 = 0: x0_tilde = x_s2
    with pytest.raises(ValueError, match="nfe=2"):
        obj.generate(torch.randn(2, 2), 2)


def test_bad_steps_are_one_line_errors():
    for steps in ([8], [8, 3], [2, 4], [8, 0]):
        with pytest.raises(ValueError, match="tract steps"):
            TRACT(MLP(dim=2, hidden=8), teacher=mixture(), steps=steps)


@pytest.mark.parametrize("steps, per_phase, bound", [((16, 1), 600, 0.15), ((16, 4, 1), 300, 0.2)])
def test_short_runs_learn_the_exact_map_in_one_step(steps, per_phase, bound):
    """Random initial weights (the analytic teacher has none); the one-step error to the exact map (a fine Heun solve)
    ends far below the teacher's own 1-NFE Euler step, also through a second phase whose teacher is the first
    phase's student."""
    teacher = mixture()
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = sample_heun(teacher.double(), 80.0 * z.double(), sigmas_for_nfe("heun", 79)).float()
        euler = (teacher(80.0 * z, 80.0) - exact).norm(dim=1).mean()
    torch.manual_seed(0)
    obj = TRACT(MLP(dim=2, hidden=64, num_blocks=2, emb_channels=32), teacher=teacher, steps=steps,
                steps_per_phase=per_phase)
    optimiser = torch.optim.Adam(obj.networks["student"].parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)
    for step in range(600):
        loss, _ = obj.loss("student", (teacher.sample(256, generator=generator).float(),
                                       torch.zeros(256, dtype=torch.long)), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        obj.after_step("student", step)
    with torch.no_grad():
        error = (obj.generate(z, 1) - exact).norm(dim=1).mean()
    assert obj.eval_nfe == 1 and error < bound * euler, (float(error), float(euler))
