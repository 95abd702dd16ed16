"""Guidance distillation, stage 1 (Meng et al. 2023; objectives/guidance_distill.py): the target is the closed-form
guided denoiser D_u + w (D_c - D_u) per sample from one 2B teacher call, the zero-initialised guidance embedding
makes a teacher-initialised student the teacher's conditional model for every w, a short run on a 2-D conditional
mixture learns the guided teacher at a w it never saw exactly, and bad teachers / students are one-line errors."""
import numpy as np
import pytest
import torch

from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from models.unet import UNet
from objectives import OBJECTIVES
from objectives.guidance_distill import TEACHER_ERROR, FixedGuidance, GuidanceDistill
from runs import sample as runs_sample
from runs import train as runs_train
from solvers import SCHEDULES, SOLVERS
from tests.test_guidance import K, Recorder, closed_form, mixture


def student_mlp(hidden=32, **kwargs):
    return MLP(dim=2, hidden=hidden, num_blocks=2, emb_channels=32, label_dim=K, **kwargs)


def trained_like_teacher(seed=0):
    """A Denoiser over a conditional MLP with label dropout and non-trivial (random) weights."""
    torch.manual_seed(seed)
    teacher = Denoiser(student_mlp(label_dropout=0.1))
    for p in teacher.parameters():
        p.data.normal_(0, 0.3)
    return teacher.requires_grad_(False).eval()


def test_registered_and_declared():
    assert OBJECTIVES["guidance_distill"] is GuidanceDistill
    obj = GuidanceDistill(student_mlp(), mixture(), guidance_dim=16)
    assert obj.networks["student"].backbone.guidance_dim == 16  # the objective added the guidance embedding
    assert obj.needs_teacher and not obj.learns_teacher_map and obj.eval_nfe == 35
    assert list(obj.networks) == ["student"] and obj.phases(0) == ["student"]
    assert obj.sampler()[0] is SOLVERS["heun"] and obj.sampler()[1] is SCHEDULES["karras"] and not obj.initialised_from_teacher  # analytic: random init


def test_target_is_the_closed_form_guided_denoiser_per_sample_from_one_2B_call():
    mix = mixture()
    rec = Recorder(mix)
    rec.num_classes = K  # what the objective reads to check that the teacher is class-conditional
    obj = GuidanceDistill(student_mlp(), rec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (6,), generator=g)
    sigma = torch.tensor([0.05, 0.3, 0.8, 2.0, 5.0, 40.0], dtype=torch.float64)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.5, 4.0], dtype=torch.float64)
    expected = closed_form(mix, x, sigma, labels, w[:, None])[0]
    torch.testing.assert_close(obj.target(x, sigma, labels, w), expected, rtol=1e-10, atol=1e-10)
    assert [c[0] for c in rec.calls] == [12]  # one teacher call of 2B: the labels, then the null label
    assert torch.equal(rec.calls[0][2][6:], torch.zeros(6, K))


def test_loss_is_edm_weighted_mse_to_the_guided_teacher():
    mix = mixture()
    obj = GuidanceDistill(student_mlp(), mix, w_min=0.5, w_max=3.0)
    backbone = obj.networks["student"].backbone
    for layer in (backbone.guidance_embed[-1], backbone.out):  # zero-initialised: make w and the output matter
        torch.nn.init.normal_(layer.weight, std=0.3)
    g = torch.Generator().manual_seed(1)
    x0, labels = torch.randn(8, 2, generator=g), torch.randint(0, K, (8,), generator=g)
    torch.manual_seed(5)
    loss, logs = obj.loss("student", (x0, labels), 0)
    torch.manual_seed(5)  # the same draws, in the objective's order: sigma, w, n
    sigma = (-1.2 + 1.2 * torch.randn(8)).exp()
    w = 0.5 + 2.5 * torch.rand(8)
    x = x0 + sigma[:, None] * torch.randn_like(x0)
    target = closed_form(mix, x.double(), sigma.double(), labels, w.double()[:, None])[0].float()
    pred = obj.networks["student"](x, sigma, labels, guidance=w)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, (weight * (pred - target).square().mean(1)).mean(), rtol=1e-5, atol=1e-6)
    assert bool((w >= 0.5).all() and (w <= 3.0).all()) and torch.equal(logs["loss"], loss.detach())
    loss.backward()  # the gradient reaches the guidance embedding's (zero-initialised) last layer
    assert obj.networks["student"].backbone.guidance_embed[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_zero_initialised_guidance_embedding_starts_as_the_teachers_conditional_model(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        teacher = trained_like_teacher()
        backbone, x = student_mlp(), torch.randn(5, 2)
    else:
        from models.dit import DiT
        net, unet = (DiT, dict(label_dim=K, patch_size=4)) if kind == "dit" else \
            (UNet, dict(label_dim=K, model_channels=8, channel_mult=(1, 2), attn_resolutions=(14,)))
        teacher = Denoiser(net(**unet, label_dropout=0.1))
        for p in teacher.parameters():
            p.data.normal_(0, 0.1)
        teacher.requires_grad_(False).eval()
        backbone, x = net(**unet), torch.randn(5, 1, 28, 28)
    obj = GuidanceDistill(backbone, teacher, guidance_dim=8)
    assert obj.initialised_from_teacher
    student = obj.networks["student"].eval()
    sigma, labels = torch.tensor([0.02, 0.3, 1.0, 4.0, 60.0]), torch.tensor([0, 1, 2, 1, 0])
    cond = teacher(x, sigma, labels)
    for w in (0.0, 1.0, 2.7, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])):
        assert torch.equal(FixedGuidance(student, 0.0)(x, sigma, labels, guidance=w), cond)
    assert torch.equal(obj.denoiser()(x, sigma, labels), cond)


def test_backbones_refuse_a_missing_or_unwanted_guidance_input():
    x, noise, labels = torch.randn(2, 2), torch.randn(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="guidance_dim=0"):
        student_mlp()(x, noise, labels, guidance=torch.ones(2))
    with_w = student_mlp().add_guidance_embedding(16)
    with pytest.raises(ValueError, match="needs guidance"):
        with_w(x, noise, labels)
    with pytest.raises(ValueError, match="unexpected inputs"):
        with_w(x, noise, labels, guidance=torch.ones(2), foo=1)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        with_w(x, noise, labels, guidance=torch.ones(3))
    with pytest.raises(ValueError, match="already"):
        with_w.add_guidance_embedding(16)
    with pytest.raises(ValueError, match="even"):
        student_mlp().add_guidance_embedding(3)
    unet = UNet(model_channels=8, channel_mult=(1, 2), attn_resolutions=(14,)).add_guidance_embedding(8)
    with pytest.raises(ValueError, match="needs guidance"):
        unet(torch.randn(1, 1, 28, 28), torch.randn(1))
    assert unet(torch.randn(1, 1, 28, 28), torch.randn(1), guidance=2.0).shape == (1, 1, 28, 28)


def test_construction_errors_are_one_line():
    unconditional = Denoiser(MLP(dim=2, hidden=16, num_blocks=1))
    for teacher in (unconditional, trained_like_teacher().requires_grad_(False)):
        if teacher is not unconditional:
            teacher.backbone.label_dropout = 0.0  # conditional but never trained unconditionally
        with pytest.raises(ValueError, match=TEACHER_ERROR) as info:
            GuidanceDistill(student_mlp(), teacher)
        assert "\n" not in str(info.value)
    dropping = student_mlp(label_dropout=0.1)  # a student run inherits its teacher's label dropout: switched off
    GuidanceDistill(dropping, mixture())
    assert dropping.label_dropout == 0
    linear = torch.nn.Linear(2, 2)
    linear.label_dim = K
    cases = [(dict(backbone=linear), "guidance weight \\(unet, mlp, dit\\); Linear cannot"),
             (dict(backbone=MLP(dim=2, hidden=16)), "train.conditional=true"),
             (dict(backbone=student_mlp(), w_min=3.0, w_max=1.0), "w_min < w_max"),
             (dict(backbone=student_mlp(), sample_w=-1.0), "sample_w"),
             (dict(backbone=student_mlp(), sample_w=5.0), "outside the trained range"),
             (dict(backbone=student_mlp(), teacher=None), "needs a teacher")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            GuidanceDistill(**{"teacher": mixture(), **kwargs})


def test_short_run_learns_the_guided_teacher_at_a_held_out_w():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    variances = torch.tensor([[0.3, 0.2], [0.1, 0.4], [0.25, 0.25]])
    mix = GaussianMixtureDenoiser(means, variances, torch.tensor([0.5, 0.3, 0.2]))
    obj = GuidanceDistill(student_mlp(hidden=64), mix, w_max=4.0, guidance_dim=32)
    student = obj.networks["student"]
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, K, (512,), generator=g)
    x = mix.sample(512, generator=g, class_labels=labels).float()
    sigma = (-1.2 + 1.2 * torch.randn(512, generator=g)).exp().clamp(0.05, 20)
    x = x + sigma[:, None] * torch.randn(512, 2, generator=g)
    w_eval = 2.9  # drawn from U[0, 4] in training, never exactly this value

    def error():
        with torch.no_grad():
            target = obj.target(x, sigma, labels, torch.full((512,), w_eval))
            pred = student(x, sigma, labels, guidance=torch.full((512,), w_eval))
            return float((pred - target).square().mean())

    with torch.no_grad():  # the baseline a guidance-blind student would reach: the conditional teacher
        cond_error = float((mix(x, sigma, labels) - obj.target(x, sigma, labels, torch.full((512,), w_eval)))
                           .square().mean())
    before = error()
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    for step in range(600):
        batch_labels = torch.randint(0, K, (256,))
        x0 = mix.sample(256, class_labels=batch_labels).float()
        loss, _ = obj.loss("student", (x0, batch_labels), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = error()
    print(f"guided-teacher MSE at w={w_eval}: {before:.4g} -> {after:.4g} (conditional teacher: {cond_error:.4g})")
    assert after < 0.1 * before and after < 0.5 * cond_error


GMM = ["--objective", "guidance_distill", "--backbone", "mlp", "--data", "gmm", "data.n=256", "data.components=3",
       "backbone.hidden=16", "objective.guidance_dim=8", "train.steps=3", "train.batch_size=32", "train.device=cpu",
       "train.sample_every=0", "teacher.eval_n=16"]


def test_runs_train_with_a_trained_teacher_then_runs_sample(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    runs_train.main(["--objective", "dsm", "--backbone", "mlp", "--data", "gmm", "data.n=256", "data.components=3",
                     "backbone.hidden=16", "backbone.label_dropout=0.1", "train.conditional=true", "train.steps=3",
                     "train.batch_size=32", "train.device=cpu", "train.sample_every=0", "--out", str(teacher)])
    runs_train.main([*GMM, "train.conditional=true", "--teacher", str(teacher), "--out", str(tmp_path / "student")])
    runs_sample.main([str(tmp_path / "student"), "--nfe", "7", "--n", "4", "--out", str(tmp_path / "s.npz")])
    out = capsys.readouterr().out
    assert "NFE 7 measured" in out  # heun at 7: one student call of batch B per NFE
    s = np.load(tmp_path / "s.npz")
    assert s["samples"].shape == (4, 2) and np.isfinite(s["samples"]).all() and s["labels"].shape == (4,)


@pytest.mark.parametrize("args, message", [
    (["--data", "moons", "teacher.analytic=empirical"], "the data set has no class labels"),  # unlabelled data
    (["train.conditional=false"], "train.conditional=true"),
])
def test_runs_train_refuses_in_one_line_with_exit_2(tmp_path, capsys, args, message):
    argv = [a for a in GMM if a not in ("--data", "gmm", "data.n=256", "data.components=3")] if "--data" in args \
        else GMM
    with pytest.raises(SystemExit) as info:
        runs_train.main([*argv, *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err


# ----------------------------------------------------------------------------------- stage two

class GuidedMixture(torch.nn.Module):
    """An exact w-conditioned denoiser: the mixture's D_u + w (D_c - D_u), as a stage-one student would be."""

    takes_guidance = True

    def __init__(self, w=2.0):
        super().__init__()
        self.mix, self.w, self.label_dim = mixture(), w, K

    def forward(self, x, sigma, class_labels=None, guidance=None):
        w = torch.as_tensor(self.w if guidance is None else guidance, dtype=x.dtype).expand(x.shape[0])
        return closed_form(self.mix, x, sigma.expand(x.shape[0]).to(x.dtype), class_labels, w[:, None])[0]


def test_stage_two_target_is_two_guided_teacher_steps_at_each_samples_w():
    from objectives.guidance_distill import GuidanceProgressive
    from objectives.progressive import nested_sigmas
    from solvers import euler_step
    teacher = GuidedMixture()
    obj = GuidanceProgressive(student_mlp(), teacher, w_min=1.0, w_max=3.0, start_steps=4, end_steps=1,
                              steps_per_stage=10)
    assert OBJECTIVES["guidance_progressive"] is GuidanceProgressive
    assert obj.learns_teacher_map and obj.networks["student"].backbone.guidance_dim == 64
    grid = nested_sigmas(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64) * grid[2]
    labels, w = torch.randint(0, K, (4,), generator=g), torch.tensor([1.0, 1.5, 2.5, 3.0], dtype=torch.float64)
    sigma, mid, nxt = (torch.full((4,), float(grid[k]), dtype=torch.float64) for k in (2, 3, 4))
    x0_tilde = obj.target(x, sigma, mid, nxt, {"class_labels": labels, "guidance": w})
    for b in range(4):  # per sample: two Euler steps of the scalar-w guided teacher, then one student step lands there
        fixed = lambda x_, s_, class_labels=None: GuidedMixture(float(w[b]))(x_, s_, class_labels)  # noqa: E731
        cond = {"class_labels": labels[b:b + 1]}
        x_mid, _ = euler_step(fixed, x[b:b + 1], sigma[b:b + 1], mid[b:b + 1], cond)
        x_next, _ = euler_step(fixed, x_mid, mid[b:b + 1], nxt[b:b + 1], cond)
        student_step = x0_tilde[b] + (nxt[b] / sigma[b]) * (x[b] - x0_tilde[b])
        torch.testing.assert_close(student_step, x_next[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="w-conditioned teacher"):
        GuidanceProgressive(student_mlp(), mixture(), start_steps=4)


def test_stage_two_runs_from_a_stage_one_run_and_samples(tmp_path, capsys):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    runs_train.main([*GMM, "train.conditional=true", "--out", str(stage1)])
    runs_train.main(["--objective", "guidance_progressive", "--teacher", str(stage1), "objective.start_steps=4",
                     "objective.end_steps=1", "objective.steps_per_stage=2", "train.steps=6", "train.batch_size=32",
                     "train.device=cpu", "train.sample_every=0", "teacher.eval_n=16", "--out", str(stage2)])
    assert "map_rmse" in (stage2 / "quality.json").read_text()  # same w as its teacher: the map error is reported
    from objectives.guidance_distill import GuidanceProgressive
    from runs.build import load_run
    teacher = load_run(stage1)[1].denoiser()  # what --teacher gives: the stage-one student at its sample_w
    fresh = GuidanceProgressive(MLP(dim=2, hidden=16, label_dim=3), teacher, start_steps=4)
    x, sigma, labels, w = torch.randn(4, 2), torch.tensor([0.1, 1.0, 5.0, 40.0]), torch.tensor([0, 1, 2, 0]), 3.3
    assert fresh.networks["student"].backbone.guidance_dim == 8  # the teacher's width, its weights copied
    torch.testing.assert_close(fresh.networks["student"](x, sigma, labels, guidance=torch.full((4,), w)),
                               teacher(x, sigma, labels, guidance=w), rtol=0, atol=0)
    runs_sample.main([str(stage2), "--nfe", "1", "--n", "4", "--out", str(tmp_path / "s.npz")])
    assert "NFE 1 measured" in capsys.readouterr().out
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()


def test_no_flags_make_a_conditional_run():
    from runs.train import make_config, parse_args
    assert make_config(parse_args(["--objective", "guidance_distill"]))[0]["train"]["conditional"] is True
    assert make_config(parse_args(["--objective", "dsm"]))[0]["train"]["conditional"] is False
