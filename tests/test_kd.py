"""Knowledge distillation (Luhman & Luhman 2021): the loss is the distance of D(sigma_max z, sigma_max) to the teacher's
x0, the student starts from the teacher's weights, and a few hundred steps learn the teacher's ODE map in one step."""
import math

import pytest
import torch

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from objectives.kd import KD
from solvers import SOLVERS, options_for_nfe, sigmas_for_nfe


def gmm_teacher(components=8):
    return GaussianMixtureDenoiser(**gaussian_mixture_params(dim=2, components=components))


def teacher_pairs(teacher, n, seed, sigma_max=80.0):
    """(z, x0): the teacher's ODE map by Heun at 35 NFE from x = sigma_max z (what the trajectory store holds)."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    sigmas = sigmas_for_nfe("heun", 35, sigma_max=sigma_max)
    with torch.no_grad():
        x0 = SOLVERS["heun"](teacher, sigmas[0] * z.double(), sigmas, **options_for_nfe("heun", 35))
    return z, x0.float()


def mlp_denoiser_teacher(parameterisation="v", sigma_data=0.7, hidden=16):
    torch.manual_seed(3)
    teacher = Denoiser(MLP(dim=2, hidden=hidden, num_blocks=1), parameterisation, sigma_data)
    torch.nn.init.normal_(teacher.backbone.out.weight)  # MLP zero-initialises its output layer
    return teacher.eval().requires_grad_(False)


def test_loss_is_the_distance_of_the_one_step_sample_to_the_teacher_x0():
    """x0 parameterisation: S(z) = F(c_in sigma_max z, ln(sigma_max)/4), c_in = 1/sqrt(sigma_max^2 + sd^2)."""
    torch.manual_seed(0)
    kd = KD(MLP(dim=2, hidden=32, num_blocks=1), teacher=gmm_teacher(), parameterisation="x0", sigma_data=0.5,
            distance="l1", sigma_max=80.0)
    backbone = kd.networks["student"].backbone
    torch.nn.init.normal_(backbone.out.weight)
    z, x0 = torch.randn(16, 2), torch.randn(16, 2)
    loss, logs = kd.loss("student", (z, x0[:, None], torch.zeros(16, dtype=torch.long)), step=0)
    F = backbone(80 * z / math.sqrt(80**2 + 0.25), torch.full((16,), math.log(80) / 4))
    torch.testing.assert_close(loss, (F - x0).abs().mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(logs["loss"], loss.detach())


def test_rollouts_ask_for_the_final_state_only():
    kd = KD(MLP(dim=2, hidden=16, num_blocks=1), teacher=gmm_teacher(), nfe=9, n=500)
    assert kd.rollouts == dict(solver="heun", nfe=9, schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0,
                               save_sigmas=1, n=500)
    assert kd.rollout_sigmas.tolist() == [0.0]
    assert KD.needs_teacher and kd.denoiser() is None


def test_student_learns_the_teacher_map_in_one_step():
    """300 Adam steps on 4096 pairs: the one-step error to the teacher's map is far below the teacher's own 1 NFE."""
    torch.manual_seed(0)
    teacher = gmm_teacher()
    z, x0 = teacher_pairs(teacher, 4096, seed=0)
    z_test, x0_test = teacher_pairs(teacher, 1000, seed=1)
    kd = KD(MLP(dim=2, hidden=64, num_blocks=2), teacher=teacher)
    assert not kd.initialised_from_teacher  # analytic teacher: random init
    optimizer = torch.optim.Adam(kd.networks["student"].parameters(), lr=3e-3)
    for step in range(300):
        i = torch.randint(0, len(z), (256,))
        loss, _ = kd.loss("student", (z[i], x0[i][:, None], torch.zeros(256, dtype=torch.long)), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        student_error = (kd.generate(z_test, nfe=1) - x0_test).square().sum(1).mean()
        euler = SOLVERS["euler"](teacher, 80 * z_test.double(), torch.tensor([80.0, 0.0], dtype=torch.float64))
        teacher_error = (euler.float() - x0_test).square().sum(1).mean()
    assert teacher_error > 0.3  # one Euler step lands every sample on the mixture's mean
    assert student_error < 0.05 * teacher_error, (float(student_error), float(teacher_error))


def test_student_starts_as_the_teacher_at_sigma_max():
    teacher = mlp_denoiser_teacher("v", sigma_data=0.7)
    kd = KD(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher)
    student = kd.networks["student"]
    assert kd.initialised_from_teacher
    assert (student.parameterisation, student.sigma_data) == ("v", 0.7)  # the teacher's preconditioning by default
    chosen = KD(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, parameterisation="edm", sigma_data=0.5)
    assert (chosen.networks["student"].parameterisation, chosen.networks["student"].sigma_data) == ("edm", 0.5)
    for (name, ours), theirs in zip(student.backbone.state_dict().items(), teacher.backbone.state_dict().values()):
        assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr(), name
    z = torch.randn(8, 2)
    torch.testing.assert_close(kd.generate(z, nfe=1), teacher(80 * z, torch.full((8,), 80.0)))


def test_shape_mismatch_missing_teacher_and_nfe_are_errors():
    teacher = mlp_denoiser_teacher(hidden=16)
    with pytest.raises(ValueError, match="cannot take the teacher's weights"):
        KD(MLP(dim=2, hidden=32, num_blocks=1), teacher=teacher)
    with pytest.raises(ValueError, match="kd needs a teacher"):
        KD(MLP(dim=2, hidden=16, num_blocks=1))
    kd = KD(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher)
    with pytest.raises(ValueError, match="exactly one step"):
        kd.generate(torch.randn(4, 2), nfe=2)


def test_labels_reach_a_conditional_student():
    torch.manual_seed(0)
    kd = KD(MLP(dim=2, hidden=16, num_blocks=1, label_dim=3), teacher=gmm_teacher(), parameterisation="x0")
    backbone = kd.networks["student"].backbone
    torch.nn.init.normal_(backbone.out.weight)
    torch.nn.init.normal_(backbone.label_embed.weight)
    z, x0 = torch.randn(4, 2), torch.zeros(4, 1, 2)
    first = kd.loss("student", (z, x0, torch.zeros(4, dtype=torch.long)), 0)[0]
    second = kd.loss("student", (z, x0, torch.full((4,), 2)), 0)[0]
    assert not torch.allclose(first, second)
    labels = {"class_labels": torch.full((4,), 2)}
    torch.testing.assert_close(kd.generate(z, 1, cond=labels), kd.student(z, labels["class_labels"]))
