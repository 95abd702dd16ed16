"""Progressive distillation: the target makes one student step equal two teacher steps, the stage schedule and the
teacher swap follow the step, state_dict resumes exactly, and a short 4 -> 2 -> 1 run beats the teacher's 1-step
Euler."""
import io

import pytest
import torch

from data.mixtures import GaussianMixtureData
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from objectives.base import using_networks
from objectives.progressive import Progressive, distillation_target, nested_sigmas
from solvers import SOLVERS, euler_step, karras


def mixture_teacher(components=3, dtype=torch.float64):
    data = GaussianMixtureData(dim=2, components=components, n=2048, seed=0)
    return data, GaussianMixtureDenoiser.from_data(data).to(dtype).requires_grad_(False).eval()


def tiny_mlp():
    return MLP(dim=2, hidden=16, num_blocks=1, emb_channels=16)


def mlp_teacher(seed=0):
    torch.manual_seed(seed)
    teacher = Denoiser(tiny_mlp(), "edm", 0.5)
    for p in teacher.parameters():  # MLP zero-initialises its output layer; give the teacher a non-trivial one
        p.data.normal_(0, 0.3)
    return teacher.requires_grad_(False).eval()


class Constant(torch.nn.Module):
    """A denoiser that returns a fixed x0 whatever its input."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, class_labels=None):
        return self.x0


def test_nested_grid_is_karras_ramp_and_halves_exactly():
    grid = nested_sigmas(8, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    u = torch.arange(8, -1, -1, dtype=torch.float64) / 8
    expected = (0.002 ** (1 / 7) + u * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(grid[:-1], expected[:-1], rtol=1e-14, atol=0)
    assert grid[0] == 80.0 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    assert torch.equal(nested_sigmas(16)[::2], nested_sigmas(8))  # every student point is a teacher point
    assert torch.equal(nested_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("interval", [0, 1, 3])  # interval 3 of the 4-step student ends at sigma'' = 0
def test_one_student_step_on_the_target_reproduces_two_teacher_steps(interval):
    _, teacher = mixture_teacher()
    grid = nested_sigmas(8)  # teacher grid of a 4-step student
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[2 * interval]
    sigma, sigma_mid, sigma_next = (grid[2 * interval + k].expand(5) for k in range(3))
    x0_tilde, x_next = distillation_target(teacher, x, sigma, sigma_mid, sigma_next)
    two_teacher_steps = SOLVERS["euler"](teacher, x, grid[2 * interval:2 * interval + 3]) if interval == 3 else \
        euler_step(teacher, euler_step(teacher, x, sigma, sigma_mid)[0], sigma_mid, sigma_next)[0]
    torch.testing.assert_close(x_next, two_teacher_steps, rtol=0, atol=1e-12)
    one_student_step, _ = euler_step(Constant(x0_tilde), x, sigma, sigma_next)
    torch.testing.assert_close(one_student_step, x_next, rtol=0, atol=1e-10)
    if interval == 3:
        assert torch.equal(x0_tilde, x_next)


def test_one_step_stage_target_is_the_teachers_two_step_result_and_loss_uses_it():
    data, teacher = mixture_teacher()
    pd = Progressive(tiny_mlp(), teacher=teacher, start_steps=2, steps_per_stage=10, distance="mse")
    assert pd.student_steps() == 1 and pd.teacher_steps() == 2
    x0 = data.x[:16].double()
    torch.manual_seed(3)
    with using_networks(pd, {"student": teacher}):  # a student equal to the exact teacher
        loss, logs = pd.loss("student", (x0, data.labels[:16]), step=0)
    torch.manual_seed(3)  # replay: the noise is drawn first; with N = 1, sigma = sigma_max for every sample
    x = x0 + 80.0 * torch.randn_like(x0)
    two_step = SOLVERS["euler"](teacher, x, nested_sigmas(2))
    sigmas = torch.full((16,), 80.0, dtype=torch.float64)
    x0_tilde = pd.target(x, sigmas, sigmas * 0 + nested_sigmas(2)[1], sigmas * 0)
    torch.testing.assert_close(x0_tilde, two_step, rtol=0, atol=1e-12)
    expected = (teacher(x, sigmas) - two_step).square().mean()  # weight max(1/80^2, 1) = 1
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-12)
    assert float(logs["student_steps"]) == 1


def test_stage_schedule_and_weightings():
    _, teacher = mixture_teacher()
    pd = Progressive(tiny_mlp(), teacher=teacher, start_steps=16, steps_per_stage=10)  # final_stages_factor=2
    assert pd.num_stages == 4 and pd.stage_lengths == [10, 10, 20, 20] and pd.stage_starts == [0, 10, 20, 40]
    stages = {0: 0, 9: 0, 10: 1, 19: 1, 20: 2, 39: 2, 40: 3, 59: 3, 60: 3, 10**6: 3}
    assert {step: pd.stage_at(step) for step in stages} == stages
    assert [(pd.student_steps(k), pd.teacher_steps(k)) for k in range(4)] == [(8, 16), (4, 8), (2, 4), (1, 2)]
    listed = Progressive(tiny_mlp(), teacher=teacher, start_steps=8, end_steps=2, steps_per_stage=[3, 7])
    assert listed.stage_lengths == [3, 7] and listed.stage_at(2) == 0 and listed.stage_at(3) == 1
    assert listed.student_steps(1) == 2
    with pytest.raises(ValueError, match="powers of 2"):
        Progressive(tiny_mlp(), teacher=teacher, start_steps=12)
    with pytest.raises(ValueError, match="2 stages"):
        Progressive(tiny_mlp(), teacher=teacher, start_steps=8, end_steps=2, steps_per_stage=[3, 7, 9])
    with pytest.raises(ValueError, match="progressive needs a teacher"):
        Progressive(tiny_mlp(), teacher=None)

    sigma = torch.tensor([0.1, 1.0, 4.0])
    torch.testing.assert_close(pd.weight(sigma), torch.tensor([100.0, 1.0, 1.0]))
    plus_one = Progressive(tiny_mlp(), teacher=teacher, start_steps=2, weighting="snr_plus_one")
    torch.testing.assert_close(plus_one.weight(sigma), torch.tensor([101.0, 2.0, 1.0625]))


def test_teacher_swap_at_stage_boundary_copies_and_freezes_the_student():
    teacher = mlp_teacher()
    pd = Progressive(tiny_mlp(), teacher=teacher, start_steps=4, steps_per_stage=2, final_stages_factor=1)
    student = pd.networks["student"]
    assert pd.parameterisation == "edm" and pd.sigma_data == 0.5
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))  # init from teacher
    batch = (torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    pd.loss("student", batch, step=1)
    assert pd.stage == 0 and pd.current_teacher() is teacher
    with torch.no_grad():  # "training" moves the student away from the teacher
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    at_switch = [p.detach().clone() for p in student.parameters()]
    loss, _ = pd.loss("student", batch, step=2)
    new_teacher = pd.current_teacher()
    assert pd.stage == 1 and pd.student_steps() == 1 and new_teacher is not teacher and new_teacher is not student
    assert all(torch.equal(a, b) for a, b in zip(new_teacher.parameters(), at_switch))
    assert not new_teacher.training and not any(p.requires_grad for p in new_teacher.parameters())
    loss.backward()  # gradients reach the student only
    assert all(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    pd.loss("student", batch, step=50)  # past the schedule: still the last stage, no second swap
    assert pd.stage == 1 and pd.current_teacher() is new_teacher
    assert all(torch.equal(a, b) for a, b in zip(new_teacher.parameters(), at_switch))  # a copy, not a view
    assert not any(torch.equal(a, b) for a, b in zip(teacher.parameters(), at_switch))  # original untouched


def test_state_dict_round_trip_restores_stage_and_teacher():
    teacher = mlp_teacher()
    make = lambda: Progressive(tiny_mlp(), teacher=teacher, start_steps=8, steps_per_stage=[2, 2, 2])
    pd = make()
    batch = (torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    assert "teacher" not in pd.state_dict() and pd.state_dict()["stage"] == 0
    with torch.no_grad():
        for p in pd.networks["student"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    pd.loss("student", batch, step=3)
    buffer = io.BytesIO()
    torch.save(pd.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = make()  # a fresh objective whose student differs from the saved teacher copy
    resumed.load_state_dict(state)
    assert resumed.stage == 1 and resumed.student_steps() == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.current_teacher().parameters(),
                                                 pd.current_teacher().parameters()))
    assert not any(p.requires_grad for p in resumed.current_teacher().parameters())
    resumed.loss("student", batch, step=3)  # same stage: the restored teacher is kept, not re-copied
    assert all(torch.equal(a, b) for a, b in zip(resumed.current_teacher().parameters(),
                                                 pd.current_teacher().parameters()))
    x, s = torch.randn(4, 2), torch.full((4,), 2.0)
    torch.testing.assert_close(resumed.target(x, s, s * 0.5, s * 0.25), pd.target(x, s, s * 0.5, s * 0.25))
    with pytest.raises(ValueError, match="does not fit"):
        Progressive(tiny_mlp(), teacher=teacher, start_steps=2).load_state_dict(state)


def test_generate_uses_nested_grids_only():
    _, teacher = mixture_teacher(dtype=torch.float32)
    pd = Progressive(tiny_mlp(), teacher=teacher, start_steps=8, steps_per_stage=5)
    assert pd.allowed_nfe() == [4, 2, 1]
    z = torch.randn(3, 2)
    with using_networks(pd, {"student": teacher}):
        torch.testing.assert_close(pd.generate(z, 2), SOLVERS["euler"](teacher, 80 * z, nested_sigmas(2)))
        with pytest.raises(ValueError, match=r"one of \[4, 2, 1\]"):
            pd.generate(z, 3)
    assert pd.denoiser() is pd.networks["student"]


def test_short_progressive_run_beats_teachers_one_step_euler():
    """4 -> 2 -> 1 steps, MLP from scratch against the analytic 8-mode teacher: the 1-step student is far closer to
    the exact ODE map (fine Heun) than the teacher's own 1-step Euler sample (which is about the data mean)."""
    torch.manual_seed(0)
    data, teacher = mixture_teacher(components=8, dtype=torch.float32)
    pd = Progressive(MLP(dim=2, hidden=64, num_blocks=2, emb_channels=32), teacher=teacher, start_steps=4,
                     steps_per_stage=150, final_stages_factor=1)
    optimizer = torch.optim.Adam(pd.networks["student"].parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(1)
    for step in range(300):
        index = torch.randint(0, len(data), (256,), generator=order)
        loss, _ = pd.loss("student", (data.x[index], data.labels[index]), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert pd.stage == 1 and pd.student_steps() == 1

    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        exact = SOLVERS["heun"](teacher.double(), 80 * z, karras(200, sigma_max=80.0)).float()
        teacher.float()
        student = pd.generate(z.float(), 1)
        teacher_one_step = SOLVERS["euler"](teacher, 80 * z.float(), nested_sigmas(1))
    student_error = (student - exact).square().mean()
    teacher_error = (teacher_one_step - exact).square().mean()
    assert student_error < 0.25 * teacher_error, (float(student_error), float(teacher_error))


def test_swap_copies_the_module_inside_a_ddp_like_wrapper():
    class Wrapper(torch.nn.Module):  # what DDP looks like to the objective: the real network in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    pd = Progressive(tiny_mlp(), teacher=mlp_teacher(), start_steps=4, steps_per_stage=1, final_stages_factor=1)
    student = pd.networks["student"]
    pd.networks["student"] = Wrapper(student)
    pd.loss("student", (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), step=1)
    assert type(pd.current_teacher()) is Denoiser and pd.current_teacher() is not student
    assert set(pd.state_dict()["teacher"]) == set(student.state_dict())


@pytest.mark.parametrize("fresh", [True, False])
def test_each_stage_starts_with_a_fresh_optimiser(tmp_path, fresh):
    """Stages start at steps 0 and 2 (start_steps 4, 2 steps each): after 3 steps Adam has counted 1 step since the
    boundary cleared it, or all 3 with fresh_optimizer_per_stage=False."""
    from runs.checkpoint import load_checkpoint
    from runs.train import train
    from tests.test_distill_runs import objective_config
    train(objective_config("progressive", "train.steps=3", f"objective.fresh_optimizer_per_stage={fresh}"), tmp_path)
    adam = load_checkpoint(tmp_path)["optimizers"]["student"]["state"]
    assert adam and {float(state["step"]) for state in adam.values()} == {1.0 if fresh else 3.0}


def test_stages_fill_the_runs_steps_by_default():
    teacher = GaussianMixtureDenoiser.from_data(GaussianMixtureData(dim=2, n=64))
    objective = Progressive(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher, start_steps=8, total_steps=500)
    uneven = Progressive(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher, start_steps=8, total_steps=501)
    assert uneven.stage_lengths == [100, 200, 201]  # what rounding leaves goes to the last stage
    assert objective.stage_lengths == [100, 200, 200]  # 4-, 2- and 1-step students; the last two twice as long
    from runs.train import make_config, parse_args
    config = make_config(parse_args(["--objective", "progressive", "--backbone", "mlp", "--data", "gmm",
                                     "train.steps=300"]))[0]
    assert config["objective"]["steps_per_stage"] is None and config["objective"]["total_steps"] == 300
