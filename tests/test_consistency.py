"""Consistency models (Song et al. 2023; Song & Dhariwal 2024): the boundary parameterisation, Algorithm 1's sampler,
CD's teacher step, CT's and iCT's curricula against their formulas, the shared dropout mask, the EMA target, and
short runs that learn the exact ODE map of a 2-D mixture."""
import math

import pytest
import torch
from torch import nn

from data.mixtures import gaussian_mixture_params
from models.analytic import GaussianMixtureDenoiser
from models.consistency import BoundaryShifted, ConsistencyFunction
from models.denoiser import Denoiser, preconditioning
from models.mlp import MLP
from objectives.cd import CD
from objectives.consistency import random_state, replayed_random_draws
from objectives.ct import CT
from objectives.ect import ECT
from objectives.ict import ICT
from solvers import CountingDenoiser, heun_step, sample_consistency, sample_heun, sigmas_for_nfe


def random_mlp(seed, **kwargs):
    torch.manual_seed(seed)
    mlp = MLP(dim=2, hidden=32, num_blocks=1, emb_channels=16, **kwargs)
    nn.init.normal_(mlp.out.weight, std=0.3)  # MLP zero-initialises its output layer
    return mlp


def mixture(components=4):
    return GaussianMixtureDenoiser(**gaussian_mixture_params(2, components, seed=0))


# -- the consistency function and Algorithm 1


def test_boundary_condition_holds_exactly_and_far_levels_are_edms():
    f = ConsistencyFunction(random_mlp(0), sigma_data=0.5, sigma_min=0.002)
    x = torch.randn(6, 2, dtype=torch.float64)
    assert torch.equal(f(x, torch.full((6,), 0.002, dtype=torch.float64)), x)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = f.coefficients(sigma)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * (sigma - 0.002) / (sigma**2 + 0.25).sqrt())
    edm = preconditioning("edm", sigma, 0.5)
    torch.testing.assert_close(c_in, edm[2])
    torch.testing.assert_close(c_noise, edm[3])
    assert (c_skip[-2:] - edm[0][-2:]).abs().max() < 1e-3 and (c_out[-2:] - edm[1][-2:]).abs().max() < 1e-3


def test_algorithm_1_by_hand_and_its_nfe():
    f = ConsistencyFunction(random_mlp(1), sigma_min=0.002)
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([80.0, 1.5, 0.3, 0.0], dtype=torch.float64)
    counted = CountingDenoiser(f)
    out = sample_consistency(counted, 80.0 * z, sigmas, generator=torch.Generator().manual_seed(3), sigma_min=0.002)
    assert counted.nfe == 3 and sample_consistency.steps_for_nfe(3) == 3
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = f(80.0 * z, 80.0)
        for tau in (1.5, 0.3):
            x = f(x + math.sqrt(tau**2 - 0.002**2) * torch.randn(x.shape, generator=noise, dtype=x.dtype), tau)
    torch.testing.assert_close(out, x)
    one = sample_consistency(f, 80.0 * z, torch.tensor([80.0, 0.0]))  # sigma_min from the model
    torch.testing.assert_close(one, f(80.0 * z, 80.0))


# -- CD, CT and iCT: what each chooses


def test_cd_lower_point_is_one_heun_step_of_the_teacher():
    teacher = mixture()
    cd = CD(random_mlp(2), teacher=teacher, num_levels=18)
    grid = cd.grid(18, "cpu")
    assert len(grid) == 18 and grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002)
    x_hi = torch.randn(4, 2) * 3
    sigma_hi, sigma_lo = grid[[0, 5, 9, 16]], grid[[1, 6, 10, 17]]
    expected = heun_step(teacher, x_hi, sigma_hi, sigma_lo)[0]
    torch.testing.assert_close(cd.lower_point(None, None, x_hi, sigma_hi, sigma_lo, None), expected)
    assert cd.target_decay(0) == 0.0 and cd.grid_size(10**6) == 18


def test_ct_curriculum_follows_the_papers_formulas():
    ct = CT(random_mlp(0), s0=2, s1=150, mu0=0.9, total_steps=1000)
    assert ct.grid_size(0) == 2 and ct.grid_size(1000) == 151 and ct.grid_size(5000) == 151
    sizes = [ct.grid_size(k) for k in range(0, 1001, 50)]
    assert sizes == sorted(sizes)
    k = 300
    n = math.ceil(math.sqrt(k / 1000 * (151**2 - 4) + 4) - 1) + 1
    assert ct.grid_size(k) == n
    assert ct.target_decay(k) == pytest.approx(math.exp(2 * math.log(0.9) / (n - 1)))
    assert ct.target_decay(0) == pytest.approx(0.81)  # the official codes' N - 1: mu(0) = mu0^2


def test_ict_curriculum_and_lognormal_levels():
    ict = ICT(random_mlp(0), total_steps=400_000)
    assert ict.stage_length == 50_000 and ict.target_decay(0) == 0.0
    assert [ict.grid_size(k) for k in range(0, 400_000, 50_000)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict.grid_size(399_999) == 1281 and ict.grid_size(10**7) == 1281
    grid = ict.grid(41, "cpu")
    p = ict.interval_probabilities(grid)
    assert p.shape == (40,) and float(p.sum()) == pytest.approx(1.0)
    cdf = lambda s: math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))  # noqa: E731
    masses = torch.tensor([cdf(float(grid[i])) - cdf(float(grid[i + 1])) for i in range(40)])
    torch.testing.assert_close(p, (masses / masses.sum()).float())
    torch.manual_seed(0)
    draws = ict.draw_intervals(40_000, grid, "cpu")
    frequencies = torch.bincount(draws, minlength=40).float() / 40_000
    assert (frequencies - p).abs().max() < 0.01
    sigma_hi, sigma_lo = grid[:3], grid[1:4]
    torch.testing.assert_close(ict.weight(sigma_hi, sigma_lo), 1 / (sigma_hi - sigma_lo))


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="cd needs a teacher"):
        CD(random_mlp(0))
    with pytest.raises(ValueError, match="edm-parameterised"):
        CD(random_mlp(0), teacher=Denoiser(random_mlp(1), "v"))
    with pytest.raises(ValueError, match="total_steps"):
        CT(random_mlp(0))
    with pytest.raises(ValueError, match="sample_sigmas"):
        ICT(random_mlp(0), total_steps=10, sample_sigmas=[0.5, 2.0])


def test_ect_levels_target_and_shifted_sampling():
    ect = ECT(random_mlp(0), teacher=mixture(), stage_steps=10)
    t = torch.tensor([0.5, 1.9, 2.0, 10.0])
    shrink0 = 0.5 * (1 + 8 * torch.sigmoid(-t))
    torch.testing.assert_close(ect.r_of_t(t, 0), (t * (1 - shrink0)).clamp_min(0))
    assert torch.equal(ect.r_of_t(t, 9)[:2], torch.zeros(2)) and ect.r_of_t(t, 9)[2] > 0  # r = 0 below ln 7
    torch.testing.assert_close(ect.r_of_t(t, 10), (t * (1 - 0.25 * (1 + 8 * torch.sigmoid(-t)))).clamp_min(0))  # stage 1
    x0, x_lo = torch.randn(4, 2), torch.randn(4, 2)
    target = ect.target_values(x_lo, torch.tensor([0.0, 0.3, 0.0, 2.0]), x0, None, 0)
    assert torch.equal(target[[0, 2]], x0[[0, 2]])
    torch.testing.assert_close(target[[1, 3]], ect.networks["student"](x_lo, torch.tensor([0.3, 0.3, 2.0, 2.0]))[[1, 3]])
    # sampling: the student's D through the shifted coefficients is the consistency function of the same backbone
    shifted = BoundaryShifted(Denoiser(random_mlp(3)), 0.5, 0.002)
    same = ConsistencyFunction(random_mlp(3), 0.5, 0.002)
    x = torch.randn(5, 2, dtype=torch.float64) * 4
    for sigma in (0.002, 0.05, 1.0, 80.0):
        torch.testing.assert_close(shifted(x, sigma), same(x, sigma), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shifted(x, 0.002), x)


# -- the shared machinery


def test_target_pass_draws_the_same_dropout_mask_and_leaves_the_rng_as_after_the_first():
    net = nn.Dropout(0.5)
    x = torch.ones(64)
    torch.manual_seed(0)
    state = random_state(x.device)
    first = net(x)
    after_first = torch.get_rng_state()
    with replayed_random_draws(state, x.device):
        again = net(x)
    assert torch.equal(first, again) and torch.equal(torch.get_rng_state(), after_first)


def test_loss_is_zero_when_both_points_coincide_even_with_dropout():
    """x_lo = x_hi at the same level: with mu = 0 the target is the student itself, and the replayed RNG gives it the
    same dropout mask, so the consistency loss vanishes exactly (a fresh mask would not)."""
    cd = CD(MLP(dim=2, hidden=32, num_blocks=2, dropout=0.5), teacher=mixture(), num_levels=2)
    nn.init.normal_(cd.networks["student"].backbone.out.weight)
    cd.grid = lambda n, device: torch.tensor([3.0, 3.0])  # one interval from 3 to 3
    cd.lower_point = lambda x0, z, x_hi, *rest: x_hi
    loss, _ = cd.loss("student", (torch.randn(16, 2), torch.zeros(16, dtype=torch.long)), 0)
    assert loss.item() == 0.0


def test_ema_target_update_and_state_round_trip():
    cd = CD(random_mlp(0), teacher=mixture(), target_decay=0.5)
    student = cd.networks["student"]
    before = [p.detach().clone() for p in student.parameters()]
    cd.after_step("student", 0)  # the first update copies the student: target = student
    for p in student.parameters():
        p.data.add_(1.0)
    cd.after_step("student", 1)
    for t, b in zip(cd.target.parameters(), before):
        torch.testing.assert_close(t, b + 0.5)
    assert not any(p.requires_grad for p in cd.target.parameters())
    other = CD(random_mlp(5), teacher=mixture(), target_decay=0.5)
    other.load_state_dict(cd.state_dict())
    for a, b in zip(other.target.parameters(), cd.target.parameters()):
        assert torch.equal(a, b)
    assert CD(random_mlp(0), teacher=mixture()).state_dict() == {}  # mu = 0 keeps no copy


# -- learning


def run(objective, steps, seed=0, lr=3e-3):
    torch.manual_seed(seed)
    teacher = mixture().float()
    optimiser = torch.optim.Adam(objective.networks["student"].parameters(), lr=lr)
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        x0 = teacher.sample(256, generator=generator).float()
        loss, _ = objective.loss("student", (x0, torch.zeros(256, dtype=torch.long)), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        objective.after_step("student", step)
    return objective


@pytest.mark.parametrize("name", ["cd", "ict", "ect"])
def test_short_runs_learn_the_exact_ode_map_in_one_step(name):
    """A 4-component 2-D mixture; the exact map z -> x0 by a fine Heun solve of the exact denoiser. CD (the
    analytic teacher), iCT and ECT (no teacher weights to start from) beat the teacher's own 1-NFE Euler step
    D(80 z, 80) by far."""
    teacher = mixture().float()
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = sample_heun(teacher.double(), 80.0 * z.double(), sigmas_for_nfe("heun", 79)).float()
        euler = (teacher(80.0 * z, 80.0) - exact).norm(dim=1).mean()
    backbone = MLP(dim=2, hidden=64, num_blocks=2, emb_channels=32)
    objective = {"cd": lambda: CD(backbone, teacher=teacher), "ict": lambda: ICT(backbone, total_steps=600, s1=160),
                 "ect": lambda: ECT(backbone, teacher=teacher, stage_steps=100)}[name]()  # ect: random init here
    run(objective, 600)
    with torch.no_grad():
        error = (objective.generate(z, 1) - exact).norm(dim=1).mean()
    assert error < {"cd": 0.35, "ict": 0.7, "ect": 0.75}[name] * euler, (float(error), float(euler))


# -- through the training loop


def test_ct_and_ict_runs_take_their_curriculum_from_the_run_and_resume_exactly(tmp_path):
    """total_steps defaults to train.steps and is saved; CT's EMA target is in the checkpoint, so a run stopped at
    step 2 and resumed to 5 equals a straight 5-step run bit for bit (ict: no target, same check)."""
    import yaml
    from runs.checkpoint import load_checkpoint
    from runs.train import make_config, parse_args, train
    from tests.test_distill_runs import VECTOR, assert_same_run_state
    for name in ("ct", "ict"):
        args = ["--backbone", "mlp", "--objective", name, "--data", "gmm",
                *[o for o in VECTOR if not o.startswith("teacher.")], "backbone.dropout=0.1"]
        train(make_config(parse_args(args + ["train.steps=5"]))[0], tmp_path / f"{name}_straight")
        train(make_config(parse_args(args + ["train.steps=2", "objective.total_steps=5"]))[0], tmp_path / name)
        train(make_config(parse_args(["--resume", str(tmp_path / name), "train.steps=5"]))[0], tmp_path / name,
              resume=True)
        saved = yaml.safe_load((tmp_path / f"{name}_straight" / "config.yaml").read_text())
        assert saved["objective"]["total_steps"] == 5 and "teacher" not in saved
        a, b = load_checkpoint(tmp_path / f"{name}_straight"), load_checkpoint(tmp_path / name)
        assert a["step"] == b["step"] == 5
        assert_same_run_state(a, b)
        assert ("target" in a["objective"]) == (name == "ct")


def test_sampling_a_trained_cd_student_counts_its_calls_and_repeats_per_seed(tmp_path):
    from runs.build import load_run
    from runs.sample import sample
    from runs.train import make_config, parse_args, train
    from tests.test_distill_runs import VECTOR
    args = ["--backbone", "mlp", "--objective", "cd", "--data", "gmm", *VECTOR, "train.steps=2",
            "objective.sample_sigmas=[1.0,0.2]"]
    train(make_config(parse_args(args))[0], tmp_path / "cd")
    config, objective = load_run(tmp_path / "cd")
    first, _, nfe, _ = sample(objective, config, 16, 3, seed=4)
    again, _, _, _ = sample(objective, config, 16, 3, seed=4)
    other, _, _, _ = sample(objective, config, 16, 3, seed=5)
    assert nfe == 3 and torch.equal(first, again) and not torch.equal(first, other)
    one, _, nfe, _ = sample(objective, config, 16, 1, seed=4)
    z = torch.randn([16, 2], generator=torch.Generator().manual_seed(4))  # runs.sample's noise for seed 4
    with torch.inference_mode():
        torch.testing.assert_close(one, objective.networks["student"](80.0 * z, torch.full((16,), 80.0)))
    assert nfe == 1
