"""Classifier-free guidance (solvers/guidance.py; Ho & Salimans 2022) in EDM2's convention, D_u + w (D_c - D_u):
the closed form on an analytic class-conditional mixture, one batched call of 2B per guided evaluation (B outside
the guidance interval of Kynkaanniemi et al. 2024), every solver at unchanged NFE, w = 1 equal to the conditional
sampler bit for bit, label dropout and the null label in the backbones, and runs.sample's --guidance / --class."""
import inspect
import math

import numpy as np
import pytest
import torch

from models.analytic import GaussianMixtureDenoiser
from models.mlp import MLP
from models.unet import UNet
from runs import sample as runs_sample
from runs import train as runs_train
from solvers import SOLVERS, CountingDenoiser, heun_step, options_for_nfe, sigmas_for_nfe
from solvers.guidance import GuidedDenoiser, guided

K, B = 3, 4
LO, HI = 0.3, 5.0  # a guidance interval inside the karras range (0.002, 80]


def mixture():
    """Three 2-D Gaussians, one per class, with unequal weights and variances."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    variances = torch.tensor([[0.3, 0.2], [0.1, 0.4], [0.25, 0.25]], dtype=torch.float64)
    return GaussianMixtureDenoiser(means, variances, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def closed_form(mix, x, sigma, labels, w):
    """D_u + w (D_c - D_u) written out: D_k = mu_k + v_k / (v_k + s^2) (x - mu_k) is class k's exact denoiser and
    D_u = sum_k r_k D_k with r_k proportional to w_k N(x; mu_k, v_k + s^2)."""
    s2 = sigma[:, None, None] ** 2
    mu, v = mix.means[None], mix.variances[None]
    d_k = mu + v / (v + s2) * (x[:, None] - mu)  # [B, K, D]
    log_r = mix.weights.log() - 0.5 * ((x[:, None] - mu) ** 2 / (v + s2) + (2 * math.pi * (v + s2)).log()).sum(-1)
    d_u = (log_r.softmax(-1)[..., None] * d_k).sum(1)
    d_c = d_k[torch.arange(len(x)), labels]
    return d_u + w * (d_c - d_u), d_c, d_u


class Recorder:
    """A denoiser that records each call's batch size, first sigma and labels."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, sigma, class_labels=None):
        labels = None if class_labels is None else class_labels.clone()
        self.calls.append((x.shape[0], float(sigma.reshape(-1)[0]), labels))
        return self.denoiser(x, sigma, class_labels=class_labels)


def draws(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, generator=g, dtype=torch.float64), torch.randint(0, K, (batch,), generator=g)


# ----------------------------------------------------------------------------------- the guided evaluation

@pytest.mark.parametrize("w", [0.0, 0.5, 2.5, 7.0])
def test_guided_denoiser_is_the_closed_form_per_sample(w):
    mix = mixture()
    x, labels = draws()
    sigma = torch.full((B,), 0.8, dtype=torch.float64)
    expected = closed_form(mix, x, sigma, labels, w)[0]
    torch.testing.assert_close(guided(mix, w)(x, sigma, class_labels=labels), expected, rtol=1e-10, atol=1e-10)
    onehot = torch.nn.functional.one_hot(labels, K).double()  # one-hot labels work the same
    torch.testing.assert_close(guided(mix, w)(x, sigma, class_labels=onehot), expected, rtol=1e-10, atol=1e-10)


def test_one_call_of_batch_2B_with_the_null_label_as_zero_rows():
    rec = Recorder(mixture())
    x, labels = draws()
    guided(rec, 2.0, label_dim=K)(x, torch.full((B,), 1.0, dtype=torch.float64), class_labels=labels)
    assert len(rec.calls) == 1
    batch, _, sent = rec.calls[0]
    assert batch == 2 * B and sent.shape == (2 * B, K)
    assert torch.equal(sent[:B], torch.nn.functional.one_hot(labels, K).float())
    assert torch.equal(sent[B:], torch.zeros(B, K))  # the null label: all-zero rows


def test_w_one_and_no_labels_make_one_call_of_batch_B():
    mix = mixture()
    rec = Recorder(mix)
    x, labels = draws()
    sigma = torch.full((B,), 1.0, dtype=torch.float64)
    out = guided(rec, 1.0, label_dim=K)(x, sigma, class_labels=labels)
    assert torch.equal(out, mix(x, sigma, class_labels=labels)) and [c[0] for c in rec.calls] == [B]
    out = guided(rec, 3.0, label_dim=K)(x, sigma)  # no condition: D_c = D_u, the plain unconditional call
    assert torch.equal(out, mix(x, sigma)) and [c[0] for c in rec.calls] == [B, B]


@pytest.mark.parametrize("level, guided_call", [(0.1, False), (LO, False), (0.30001, True), (2.0, True),
                                                (HI, True), (5.00001, False), (80.0, False)])
def test_interval_is_half_open_and_outside_it_only_the_conditional_pass_runs(level, guided_call):
    mix = mixture()
    rec = Recorder(mix)
    x, labels = draws()
    sigma = torch.full((B,), level, dtype=torch.float64)
    out = guided(rec, 3.0, interval=(LO, HI), label_dim=K)(x, sigma, class_labels=labels)
    assert [c[0] for c in rec.calls] == [2 * B if guided_call else B]
    guided_value, d_c, _ = closed_form(mix, x, sigma, labels, 3.0)
    torch.testing.assert_close(out, guided_value if guided_call else d_c, rtol=1e-10, atol=1e-10)


def test_per_sample_sigmas_and_the_device_path_blend_with_torch_where(monkeypatch):
    """Levels that straddle the interval (objectives' one-step updates), or a sigma on an accelerator that the host
    must not read: one 2B call, and per sample the guided or the conditional value."""
    mix = mixture()
    x, labels = draws(batch=6)
    sigma = torch.tensor([0.1, 0.6, 3.0, 5.0, 7.0, 80.0], dtype=torch.float64)
    inside = torch.tensor([False, True, True, True, False, False])
    guided_value, d_c, _ = closed_form(mix, x, sigma, labels, 2.0)
    expected = torch.where(inside[:, None], guided_value, d_c)
    rec = Recorder(mix)
    torch.testing.assert_close(guided(rec, 2.0, (LO, HI), K)(x, sigma, labels), expected, rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(GuidedDenoiser, "host_readable", staticmethod(lambda sigma: False))
    for level in (2.0, 80.0):  # the same level for the whole batch: still no host read, so 2B and where
        level_batch = torch.full((6,), level, dtype=torch.float64)
        out = guided(rec, 2.0, (LO, HI), K)(x, level_batch, labels)
        ref_guided, ref_c, _ = closed_form(mix, x, level_batch, labels, 2.0)
        torch.testing.assert_close(out, ref_guided if LO < level <= HI else ref_c, rtol=1e-10, atol=1e-10)
    assert [c[0] for c in rec.calls] == [12, 12, 12]


def test_one_step_updates_take_the_guided_denoiser_with_per_sample_levels():
    mix = mixture()
    x, labels = draws(batch=4)
    sigma = torch.tensor([0.4, 1.0, 4.0, 20.0], dtype=torch.float64)
    sigma_next = torch.tensor([0.2, 0.45, 2.0, 0.0], dtype=torch.float64)

    def reference(x, s, class_labels=None):
        value, d_c, _ = closed_form(mix, x, s, class_labels, 1.5)
        return torch.where(((s > LO) & (s <= HI))[:, None], value, d_c)

    out = heun_step(guided(mix, 1.5, (LO, HI)), x, sigma, sigma_next, cond={"class_labels": labels})
    expected = heun_step(reference, x, sigma, sigma_next, cond={"class_labels": labels})
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_label_dim_comes_from_the_denoiser_and_bad_arguments_are_refused():
    assert guided(mixture(), 2.0).label_dim == K
    from models.denoiser import Denoiser
    assert guided(Denoiser(MLP(label_dim=5, hidden=8)), 2.0).label_dim == 5
    with pytest.raises(ValueError, match="class-conditional"):
        guided(Denoiser(MLP(hidden=8)), 2.0)
    for scale in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="guidance scale"):
            guided(mixture(), scale)
    for interval in ((2.0, 1.0), (-1.0, 1.0), (1.0,), "ab"):
        with pytest.raises(ValueError, match="interval"):
            guided(mixture(), 2.0, interval)
    x, labels = draws()
    with pytest.raises(ValueError, match="label_dim"):
        guided(Recorder(mixture()), 2.0)(x, torch.ones(B, dtype=torch.float64), labels)


# ----------------------------------------------------------------------------------- every solver

def solve(name, denoiser, x, labels, nfe, sigmas):
    options = options_for_nfe(name, nfe)
    if "generator" in inspect.signature(SOLVERS[name]).parameters:
        options["generator"] = torch.Generator().manual_seed(7)
    counted = CountingDenoiser(denoiser)
    if isinstance(denoiser, GuidedDenoiser):
        denoiser.plan(SOLVERS[name], sigmas, like=x, **options)
    out = SOLVERS[name](counted, x, sigmas, cond={"class_labels": labels}, **options)
    return out, counted.nfe


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_samples_guided_at_the_same_nfe(name):
    nfe = 6
    mix = mixture()
    sigmas = sigmas_for_nfe(name, nfe)
    z, labels = draws(seed=1)
    x = sigmas[0] * z
    plain, plain_nfe = solve(name, mix, x, labels, nfe, sigmas)
    assert plain_nfe == nfe
    # w = 1 is the conditional sampler, bit for bit, at the same cost
    same, same_nfe = solve(name, guided(mix, 1.0), x, labels, nfe, sigmas)
    assert torch.equal(same, plain) and same_nfe == nfe
    # guided everywhere: every evaluation is one call of 2B, counted once
    rec = Recorder(mix)
    out, out_nfe = solve(name, guided(rec, 3.0, label_dim=K), x, labels, nfe, sigmas)
    assert out_nfe == nfe and [c[0] for c in rec.calls] == [2 * B] * nfe
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    # with the interval (planned before sampling): 2B inside, B outside, still nfe guided evaluations
    rec = Recorder(mix)
    out, out_nfe = solve(name, guided(rec, 3.0, (LO, HI), K), x, labels, nfe, sigmas)
    assert out_nfe == nfe and len(rec.calls) == nfe
    assert [c[0] for c in rec.calls] == [2 * B if LO < level <= HI else B for _, level, _ in rec.calls]
    assert {c[0] for c in rec.calls} == {B, 2 * B}
    # the unplanned host path decides the same way, so the sample is the same
    unplanned = GuidedDenoiser(mix, 3.0, (LO, HI))
    options = options_for_nfe(name, nfe)
    if "generator" in inspect.signature(SOLVERS[name]).parameters:
        options["generator"] = torch.Generator().manual_seed(7)
    assert torch.equal(SOLVERS[name](unplanned, x, sigmas, cond={"class_labels": labels}, **options), out)


def test_a_plan_serves_one_solver_call_and_must_match_it():
    mix = mixture()
    z, labels = draws()
    sigmas = sigmas_for_nfe("euler", 5)
    g = guided(mix, 2.0, (LO, HI)).plan("euler", sigmas, like=z)  # a name or a sampler function
    SOLVERS["euler"](g, sigmas[0] * z, sigmas, cond={"class_labels": labels})
    with pytest.raises(ValueError, match="plan"):
        SOLVERS["euler"](g, sigmas[0] * z, sigmas, cond={"class_labels": labels})
    other = sigmas_for_nfe("euler", 5, sigma_max=4.0)  # different levels: the decisions no longer match
    g.plan(SOLVERS["euler"], other, like=z)
    with pytest.raises(ValueError, match="plan"):
        SOLVERS["euler"](g, sigmas[0] * z, sigmas, cond={"class_labels": labels})


def test_plan_leaves_the_samplers_generator_alone():
    mix = mixture()
    z, labels = draws()
    sigmas = sigmas_for_nfe("euler_ancestral", 5)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    guided(mix, 2.0, (LO, HI)).plan(SOLVERS["euler_ancestral"], sigmas, like=z, generator=generator)
    assert torch.equal(generator.get_state(), state)


# ----------------------------------------------------------------------------------- backbones: null label, dropout

def test_mlp_null_label_is_the_zero_row_and_label_dropout_trains_it():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, num_blocks=1, label_dim=K, label_dropout=1.0)
    torch.nn.init.normal_(net.out.weight)  # the output layer starts at zero
    x, labels, noise = torch.randn(5, 2), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5)
    net.eval()
    null = net(x, noise)
    assert torch.equal(net(x, noise, torch.zeros(5, K)), null)
    assert not torch.allclose(net(x, noise, labels), null)
    net.train()  # p = 1: every label replaced by the null label, in training only
    assert torch.equal(net(x, noise, labels), null)
    net.label_dropout = 0.5
    torch.manual_seed(1)
    out = net(x, noise, labels)
    net.eval()
    cond = net(x, noise, labels)
    dropped = [torch.allclose(o, n, atol=1e-6) for o, n in zip(out, null)]
    kept = [torch.allclose(o, c, atol=1e-6) for o, c in zip(out, cond)]
    assert all(d != k for d, k in zip(dropped, kept)) and any(dropped) and any(kept)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_dropout"):
            MLP(label_dim=K, label_dropout=bad)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, noise, torch.zeros(5, K + 1))


def test_unet_null_label_is_the_zero_row():
    torch.manual_seed(0)
    net = UNet(label_dim=K, model_channels=8, channel_mult=(1, 2), attn_resolutions=(14,)).eval()
    x, noise = torch.randn(2, 1, 28, 28), torch.randn(2)
    assert torch.equal(net(x, noise, torch.zeros(2, K)), net(x, noise))


# ----------------------------------------------------------------------------------- runs.sample

TINY = ["backbone.model_channels=8", "backbone.channel_mult=[1,2]", "backbone.num_blocks=1",
        "backbone.attn_resolutions=[14]", "data.limit=64", "train.steps=2", "train.batch_size=16",
        "train.sample_every=0", "train.warmup_steps=0", "train.lr=0.01"]  # no warm-up: labels matter after 2 steps
GMM = ["--backbone", "mlp", "--data", "gmm", "data.n=128", "backbone.hidden=16", "train.steps=2",
       "train.batch_size=16", "train.device=cpu", "train.sample_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The MNIST teacher preset (conditional, 10% label dropout) shrunk to 2 steps; an unconditional gmm teacher; a
    conditional consistency-training student (it samples with its own generator)."""
    root = tmp_path_factory.mktemp("guidance")
    runs_train.main(["--config", "runs/configs/mnist_teacher.yaml", "--out", str(root / "mnist"), *TINY])
    runs_train.main(["--objective", "dsm", *GMM, "--out", str(root / "uncond")])
    runs_train.main(["--objective", "ct", *GMM, "train.conditional=true", "--out", str(root / "ct")])
    return root


def sample_cli(argv, capsys):
    runs_sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_sample_with_guidance_and_a_class_writes_guided_samples(runs, tmp_path, capsys):
    common = [runs / "mnist", "--solver", "heun", "--nfe", "5", "--n", "4"]
    out = sample_cli([*common, "--guidance", "2", "--class", "3", "--out", tmp_path / "g.npz"], capsys)
    assert "NFE 5 measured, guidance 2" in out  # one guided (batched) evaluation is one NFE
    sample_cli([*common, "--class", "3", "--out", tmp_path / "c.npz"], capsys)
    sample_cli([*common, "--guidance", "1", "--class", "3", "--out", tmp_path / "one.npz"], capsys)
    out = sample_cli([*common, "--guidance", "2", "--class", "3", "--guidance-interval", "0.5", "5",
                      "--out", tmp_path / "i.npz"], capsys)
    assert "NFE 5 measured, guidance 2 for sigma in (0.5, 5]" in out
    g, c, one, i = (np.load(tmp_path / f"{name}.npz") for name in ("g", "c", "one", "i"))
    assert g["images"].shape == (4, 1, 28, 28) and (g["labels"] == 3).all() and (c["labels"] == 3).all()
    assert not np.array_equal(g["images"], c["images"])  # guidance changes the samples
    assert np.array_equal(one["images"], c["images"])  # w = 1 is the conditional sampler
    assert not np.array_equal(i["images"], g["images"]) and not np.array_equal(i["images"], c["images"])


@pytest.mark.parametrize("run, args, message", [
    ("mnist", ["--guidance", "-1"], "not a finite number >= 0"),
    ("mnist", ["--guidance", "two"], "not a number >= 0"),
    ("mnist", ["--guidance", "nan"], "not a finite number >= 0"),
    ("mnist", ["--class", "10"], "--class 10 is not a class of this run's data (0 to 9)"),
    ("mnist", ["--class", "-1"], "--class -1 is not a class"),
    ("mnist", ["--guidance-interval", "0.5", "5"], "--guidance-interval needs --guidance"),
    ("mnist", ["--guidance", "2", "--guidance-interval", "5", "0.5"], "sigma_lo < sigma_hi"),
    ("uncond", ["--guidance", "2"], "--guidance needs a class-conditional run"),
    ("uncond", ["--class", "0"], "--class needs a class-conditional run"),
    ("ct", ["--guidance", "2"], "samples with its own generator (no denoiser to guide)"),
])
def test_sample_guidance_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, run, args, message):
    with pytest.raises(SystemExit) as exit_info:
        runs_sample.main([str(runs / run), "--nfe", "2", "--n", "2", "--out", str(tmp_path / "s.npz"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
