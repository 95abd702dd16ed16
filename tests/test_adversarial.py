"""The shared adversarial parts: GAN losses and R1 by hand, the conv and teacher_features discriminators, and DMD2's
GAN term (its head on the fake score, or a separate discriminator role)."""
import pytest
import torch

from models.denoiser import Denoiser
from models.discriminators import ConvDiscriminator, TeacherFeatureDiscriminator, build_discriminator
from models.mlp import MLP
from models.unet import UNet
from objectives.adversarial import GanTerm, approximate_r1, discriminator_loss, generator_loss, r1_penalty
from objectives.dmd2 import DMD2, FakeScoreWithHead

TINY_UNET = dict(model_channels=8, channel_mult=(1, 2), attn_resolutions=(), mid_attention=False)


def tiny_teacher(label_dim=0, resolution=28):
    return Denoiser(UNet(img_resolution=resolution, label_dim=label_dim, **TINY_UNET)).requires_grad_(False).eval()


# -- losses by hand


def test_hinge_and_non_saturating_losses_by_hand():
    real, fake = torch.tensor([[2.0, 0.5], [-1.0, 0.0]]), torch.tensor([[-3.0, 0.2], [1.5, -0.5]])
    # hinge D: mean relu(1 - real) = (0 + 0.5 + 2 + 1) / 4; mean relu(1 + fake) = (0 + 1.2 + 2.5 + 0.5) / 4
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(3.5 / 4 + 4.2 / 4)
    assert generator_loss("hinge", fake).item() == pytest.approx(-(-3.0 + 0.2 + 1.5 - 0.5) / 4)
    softplus = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item()
    expected_d = sum(softplus(-r) for r in [2.0, 0.5, -1.0, 0.0]) / 4 + sum(softplus(f) for f in [-3.0, 0.2, 1.5, -0.5]) / 4
    assert discriminator_loss("non_saturating", real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert generator_loss("non_saturating", fake).item() == pytest.approx(
        sum(softplus(-f) for f in [-3.0, 0.2, 1.5, -0.5]) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'; known: hinge, non_saturating"):
        discriminator_loss("wgan", real, fake)


def test_r1_is_the_squared_input_gradient_and_trains_the_discriminator():
    """D(x) = sum_i a_i x_i^2 per sample: grad = 2 a x, so R1 = mean_b sum_i 4 a_i^2 x_bi^2; its gradient w.r.t. a is
    mean_b sum_i 8 a_i x_bi^2 (the graph is kept: the penalty trains the discriminator)."""
    a = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], requires_grad=True)
    logits = (a * x**2).sum(1, keepdim=True)
    r1 = r1_penalty(logits, x)
    assert r1.item() == pytest.approx(((4 * a**2 * x**2).sum(1)).mean().item())
    (grad_a,) = torch.autograd.grad(r1, a)
    torch.testing.assert_close(grad_a, (8 * a * x**2).mean(0).detach())


def test_approximate_r1_is_the_logit_change_under_small_noise():
    disc = lambda x, sigma, labels: 3.0 * x.sum(1, keepdim=True)  # a linear D: the change is 3 * 0.1 * sum(n)
    x = torch.zeros(4096, 2)
    torch.manual_seed(0)
    value = approximate_r1(disc, x, disc(x, None, None))
    assert value.item() == pytest.approx(9 * 0.01 * 2, rel=0.05)  # E (0.3 (n1 + n2))^2 = 0.09 * 2


def test_gan_term_adds_r1_on_real_samples_and_detaches_the_fakes():
    torch.manual_seed(0)
    term = GanTerm("test", MLP(dim=2), None, "conv", {"noise_conditional": False}, "hinge", r1_weight=2.0)
    term.module.eval()  # spectral norm's power iteration would otherwise move the weights at every call
    real, fake = torch.randn(16, 2), torch.randn(16, 2, requires_grad=True)
    loss, logs = term.discriminator_loss(term.module, real, fake * 2)
    loss.backward()
    assert fake.grad is None and all(p.grad is not None for p in term.module.parameters() if p.requires_grad)
    x = real.clone().requires_grad_(True)
    expected_r1 = 0.5 * 2.0 * r1_penalty(term.module(x, None, None), x)
    assert logs["r1"].item() == pytest.approx(expected_r1.item(), rel=1e-5)
    assert logs["loss"].item() == pytest.approx(
        discriminator_loss("hinge", term.module(real), term.module(fake * 2)).item() + expected_r1.item(), rel=1e-5)


# -- discriminators


@pytest.mark.parametrize("label_dim", [0, 10])
def test_conv_discriminator_images_and_vectors(label_dim):
    torch.manual_seed(0)
    labels = torch.arange(4) % 10 if label_dim else None
    disc = build_discriminator("conv", UNet(label_dim=label_dim, **TINY_UNET))
    assert isinstance(disc, ConvDiscriminator) and disc.noise_conditional
    logits = disc(torch.randn(4, 1, 28, 28), torch.rand(4) + 0.1, labels)
    assert logits.shape == (4, 14 * 14) and logits.dtype == torch.float32
    vector = build_discriminator("conv", MLP(dim=2, label_dim=label_dim), args={"noise_conditional": False})
    assert vector(torch.randn(4, 2), None, labels).shape == (4, 1)
    with pytest.raises(ValueError, match="needs sigma"):
        disc(torch.randn(4, 1, 28, 28), None, labels)
    with pytest.raises(ValueError, match=r"expects inputs of shape \[B, 1, 28, 28\]"):
        disc(torch.randn(4, 3, 28, 28), torch.ones(4), labels)
    if label_dim:
        with pytest.raises(ValueError, match="needs class_labels"):
            disc(torch.randn(4, 1, 28, 28), torch.ones(4))
    else:
        with pytest.raises(ValueError, match="unconditional discriminator"):
            disc(torch.randn(4, 1, 28, 28), torch.ones(4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("levels", ["bottleneck", "all"])
def test_teacher_features_heads_train_and_the_teacher_never_changes(levels):
    torch.manual_seed(0)
    teacher = tiny_teacher(label_dim=10)
    before = [p.clone() for p in teacher.parameters()]
    disc = build_discriminator("teacher_features", UNet(label_dim=10, **TINY_UNET), teacher, {"levels": levels})
    assert isinstance(disc, TeacherFeatureDiscriminator)
    heads = [p for p in disc.parameters() if p.requires_grad]
    assert heads and not any(p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.Adam(heads, lr=1e-2)
    x, labels = torch.randn(6, 1, 28, 28, requires_grad=True), torch.arange(6)
    disc.train()
    assert not teacher.training
    logits = disc(x, torch.full((6,), 0.5), labels)
    assert logits.shape == (6, 196 + (784 + 196 if levels == "all" else 0))  # 28x28 and 14x14 levels, 14x14 middle
    discriminator_loss("hinge", logits[:3], logits[3:]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator learns through it
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_discriminators_refuse_data_they_cannot_take():
    with pytest.raises(ValueError, match="needs a trained denoiser teacher"):
        build_discriminator("teacher_features", UNet(**TINY_UNET), None)
    with pytest.raises(ValueError, match=r"cannot read this teacher on data of shape \[1, 32, 32\]"):
        build_discriminator("teacher_features", UNet(img_resolution=32, **TINY_UNET), tiny_teacher())
    with pytest.raises(ValueError, match="takes images; the data are vectors"):
        build_discriminator("dino", MLP(dim=2))
    with pytest.raises(ValueError, match="unknown discriminator 'nope'; known: conv, dino, teacher_features"):
        build_discriminator("nope", MLP(dim=2))
    with pytest.raises(ValueError, match="img_resolution come.* from the data"):
        build_discriminator("conv", UNet(**TINY_UNET), args={"img_resolution": 32})
    with pytest.raises(ValueError, match="r1_weight must be a number >= 0"):
        GanTerm("add", MLP(dim=2), None, "conv", r1_weight=-1)


# -- DMD2's GAN term


def test_dmd2_gan_head_trains_with_the_fake_score_and_pushes_the_generator():
    torch.manual_seed(0)
    backbone = UNet(label_dim=10, **TINY_UNET)
    dmd2 = DMD2(backbone, teacher=tiny_teacher(label_dim=10))
    fake = dmd2.networks["fake_score"]
    assert isinstance(fake, FakeScoreWithHead) and set(dmd2.networks) == {"student", "fake_score"} and dmd2.needs_data
    x, labels = torch.randn(4, 1, 28, 28), torch.arange(4)
    torch.testing.assert_close(fake(x, torch.ones(4), labels), fake.denoiser(x, torch.ones(4), labels))
    batch = (torch.randn(4, 1, 28, 28), labels)
    loss, logs = dmd2.loss("fake_score", batch, 1)
    assert {"dsm", "gan_d_real", "gan_d_fake", "loss"} <= set(logs)
    assert loss.item() == pytest.approx(logs["dsm"].item() + 1e-2 * logs["gan_loss"].item(), rel=1e-5)
    loss.backward()
    encoder = fake.denoiser.backbone.enc_in.weight  # the head's loss reaches the fake score's encoder
    assert encoder.grad is not None and fake.head.heads[0].net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dmd2.networks["student"].parameters())
    fake.requires_grad_(False)  # the student's phase: the fake score is frozen but differentiable
    loss, logs = dmd2.loss("student", batch, 0)
    loss.backward()
    assert loss.item() == pytest.approx(logs["dm"].item() + 3e-3 * logs["gan"].item(), rel=1e-5)
    assert dmd2.networks["student"].backbone.enc_in.weight.grad.abs().sum() > 0


def test_dmd2_with_a_separate_discriminator_and_the_no_gan_ablation():
    teacher = tiny_teacher()
    dmd2 = DMD2(UNet(**TINY_UNET), teacher=teacher, discriminator="teacher_features")
    assert set(dmd2.networks) == {"student", "fake_score", "discriminator"}
    assert dmd2.phases(0) == ["student", "fake_score", "discriminator"] and dmd2.phases(1) == ["fake_score",
                                                                                               "discriminator"]
    assert dmd2.optimizer_settings()["discriminator"]["ema"] is False
    loss, logs = dmd2.loss("discriminator", (torch.randn(4, 1, 28, 28),), 1)
    assert torch.isfinite(loss) and "d_real" in logs
    plain = DMD2(UNet(**TINY_UNET), teacher=teacher, gan_g_weight=0)
    assert set(plain.networks) == {"student", "fake_score"} and isinstance(plain.networks["fake_score"], Denoiser)
    assert not plain.needs_data
    with pytest.raises(ValueError, match="a GAN term .* needs a discriminator"):
        DMD2(UNet(**TINY_UNET), teacher=teacher, discriminator="none")
    with pytest.raises(ValueError, match="dmd2: unknown discriminator 'nope'"):
        DMD2(UNet(**TINY_UNET), teacher=teacher, discriminator="nope")


def test_bad_adversarial_settings_exit_2_with_one_line(run_cli, tmp_path):
    image = ["--backbone", "unet", "--data", "gmm", "data.dim=64", "data.image_shape=[1,8,8]", "data.n=256",
             "backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.attn_resolutions=[]",
             "--out", tmp_path / "run"]
    cases = {  # settings: what the one line says
        ("--objective", "add", *image, "objective.discriminator=dino"):
            "no weights for vit_small_patch16_224.dino found offline",
        ("--objective", "add", "--backbone", "mlp", "--data", "gmm", "objective.discriminator=dino"):
            "takes images; the data are vectors",
        ("--objective", "ufogen", *image, "objective.discriminator=teacher_features"):
            "needs a trained denoiser teacher",
        ("--objective", "dmd2", *image, "objective.discriminator=none"): "needs a discriminator",
        ("--objective", "add", *image, "objective.disc_args={img_resolution: 16}"): "come(s) from the data",
    }
    empty_hub = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "FASTDIFF_DINO": ""}
    for args, message in cases.items():
        result = run_cli("runs.train", *args, env=empty_hub)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "run").exists()


# -- every adversarial objective end to end on MNIST-size images

SMALL_DINO = "objective.disc_args={weights: random, model: test_vit, img_size: 32, taps: [1, 3, 5]}"
LOGGED = {"add": ["student/adversarial", "student/distill"], "ufogen": ["student/adversarial",
                                                                       "student/reconstruction"],
          "dmd2": ["student/gan", "fake_score/loss"]}


@pytest.mark.parametrize("disc", ["teacher_features", "dino"])
@pytest.mark.parametrize("name", ["add", "ufogen", "dmd2"])
def test_mnist_end_to_end(tmp_path, monkeypatch, name, disc):
    """Four steps through runs.train on 64 MNIST digits (class-conditional with teacher_features) from a random-weight
    tiny U-Net teacher: every role's loss is logged, the discriminator's heads train while its frozen feature network
    (the teacher, or a random-weight ViT) does not, and the student samples in one step."""
    import runs.train
    from runs.build import build_objective
    from runs.train import make_config, parse_args, train
    conditional = disc == "teacher_features"
    extra = ["objective.discriminator=teacher_features", "train.conditional=true"] if conditional else \
        ["objective.discriminator=dino", SMALL_DINO]
    torch.manual_seed(1)
    teacher = tiny_teacher(10 if conditional else 0)
    built = {}

    def build(config, **injected):
        objective = build_objective(config, **injected)
        built.update((key, (p.requires_grad, p.detach().clone()))
                     for key, p in objective.networks["discriminator"].named_parameters())
        return objective

    monkeypatch.setattr(runs.train, "build_objective", build)
    unet = ["backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.attn_resolutions=[]",
            "backbone.mid_attention=false"]
    config, dataset = make_config(parse_args(["--backbone", "unet", "--objective", name, "--data", "mnist",
                                              "data.limit=64", *unet, *extra, "train.steps=4", "train.batch_size=8",
                                              "train.ckpt_every=4", "train.log_every=1", "train.device=cpu",
                                              "train.sample_every=0", "train.ckpt_minutes=0", "train.warmup_steps=0",
                                              "teacher.eval_n=0"]))
    objective, _ = train(config, tmp_path / "run", teacher=teacher, dataset=dataset)
    after = dict(objective.networks["discriminator"].named_parameters())
    frozen = {key for key, (trainable, _) in built.items() if not trainable}
    assert frozen and all(key.startswith("teacher." if conditional else "vit.") for key in frozen)
    assert all(torch.equal(built[key][1], after[key]) for key in frozen)
    assert any(not torch.equal(value, after[key]) for key, (trainable, value) in built.items() if trainable)
    with torch.no_grad():
        samples = objective.generate(torch.randn(2, 1, 28, 28), 1,
                                     {"class_labels": torch.tensor([3, 7])} if conditional else None)
    assert samples.shape == (2, 1, 28, 28) and torch.isfinite(samples).all()
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert all(key in log for key in ["discriminator/d_real", *LOGGED[name]]), log[-400:]


@pytest.mark.parametrize("name", ["dmd2", "add"])
def test_gan_roles_under_torchrun_with_two_processes(tmp_path, run_cli, name):
    """DDP with a discriminator role (add) and with dmd2's head inside the fake score, which is called twice in its
    phase (its DSM loss and the GAN loss) before one backward."""
    from runs.checkpoint import load_checkpoint
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "runs.train",
                     "--objective", name, "--backbone", "mlp", "--data", "gmm", "data.n=256", "backbone.hidden=16",
                     "backbone.num_blocks=1", "train.batch_size=32", "train.steps=6", "train.sample_every=0",
                     "teacher.eval_n=0", "--out", tmp_path / "ddp", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ddp")
    assert state["step"] == 6 and all(torch.isfinite(t).all() for net in state["networks"].values()
                                       for t in net.values())
