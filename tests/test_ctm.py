"""CTM (objectives/ctm.py; Kim et al. 2024): the teacher-initialised student is the teacher's Euler step, the loss
vanishes at the exact flow map of a Gaussian, the time draws and the batched per-sample teacher steps against their
definitions, training on the analytic mixture learns the one-step and two-time maps, runs through runs.train
(unconditional, conditional, with the GAN term; exact resume), gamma-sampling, and one-line errors."""
import pytest
import torch
from torch import nn

from data.mixtures import gaussian_mixture_params
from models import BACKBONES
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from objectives import OBJECTIVES
from objectives.ctm import CTM
from runs.checkpoint import load_checkpoint
from runs.train import main, make_config, parse_args, train
from solvers import euler_step, heun_step, karras, sample_heun
from tests.roles import assert_roles_change_only_in_their_phases, train_recording_roles

torch.set_num_threads(1)

V = 0.25  # the single Gaussian's variance (sigma_data 0.5)


def trained_like_teacher(dim=2, hidden=16, seed=0, **kwargs):
    """A network teacher whose weights are all visibly non-zero (a stand-in for a trained one)."""
    torch.manual_seed(seed)
    teacher = Denoiser(MLP(dim=dim, hidden=hidden, num_blocks=1, **kwargs))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return teacher.eval().requires_grad_(False)


def mixture(components=4):
    return GaussianMixtureDenoiser(**gaussian_mixture_params(2, components, seed=0))


def one_line(error):
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


class ExactGaussianFlowMap(nn.Module):
    """G*(x, t, s) = mu + sqrt((V + s^2) / (V + t^2)) (x - mu), the exact flow map of N(mu, V I); `power` != 1 or
    `shift` != 0 perturb it (G(x, t, t) = x still holds)."""

    def __init__(self, mu, power=1.0, shift=0.0):
        super().__init__()
        self.register_buffer("mu", mu)
        self.power, self.shift = power, shift

    def forward(self, x, sigma, sigma_to, class_labels=None):
        ratio = (((V + sigma_to**2) / (V + sigma**2)) ** (0.5 * self.power))[:, None]
        return self.mu + self.shift * (1 - ratio) + ratio * (x - self.mu)


def gaussian_problem(dim=4):
    torch.manual_seed(0)
    mu = torch.randn(dim)
    teacher = GaussianMixtureDenoiser(mu[None], torch.full((1, dim), V), torch.ones(1)).float()
    return mu, teacher


# -- 1. initialisation


def test_teacher_initialised_student_is_the_teachers_euler_step_for_any_jump():
    teacher = trained_like_teacher(dim=3)
    ctm = CTM(MLP(dim=3, hidden=16, num_blocks=1), teacher=teacher)
    assert OBJECTIVES["ctm"] is CTM and ctm.needs_teacher and ctm.needs_data and ctm.eval_nfe == 1
    assert ctm.initialised_from_teacher and ctm.last_layer == "backbone.out.weight"
    student = ctm.networks["student"].eval()
    torch.manual_seed(1)
    x = 5 * torch.randn(64, 3)
    t = karras(18)[:-1][torch.randint(0, 17, (64,))].float()
    s = t * torch.rand(64)  # 0 <= s <= t
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, s), euler_step(teacher, x, t, s)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ctm.target.eval()(x, t, s), student(x, t, s))  # the target starts as the student
        torch.testing.assert_close(ctm.denoiser()(x, t), teacher(x, t))           # g(x, t, t) = D_teacher
        torch.testing.assert_close(ctm.generate(x[:, :], 1), teacher(80 * x, torch.full((64,), 80.0)))
    assert not any(p.requires_grad for p in ctm.target.parameters())


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_output_layer_of_the_adaptive_weights_is_found_on_image_backbones(name):
    args = {"unet": dict(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=()),
            "dit": dict(img_resolution=8, in_channels=1, depth=1, hidden_size=32, num_heads=2, patch_size=2)}[name]
    teacher = Denoiser(BACKBONES[name](**args)).eval().requires_grad_(False)
    ctm = CTM(BACKBONES[name](**args), teacher=teacher)
    assert ctm.last_layer == {"unet": "backbone.out_conv.weight", "dit": "backbone.final.linear.weight"}[name]


# -- 2. the loss at the exact flow map; the time draws; the teacher steps


def test_loss_vanishes_at_the_exact_flow_map_of_a_gaussian():
    """With the exact Gaussian teacher on a 40-level grid (Heun steps fine enough) and student = target = G*, the
    CTM loss is ~0, and far larger for a perturbed flow map."""
    mu, teacher = gaussian_problem()
    ctm = CTM(MLP(dim=4, hidden=8, num_blocks=1), teacher=teacher, num_levels=40, dsm_weight=0)
    x0 = teacher.sample(256, generator=torch.Generator().manual_seed(1)).float()
    losses = {}
    for name, net in [("exact", ExactGaussianFlowMap(mu)), ("power", ExactGaussianFlowMap(mu, power=1.05)),
                      ("shift", ExactGaussianFlowMap(mu, shift=0.05))]:
        ctm.networks["student"] = ctm.target = net
        torch.manual_seed(3)  # the same times and noise for each
        loss, logs = ctm.loss("student", (x0, torch.zeros(256, dtype=torch.long)), 0)
        assert set(logs) == {"ctm", "loss"} and torch.equal(loss, logs["ctm"])
        losses[name] = float(loss)
    assert losses["exact"] < 1e-4, losses
    assert losses["power"] > 50 * losses["exact"] and losses["shift"] > 50 * losses["exact"], losses


def test_time_draws_follow_the_papers_law():
    """k in 1..K with p(k) proportional to k; n uniform in 0..N-1-k; m uniform in n+k..N-1 (sigma_min <= s <= u < t)."""
    ctm = CTM(MLP(dim=2, hidden=8, num_blocks=1), teacher=mixture(), num_levels=6, dsm_weight=0)
    torch.manual_seed(0)
    n, k, m = ctm.draw_steps(200_000)
    assert n.device.type == "cpu" and int(k.min()) == 1 and int(k.max()) == 5
    frequency = torch.bincount(k, minlength=6)[1:].double() / k.numel()
    torch.testing.assert_close(frequency, torch.arange(1, 6).double() / 15, atol=5e-3, rtol=0)
    assert bool((n >= 0).all() and (n + k <= 5).all() and (m >= n + k).all() and (m <= 5).all())
    # given k = 2: n uniform on 0..3; given (n, k) = (0, 2): m uniform on 2..5
    torch.testing.assert_close(torch.bincount(n[k == 2], minlength=4).double() / int((k == 2).sum()),
                               torch.full((4,), 0.25, dtype=torch.float64), atol=1e-2, rtol=0)
    picked = m[(k == 2) & (n == 0)]
    torch.testing.assert_close(torch.bincount(picked, minlength=6)[2:].double() / picked.numel(),
                               torch.full((4,), 0.25, dtype=torch.float64), atol=2e-2, rtol=0)
    shared = CTM(MLP(dim=2, hidden=8, num_blocks=1), teacher=mixture(), num_levels=6, shared_k=True, dsm_weight=0)
    assert len(set(shared.draw_steps(64)[1].tolist())) == 1  # the official code's one k per batch
    grid = ctm.grid
    assert len(grid) == 6 and float(grid[0]) == 80.0 and float(grid[-1]) == pytest.approx(0.002)


def test_batched_teacher_steps_equal_each_samples_own_heun_chain():
    """x_u of the sorted, prefix-batched loop = k[b] solvers.heun_step calls of the teacher from level n[b]."""
    teacher = mixture(components=3).float()
    ctm = CTM(MLP(dim=2, hidden=8, num_blocks=1, label_dim=3), teacher=teacher, num_levels=8, dsm_weight=0)
    torch.manual_seed(0)
    n, k, _ = ctm.draw_steps(32)
    x = 3 * torch.randn(32, 2)
    labels = torch.randint(0, 3, (32,))
    with torch.no_grad():
        batched = ctm.teacher_solve(x, n, k, labels)
        for b in range(32):
            y = x[b:b + 1]
            for j in range(int(k[b])):
                level = int(n[b]) + j
                y = heun_step(teacher, y, ctm.grid[level:level + 1], ctm.grid[level + 1:level + 2],
                              cond={"class_labels": labels[b:b + 1]})[0]
            torch.testing.assert_close(batched[b:b + 1], y)


# -- 3. learning on the analytic mixture


def exact_jump(teacher, x, t, s, steps=100):
    """The exact ODE map from t to s: a fine Heun solve (float64) of the exact denoiser (to 0: Euler's last step)."""
    if s == 0:
        return sample_heun(teacher, x, karras(steps, 0.002, t, 7.0))
    levels = karras(steps, s, t, 7.0)[:-1].tolist()
    for a, b in zip(levels, levels[1:]):
        x = heun_step(teacher, x, a, b)[0]
    return x


def test_training_on_the_mixture_learns_the_one_step_and_two_time_maps():
    """4-component 2-D mixture, exact teacher, a random-init MLP (an analytic teacher has no weights), N = 10,
    200 steps: the one-step map error falls far below its start (the teacher's Euler error), and G(x, t, s)
    approaches the exact two-time map at grid pairs (t, s) ending low (s <= 0.12). Not checked: jumps ending high
    (e.g. 1.5 -> 0.47). CTM's soft consistency compares jumps only after the outer jump to sigma_min, which contracts
    this mixture's narrow modes (std 0.125) strongly from such s, so errors there barely reach the loss; measured
    with these settings, the error of G(x, 1.5, 0.47) goes 0.14 -> 0.31 (200 steps) -> 0.23 (1200 steps) while the
    low pairs fall 4-5x."""
    teacher = mixture()
    grid = karras(10)[:-1].tolist()
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(512, 2, generator=generator, dtype=torch.float64)
    x0 = teacher.sample(512, generator=generator)
    low = [(grid[0], grid[7]), (grid[3], grid[9]), (grid[4], grid[7]), (grid[5], grid[8])]
    with torch.no_grad():
        one_step = exact_jump(teacher, 80.0 * z, 80.0, 0.0).float()
        points = {(t, s): (x0 + t * z).float() for t, s in low}
        exact = {(t, s): exact_jump(teacher, points[t, s].double(), t, s).float() for t, s in low}

    torch.manual_seed(0)
    ctm = CTM(MLP(dim=2, hidden=64, num_blocks=2, emb_channels=32), teacher=teacher.float(), num_levels=10)

    def errors():
        student = ctm.networks["student"]
        out = {}
        with torch.no_grad():
            out["one"] = float((ctm.generate(z.float(), 1) - one_step).norm(dim=1).mean())
            for t, s in low:
                G = student(points[t, s], torch.full((512,), t), torch.full((512,), s))
                out[t, s] = float((G - exact[t, s]).norm(dim=1).mean())
        return out

    before = errors()
    optimiser = torch.optim.Adam(ctm.networks["student"].parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(2)
    for step in range(200):
        x = teacher.sample(128, generator=data).float()
        loss, logs = ctm.loss("student", (x, torch.zeros(128, dtype=torch.long)), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        ctm.after_step("student", step)
    after = errors()
    assert {"ctm", "dsm", "dsm_weight", "loss"} == set(logs) and float(logs["dsm_weight"]) > 0
    assert after["one"] < 0.3 * before["one"], (before, after)
    for pair in low:
        assert after[pair] < 0.45 * before[pair], (pair, before, after)


# -- 4. through the training loop

TOY = ["--backbone", "mlp", "--objective", "ctm", "--data", "gmm", "data.n=256", "backbone.hidden=16",
       "backbone.num_blocks=1", "train.batch_size=16", "train.sample_every=0", "train.warmup_steps=0",
       "teacher.eval_n=16", "objective.num_levels=6", "train.device=cpu"]


def test_runs_train_unconditional_and_conditional(tmp_path):
    for conditional in (False, True):
        config = make_config(parse_args(TOY + ["train.steps=3", f"train.conditional={str(conditional).lower()}"]))[0]
        objective, _ = train(config, tmp_path / str(conditional))
        state = load_checkpoint(tmp_path / str(conditional))
        assert state["step"] == 3 and set(state["networks"]) == {"student"} and "target" in state["objective"]
        z = torch.randn(4, 2)
        cond = {"class_labels": torch.arange(4) % 2} if conditional else None
        with torch.no_grad():
            assert torch.isfinite(objective.generate(z, 2, cond)).all()
        assert objective.conditional == conditional


def test_resume_is_exact_with_the_target_in_the_checkpoint(tmp_path):
    from tests.test_distill_runs import assert_same_run_state
    train(make_config(parse_args(TOY + ["train.steps=4"]))[0], tmp_path / "straight")
    train(make_config(parse_args(TOY + ["train.steps=2"]))[0], tmp_path / "resumed")
    train(make_config(parse_args(["--resume", str(tmp_path / "resumed"), "train.steps=4"]))[0],
          tmp_path / "resumed", resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4
    assert_same_run_state(a, b)


def test_gan_term_roles_update_only_in_their_alternating_phases(tmp_path, monkeypatch):
    """Through runs.train with a network teacher and the conv discriminator: the student on even steps, the
    discriminator on odd ones, each changing and getting gradients only in its phase, the teacher never."""
    objective, config, teacher, frozen, snapshots, gradients = train_recording_roles(
        monkeypatch, tmp_path / "run", CTM, "ctm", steps=4,
        extra=["objective.gan_weight=1", "objective.discriminator=conv", "objective.num_levels=6"])
    assert [role for role, _ in snapshots] == ["student", "discriminator"] * 2
    assert_roles_change_only_in_their_phases(objective, teacher, frozen, snapshots, gradients,
                                             ["student", "discriminator"])
    settings = config["optim"]["discriminator"]
    assert settings["optimizer"] == "radam" and settings["lr"] == 2e-3 and settings["ema"] is False
    logs = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "student/gan" in line]
    assert logs, "the student's GAN term is not logged"


def test_gan_weight_is_the_clipped_gradient_ratio():
    teacher = trained_like_teacher()
    ctm = CTM(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, gan_weight=2.0, discriminator="conv",
              num_levels=6)
    x0 = torch.randn(32, 2)
    _, logs = ctm.loss("student", (x0, torch.zeros(32, dtype=torch.long)), 0)
    assert 2 * 0.01 <= float(logs["gan_weight"]) <= 2 * 10
    late = CTM(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, gan_weight=1.0, gan_start=5,
               discriminator="conv", num_levels=6)
    assert "gan" not in late.loss("student", (x0, torch.zeros(32, dtype=torch.long)), 4)[1]
    assert late.phases(0) == ["student"] and late.phases(1) == ["discriminator"]
    loss, logs = late.loss("discriminator", (x0, torch.zeros(32, dtype=torch.long)), 1)
    assert torch.isfinite(loss) and "d_real" in logs


# -- 5. gamma-sampling


def test_gamma_sampling_of_an_exact_flow_map_is_the_same_for_1_2_4_jumps():
    mu, teacher = gaussian_problem()
    ctm = CTM(MLP(dim=4, hidden=8, num_blocks=1), teacher=teacher, dsm_weight=0)
    ctm.networks["student"] = ExactGaussianFlowMap(mu)
    z = torch.randn(16, 4)
    samples = [ctm.generate(z, nfe) for nfe in (1, 2, 4)]
    expected = mu + (V / (V + 80.0**2)) ** 0.5 * (80.0 * z - mu)  # G*(80 z, 80, 0)
    for sample in samples:
        torch.testing.assert_close(sample, expected, atol=1e-5, rtol=1e-5)
    noisy = CTM(MLP(dim=4, hidden=8, num_blocks=1), teacher=teacher, dsm_weight=0, gamma=0.5)
    noisy.networks["student"] = ExactGaussianFlowMap(mu)
    assert not torch.allclose(noisy.generate(z, 2), expected)  # gamma > 0 re-noises
    torch.testing.assert_close(noisy.generate(z, 1), expected)  # ... but one jump lands at 0 without noise
    with pytest.raises(ValueError) as error:
        CTM(MLP(dim=4, hidden=8, num_blocks=1), teacher=teacher, gamma=1.5)
    assert "gamma" in one_line(error)


# -- 6. bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_levels=1), "num_levels"), (dict(num_levels=6, max_teacher_steps=6), "max_teacher_steps"),
    (dict(max_teacher_steps=0), "max_teacher_steps"), (dict(k_power=-1), "k_power"),
    (dict(target_decay=1.0), "target_decay"), (dict(dsm_weight=-1), "dsm_weight"),
    (dict(dsm_weight="fixed"), "dsm_weight"), (dict(gan_weight=-0.5), "gan_weight"),
    (dict(gamma=-0.1), "gamma"), (dict(teacher_solver="rk4"), "teacher_solver"), (dict(distance="l3"), "distance"),
    (dict(last_layer="backbone.nope"), "last_layer"), (dict(sigma_min=0.0), "sigma_min"),
    (dict(dsm_karras_max=1.5), "dsm_karras_max"), (dict(shared_k="yes"), "shared_k"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError) as error:
        CTM(MLP(dim=2, hidden=8, num_blocks=1), teacher=mixture(), **kwargs)
    assert match in one_line(error)


def test_no_teacher_and_a_backbone_without_a_second_time_input_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError) as error:
        CTM(MLP(dim=2, hidden=8, num_blocks=1))
    assert "needs a teacher" in one_line(error)
    fno = BACKBONES["fno"](img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ValueError) as error:
        CTM(fno, teacher=Denoiser(BACKBONES["unet"](img_resolution=8, in_channels=1, model_channels=8,
                                                    channel_mult=(1, 2), attn_resolutions=())))
    assert one_line(error).startswith("ctm: ") and "second time input" in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        main(TOY + ["objective.gamma=2", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "gamma" in err[0], err
