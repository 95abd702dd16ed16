"""DiffRatio (arXiv 2502.08005): the logistic classifier learns the closed-form log density ratio of two noisy
Gaussians, the student's surrogate pushes samples by w(sigma) times that ratio's input gradient, a one-step generator
trained through the loop moves onto a 2-D mixture, and the teacher gives weights but is never called."""
import math

import pytest
import torch
from torch import nn

import objectives
from metrics.toy import sliced_wasserstein
from models.analytic import GaussianMixtureDenoiser
from models.denoiser import Denoiser
from models.mlp import MLP
from objectives.diffratio import DiffRatio, RatioClassifier, log_ratio_gradient
from runs import config as run_config
from runs.build import build_objective, complete_config
from runs.teacher import load_teacher
from runs.train import train

# fake (generator) q = N(FAKE_MEAN, FAKE_STD^2 I) and real p = N(REAL_MEAN, REAL_STD^2 I) in 2-D
FAKE_MEAN, FAKE_STD = torch.tensor([0.5, -0.25]), 0.4
REAL_MEAN, REAL_STD = torch.tensor([-0.25, 0.5]), 0.8


def log_normal(x, mean, variance):
    """log N(x; mean, variance I) for x [B, D] and variance a number or [B]."""
    variance = torch.as_tensor(variance, dtype=x.dtype).reshape(-1)
    return -0.5 * ((x - mean).square().sum(1) / variance + x.shape[1] * torch.log(2 * math.pi * variance))


def exact_log_ratio(x, sigma):
    """log q_sigma(x) - log p_sigma(x) of the two Gaussians noised at sigma (a number or [B])."""
    sigma2 = torch.as_tensor(sigma, dtype=x.dtype) ** 2
    return log_normal(x, FAKE_MEAN, FAKE_STD**2 + sigma2) - log_normal(x, REAL_MEAN, REAL_STD**2 + sigma2)


def exact_log_ratio_gradient(x, sigma):
    """grad_x of exact_log_ratio: -(x - m_q)/(s_q^2 + sigma^2) + (x - m_p)/(s_p^2 + sigma^2)."""
    sigma2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
    return -(x - FAKE_MEAN) / (FAKE_STD**2 + sigma2) + (x - REAL_MEAN) / (REAL_STD**2 + sigma2)


class ExactLogRatio(nn.Module):
    """The optimal classifier in closed form; one unused parameter to check that none receives a gradient."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return exact_log_ratio(x, sigma) + 0 * self.unused


class QuadraticLogit(nn.Module):
    """d(x) = c + b.x + a ||x||^2: the family the exact log ratio of two isotropic Gaussians lies in."""

    def __init__(self):
        super().__init__()
        self.c, self.a = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x, sigma, class_labels=None):
        return self.c + x @ self.b + self.a * x.square().sum(1)


class ExplodingTeacher(Denoiser):
    """A trained-looking MLP teacher whose weights may be copied but which must never be evaluated."""

    def forward(self, *args, **kwargs):
        raise AssertionError("diffratio called its teacher")


def exploding_teacher(hidden=16, num_blocks=1, out_std=1.0):
    torch.manual_seed(3)
    teacher = ExplodingTeacher(MLP(dim=2, hidden=hidden, num_blocks=num_blocks), "edm", 0.5)
    nn.init.normal_(teacher.backbone.out.weight, std=out_std)  # MLP zero-initialises its output layer
    return teacher.eval().requires_grad_(False)


def analytic_teacher():
    return GaussianMixtureDenoiser(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))


def fake_and_real(n, generator):
    fake = FAKE_MEAN + FAKE_STD * torch.randn(n, 2, generator=generator)
    real = REAL_MEAN + REAL_STD * torch.randn(n, 2, generator=generator)
    return fake, real


def fit_classifier(objective, sigma, steps, lr, batch=2048, seed=0):
    """Adam on the objective's own classifier loss at a fixed sigma, with fresh samples every step."""
    generator = torch.Generator().manual_seed(seed)
    classifier = objective.networks["classifier"]
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        fake, real = fake_and_real(batch, generator)
        loss, _ = objective.classifier_loss(fake, real, None, torch.full((batch,), sigma))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def held_out_points(sigma, n=1000):
    """Points where the two noisy distributions have their mass (half from each)."""
    fake, real = fake_and_real(n // 2, torch.Generator().manual_seed(123))
    x = torch.cat([fake, real])
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))


# 1. closed form


def log_ratio_errors(classifier, sigma):
    """Relative errors of the classifier's logit and input gradient against the exact log ratio on held-out points."""
    x = held_out_points(sigma)
    sigmas = torch.full((len(x),), sigma)
    with torch.no_grad():
        learned = classifier(x, sigmas)
    exact = exact_log_ratio(x, sigma)
    gradient, _ = log_ratio_gradient(classifier, x, sigmas)
    exact_gradient = exact_log_ratio_gradient(x, sigma)
    logit_error = (learned - exact).abs().mean() / exact.abs().mean()
    gradient_error = (gradient - exact_gradient).norm(dim=1).mean() / exact_gradient.norm(dim=1).mean()
    return logit_error, gradient_error


def test_classifier_loss_learns_the_closed_form_log_ratio_and_its_gradient():
    """Well-specified logistic regression (quadratic features) on the objective's classifier loss recovers
    log N(x; m_q, (s_q^2 + sigma^2) I) - log N(x; m_p, (s_p^2 + sigma^2) I) and its input gradient."""
    torch.manual_seed(0)
    sigma = 0.5
    objective = DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=analytic_teacher())
    objective.networks["classifier"] = QuadraticLogit()
    fit_classifier(objective, sigma, steps=400, lr=0.05)

    logit_error, gradient_error = log_ratio_errors(objective.networks["classifier"], sigma)
    assert logit_error < 0.03, float(logit_error)  # measured 0.003
    assert gradient_error < 0.03, float(gradient_error)  # measured 0.004


def test_the_backbone_classifier_learns_the_log_ratio_too():
    """The objective's own RatioClassifier (an MLP backbone with the 1x1 read-out) at a fixed sigma."""
    torch.manual_seed(0)
    sigma = 0.5
    objective = DiffRatio(MLP(dim=2, hidden=32, num_blocks=1), teacher=analytic_teacher())
    assert isinstance(objective.networks["classifier"], RatioClassifier)
    fit_classifier(objective, sigma, steps=300, lr=1e-2, batch=1024)

    logit_error, gradient_error = log_ratio_errors(objective.networks["classifier"], sigma)
    assert logit_error < 0.12, float(logit_error)   # measured 0.093 (an MLP fitting a quadratic from labels)
    assert gradient_error < 0.25, float(gradient_error)  # measured 0.185


def test_student_gradient_is_the_weighted_log_ratio_gradient_of_an_exact_classifier():
    """d loss / d G(z) = sigma^2 grad_x log(q_sigma/p_sigma)(x_t) / (B * D) per sample, at per-sample sigmas;
    by Tweedie that update is D_q(x_t) - D_p(x_t), the difference of the two exact denoisers."""
    torch.manual_seed(0)
    objective = DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=analytic_teacher())
    objective.networks["classifier"] = ExactLogRatio()
    batch = 64
    x_fake = (FAKE_MEAN + FAKE_STD * torch.randn(batch, 2)).requires_grad_(True)
    sigma = torch.logspace(-2, 1, batch)
    noise = torch.randn(batch, 2)
    loss, logs = objective.student_loss(x_fake, None, sigma, noise)
    loss.backward()

    x_t = x_fake.detach() + sigma[:, None] * noise
    update = sigma[:, None] ** 2 * exact_log_ratio_gradient(x_t, sigma)
    torch.testing.assert_close(x_fake.grad * batch * 2, update, rtol=1e-4, atol=1e-6)
    fake_denoiser = GaussianMixtureDenoiser(FAKE_MEAN[None], torch.full((1, 2), FAKE_STD**2), torch.ones(1))
    real_denoiser = GaussianMixtureDenoiser(REAL_MEAN[None], torch.full((1, 2), REAL_STD**2), torch.ones(1))
    torch.testing.assert_close(update, fake_denoiser(x_t, sigma) - real_denoiser(x_t, sigma), rtol=1e-4, atol=1e-5)
    assert objective.networks["classifier"].unused.grad is None  # only the input was differentiated
    torch.testing.assert_close(logs["log_ratio"], exact_log_ratio(x_t, sigma).mean())

    # frozen classifier parameters (the loop's student phase): the input gradient is unchanged
    objective.networks["classifier"].requires_grad_(False)
    x_again = x_fake.detach().clone().requires_grad_(True)
    objective.student_loss(x_again, None, sigma, noise)[0].backward()
    torch.testing.assert_close(x_again.grad, x_fake.grad)

    # "normalised": each sample's update has mean absolute value 1, in the same direction
    normalised = DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=analytic_teacher(), weighting="normalised")
    normalised.networks["classifier"] = ExactLogRatio()
    x_norm = x_fake.detach().clone().requires_grad_(True)
    normalised.student_loss(x_norm, None, sigma, noise)[0].backward()
    step = x_norm.grad * batch * 2
    torch.testing.assert_close(step.abs().mean(1), torch.ones(batch), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, update / update.abs().mean(1, keepdim=True), rtol=1e-4, atol=1e-5)


# 2. through the training loop


def diffratio_config(steps, objective=(), lr=5e-4):
    """(resolved config, data set): diffratio on the 2-D 8-mode mixture with an mlp, no end-of-run report."""
    return complete_config({
        "backbone": {"name": "mlp", "hidden": 64, "num_blocks": 2},
        "objective": {"name": "diffratio", **dict(objective)},
        "data": {"name": "gmm", "n": 2048},
        "train": {"steps": steps, "batch_size": 256, "lr": lr, "warmup_steps": 0, "device": "cpu",
                  "sample_every": 0, "log_every": 50, "ckpt_every": 10_000, "ckpt_minutes": 0},
        "teacher": {"eval_n": 0}})


def test_config_resolves_and_declared_optimiser_settings_apply(monkeypatch):
    assert objectives.OBJECTIVES["diffratio"] is DiffRatio
    assert run_config.REGISTRIES["objective"] is objectives.OBJECTIVES
    config, _ = diffratio_config(1)
    assert config["objective"]["init"] == "teacher" and "teacher" in config
    objective = DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=analytic_teacher())
    roles = run_config.role_settings(objective, config["train"], {"student": {"lr": 1e-4}})
    assert roles["student"]["betas"] == roles["classifier"]["betas"] == [0.0, 0.999]
    assert roles["student"]["lr"] == 1e-4 and roles["classifier"]["lr"] == config["train"]["lr"]
    assert roles["student"]["ema"] and not roles["classifier"]["ema"]


def test_generator_moves_onto_the_mixture_through_the_loop(tmp_path, monkeypatch):
    """Analytic teacher (random initialisation): the one-step samples' sliced Wasserstein distance to the 8-mode
    mixture falls below half its initial value in 300 steps (1:1 updates)."""
    assert objectives.OBJECTIVES["diffratio"] is DiffRatio
    torch.manual_seed(0)
    config, dataset = diffratio_config(300, objective={"classifier_steps": 1})
    data = torch.stack([dataset[i][0] for i in range(1000)])
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))

    def distance(objective):
        with torch.no_grad():
            return sliced_wasserstein(objective.generate(z, 1), data)

    teacher = load_teacher(config["teacher"], dataset, False, torch.device("cpu"))[0]
    torch.manual_seed(config["train"]["seed"])  # the loop's seed, so this is the loop's step-0 generator
    initial = distance(build_objective(config, teacher=teacher))
    objective, _ = train(config, tmp_path / "run", dataset=dataset)
    final = distance(objective)
    assert objective.initialised_from_teacher == {"student": False, "classifier": False}
    assert final < 0.5 * initial, (initial, final)


@pytest.mark.parametrize("init", ["teacher", "random"])
def test_both_initialisations_train_through_the_loop_without_calling_the_teacher(tmp_path, monkeypatch, init):
    """The loop with a trained-looking teacher that raises when called: both inits run, from the weights asked for."""
    assert objectives.OBJECTIVES["diffratio"] is DiffRatio
    teacher = exploding_teacher(hidden=64, num_blocks=2, out_std=0.1)  # the run's backbone settings
    config, dataset = diffratio_config(4, objective={"init": init})
    objective, _ = train(config, tmp_path / init, teacher=teacher, dataset=dataset)
    assert objective.initialised_from_teacher == {"student": init == "teacher", "classifier": init == "teacher"}
    distance = (objective.networks["student"].backbone.out.weight - teacher.backbone.out.weight).abs().max()
    if init == "teacher":  # trained for 4 steps from the teacher's weights
        assert 0 < distance < 0.01
    else:  # from the backbone's own (zero) output layer
        assert distance > 0.05
    assert all(torch.isfinite(p).all() for net in objective.networks.values() for p in net.parameters())


# 3. the teacher is weights only; errors


def test_teacher_weights_start_both_roles_and_the_teacher_is_never_called():
    teacher = exploding_teacher()
    objective = DiffRatio(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, sigma_init=2.5)
    assert objective.initialised_from_teacher == {"student": True, "classifier": True}
    for role in ("student", "classifier"):
        backbone = objective.networks[role].backbone if role == "student" else \
            objective.networks[role].denoiser.backbone
        for (name, ours), theirs in zip(backbone.state_dict().items(), teacher.backbone.state_dict().values()):
            assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr(), (role, name)
    z = torch.randn(8, 2)
    plain_teacher = Denoiser(teacher.backbone, "edm", 0.5)  # the same weights, callable
    torch.testing.assert_close(objective.generate(z, nfe=1), plain_teacher(2.5 * z, torch.full((8,), 2.5)))

    batch = (torch.randn(16, 2), torch.zeros(16, dtype=torch.long))
    assert objective.phases(0) == ["classifier", "student"] and objective.phases(1) == ["classifier"]
    for role in ("classifier", "student"):
        for other, net in objective.networks.items():
            net.requires_grad_(other == role).zero_grad(set_to_none=True)
        loss, logs = objective.loss(role, batch, step=0)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        frozen = [p for other, net in objective.networks.items() if other != role for p in net.parameters()]
        assert all(p.grad is None for p in frozen)
    assert not any(isinstance(v, nn.Module) and v is teacher for v in vars(objective).values())

    random = DiffRatio(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, init="random")
    assert random.initialised_from_teacher == {"student": False, "classifier": False}
    assert not torch.equal(random.networks["student"].backbone.out.weight, teacher.backbone.out.weight)
    mixed = DiffRatio(MLP(dim=2, hidden=16, num_blocks=1), teacher=teacher, init="random", classifier_init="teacher")
    assert mixed.initialised_from_teacher == {"student": False, "classifier": True}


def test_labels_reach_both_roles_of_a_conditional_objective():
    torch.manual_seed(0)
    objective = DiffRatio(MLP(dim=2, hidden=16, num_blocks=1, label_dim=3), teacher=analytic_teacher())
    for net in (objective.networks["student"].backbone, objective.networks["classifier"].denoiser.backbone):
        nn.init.normal_(net.out.weight)
        nn.init.normal_(net.label_embed.weight)
    z, x = torch.randn(4, 2), torch.randn(4, 2)
    zeros, twos = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    assert not torch.allclose(objective.student(z, zeros), objective.student(z, twos))
    classifier = objective.networks["classifier"]
    assert not torch.allclose(classifier(x, torch.ones(4), zeros), classifier(x, torch.ones(4), twos))
    torch.testing.assert_close(objective.generate(z, 1, cond={"class_labels": twos}), objective.student(z, twos))
    for role in ("classifier", "student"):
        assert torch.isfinite(objective.loss(role, (x, twos), 0)[0])


def test_bad_settings_are_one_line_errors():
    teacher = analytic_teacher()
    with pytest.raises(ValueError, match="unknown diffratio init 'scratch'; known: random, teacher"):
        DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher, init="scratch")
    with pytest.raises(ValueError, match="classifier_init 'x'; known: random, teacher"):
        DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher, classifier_init="x")
    with pytest.raises(ValueError, match="weighting 'dmd'; known: normalised, sigma2"):
        DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher, weighting="dmd")
    with pytest.raises(ValueError, match="diffratio needs a teacher"):
        DiffRatio(MLP(dim=2, hidden=8, num_blocks=1))
    objective = DiffRatio(MLP(dim=2, hidden=8, num_blocks=1), teacher=teacher)
    with pytest.raises(ValueError, match="exactly one step"):
        objective.generate(torch.randn(4, 2), nfe=2)
    with pytest.raises(ValueError, match="roles student and classifier"):
        objective.loss("fake_score", (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), 0)
    assert DiffRatio.needs_teacher and DiffRatio.needs_data and DiffRatio.eval_nfe == 1
    assert objective.optimizer_settings()["classifier"]["ema"] is False
