"""Analytic teachers: exact denoisers against Tweedie's formula, closed forms, brute force and dense references."""
import io
import time

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from data.mixtures import GaussianMixtureData, gaussian_mixture_params, sample_gaussian_mixture
from models.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from models.ppca import PPCAMixtureDenoiser

f64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Many small ops: with 2 intra-op threads on 2 busy cores, OpenMP waits dominate (10-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_gmm(K=3, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=f64)
    variances = 0.05 + torch.rand(K, D, generator=g, dtype=f64)
    weights = 0.2 + torch.rand(K, generator=g, dtype=f64)
    return means, variances, weights


def random_ppca(K=3, D=6, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(K, D, q, generator=g, dtype=f64)).Q
    noise_variances = 0.05 + 0.1 * torch.rand(K, generator=g, dtype=f64)
    eigenvalues = noise_variances[:, None] + 2 * torch.rand(K, q, generator=g, dtype=f64)
    means = torch.randn(K, D, generator=g, dtype=f64)
    weights = 0.2 + torch.rand(K, generator=g, dtype=f64)
    return dict(means=means, basis=basis, eigenvalues=eigenvalues, noise_variances=noise_variances, weights=weights)


def dense_covariances(p):
    U, lam, s2 = p["basis"], p["eigenvalues"], p["noise_variances"]
    D = U.shape[1]
    return U @ torch.diag_embed(lam - s2[:, None]) @ U.mT + s2[:, None, None] * torch.eye(D, dtype=f64)


def tweedie(log_prob, x, sigma):
    """x + sigma^2 grad log p_sigma(x), by autograd."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(x).sum(), x)
    return x.detach() + sigma[:, None] ** 2 * grad


SIGMAS = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 20.0], dtype=f64)


def test_gmm_denoiser_equals_tweedie():
    means, variances, weights = random_gmm()
    model = GaussianMixtureDenoiser(means, variances, weights)
    x = 1.5 * torch.randn(len(SIGMAS), 3, generator=torch.Generator().manual_seed(1), dtype=f64)

    def reference_log_prob(x):
        std = (variances[None] + SIGMAS[:, None, None] ** 2).sqrt()  # [B, K, D]
        mixture = MixtureSameFamily(Categorical(weights.expand(len(SIGMAS), -1)), Independent(Normal(means, std), 1))
        return mixture.log_prob(x)

    torch.testing.assert_close(model.log_prob(x, SIGMAS), reference_log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, SIGMAS), tweedie(reference_log_prob, x, SIGMAS), rtol=1e-9, atol=1e-10)
    assert model(x.float(), SIGMAS.float()).dtype == torch.float32


def test_gmm_single_component_and_conditional():
    means, variances, weights = random_gmm()
    x = torch.randn(len(SIGMAS), 3, generator=torch.Generator().manual_seed(2), dtype=f64)
    one = GaussianMixtureDenoiser(means[:1], variances[:1], weights[:1])
    linear = means[0] + variances[0] / (variances[0] + SIGMAS[:, None] ** 2) * (x - means[0])
    torch.testing.assert_close(one(x, SIGMAS), linear, rtol=1e-12, atol=1e-12)

    model = GaussianMixtureDenoiser(means, variances, weights)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = torch.stack([GaussianMixtureDenoiser(means[k:k + 1], variances[k:k + 1], weights[k:k + 1])(
        x[i:i + 1], SIGMAS[i:i + 1])[0] for i, k in enumerate(labels.tolist())])
    torch.testing.assert_close(model(x, SIGMAS, class_labels=labels), expected, rtol=1e-12, atol=1e-12)
    one_hot = torch.nn.functional.one_hot(labels, 3).to(f64)
    one_hot[0] = 0  # an all-zero row is unconditional
    mixed = model(x, SIGMAS, class_labels=one_hot)
    torch.testing.assert_close(mixed[1:], expected[1:])
    torch.testing.assert_close(mixed[:1], model(x[:1], SIGMAS[:1]))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, SIGMAS, class_labels=torch.full((6,), 3))


def test_exact_flow_solves_the_probability_flow_ode():
    means, variances, weights = random_gmm(K=1, D=4)
    model = GaussianMixtureDenoiser(means, variances, weights)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=f64)
    a = torch.tensor([0.05, 0.3, 1.0, 4.0, 40.0], dtype=f64)
    for sigma in [a, 0.7 * a]:
        x_sigma = model.exact_flow(x, a, sigma)
        h = 1e-5 * sigma
        derivative = (model.exact_flow(x, a, sigma + h) - model.exact_flow(x, a, sigma - h)) / (2 * h[:, None])
        ode = (x_sigma - model(x_sigma, sigma)) / sigma[:, None]
        torch.testing.assert_close(derivative, ode, rtol=1e-7, atol=1e-8)
    b, c = 0.5 * a, 0.01 * a
    torch.testing.assert_close(model.exact_flow(model.exact_flow(x, a, b), b, c), model.exact_flow(x, a, c))
    with pytest.raises(ValueError, match="K = 1"):
        GaussianMixtureDenoiser(*random_gmm(K=2)).exact_flow(x[:, :3], a, b)


def test_gmm_data_and_teacher_agree():
    data = GaussianMixtureData(dim=2, components=8, n=4000, seed=0)
    x, label = data[5]
    assert x.shape == (2,) and x.dtype == torch.float32 and label.dtype == torch.int64
    assert data.shape == (2,) and data.num_classes == 8 and len(data) == 4000
    torch.testing.assert_close(GaussianMixtureData(dim=2, components=8, n=4000, seed=0).x, data.x)
    teacher = GaussianMixtureDenoiser.from_data(data)
    for k in range(8):  # each component's samples sit around its mean with its variance
        members = data.x[data.labels == k].double()
        assert (members.mean(0) - teacher.means[k]).abs().max() < 0.02
        assert (members.var(0) / teacher.variances[k] - 1).abs().max() < 0.3
    assert abs(teacher.sigma_data / float(data.x.double().var(0).mean().sqrt()) - 1) < 0.02
    # a clean sample denoised at a small sigma stays put
    torch.testing.assert_close(teacher(data.x[:50], 1e-4), data.x[:50], atol=1e-4, rtol=0)
    for dim in (1, 2, 16):
        p = gaussian_mixture_params(dim=dim, components=6, seed=1)
        gaps = torch.cdist(p["means"], p["means"]).fill_diagonal_(float("inf")).min()
        assert gaps >= 8 * p["variances"].sqrt().max() - 1e-9
    with pytest.raises(ValueError, match="components"):
        gaussian_mixture_params(components=0)


def test_sample_gaussian_mixture_statistics():
    means, variances, weights = random_gmm(K=2, D=2)
    x, component = sample_gaussian_mixture(means, variances, weights, 20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and component.dtype == torch.int64
    assert abs(float((component == 0).double().mean()) - float(weights[0] / weights.sum())) < 0.02
    model = GaussianMixtureDenoiser(means, variances, weights)
    draws = model.sample(20000, torch.Generator().manual_seed(1))
    assert (draws.mean(0) - x.mean(0)).abs().max() < 0.05


def brute_force_empirical(data, x, sigma):
    d2 = ((x[:, None, :] - data[None]) ** 2).sum(-1)
    return (-d2 / (2 * sigma[:, None] ** 2)).softmax(1) @ data


def test_empirical_denoiser_brute_force_chunking_and_classes():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(7, 3, generator=g, dtype=f64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    x = torch.randn(len(SIGMAS), 3, generator=g, dtype=f64)
    model = EmpiricalDenoiser(data, labels)
    expected = brute_force_empirical(data, x, SIGMAS)
    torch.testing.assert_close(model(x, SIGMAS), expected, rtol=1e-10, atol=1e-12)
    model.chunk_size = 2
    torch.testing.assert_close(model(x, SIGMAS), expected, rtol=1e-10, atol=1e-12)
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    conditional = torch.stack([brute_force_empirical(data[labels == c], x[i:i + 1], SIGMAS[i:i + 1])[0]
                               for i, c in enumerate(cls.tolist())])
    torch.testing.assert_close(model(x, SIGMAS, class_labels=cls), conditional, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="without labels"):
        EmpiricalDenoiser(data)(x, SIGMAS, class_labels=cls)
    with pytest.raises(ValueError, match="shape"):
        model(x[:, :2], SIGMAS)


def test_empirical_denoiser_limits():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(50, 2, 3, 3, generator=g)
    model = EmpiricalDenoiser(data, chunk_size=16)
    x = data[:8] + 0.05 * torch.randn(8, 2, 3, 3, generator=g)
    nearest = ((x.flatten(1)[:, None] - data.flatten(1)[None]) ** 2).sum(-1).argmin(1)
    for tiny in (1e-6, 0.0):
        out = model(x, torch.full((8,), tiny))
        assert out.dtype == torch.float32 and not out.isnan().any()
        torch.testing.assert_close(out, data[nearest])
    torch.testing.assert_close(model(x, 1e7), data.mean(0).expand(8, -1, -1, -1), atol=1e-5, rtol=0)
    expected_sigma_data = float(data.double().flatten(1).var(0, unbiased=False).mean().sqrt())
    assert model.sigma_data == pytest.approx(expected_sigma_data) and model.shape == (2, 3, 3)


def test_ppca_woodbury_equals_dense_reference_and_tweedie():
    p = random_ppca()
    model = PPCAMixtureDenoiser(**p)
    x = torch.randn(len(SIGMAS), 6, generator=torch.Generator().manual_seed(6), dtype=f64)
    C = dense_covariances(p)
    noisy_C = C[None] + SIGMAS[:, None, None, None] ** 2 * torch.eye(6, dtype=f64)  # [B, K, D, D]
    components = MultivariateNormal(p["means"].expand(len(SIGMAS), -1, -1), covariance_matrix=noisy_C)
    mixture = MixtureSameFamily(Categorical(p["weights"].expand(len(SIGMAS), -1)), components)
    torch.testing.assert_close(model.log_prob(x, SIGMAS), mixture.log_prob(x), rtol=1e-10, atol=1e-10)
    r = components.log_prob(x[:, None, :]).add(p["weights"].log()).softmax(-1)
    diff = (x[:, None, :] - p["means"])[..., None]
    x0_k = p["means"] + (C @ torch.linalg.solve(noisy_C, diff))[..., 0]
    torch.testing.assert_close(model(x, SIGMAS), (r[..., None] * x0_k).sum(1), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model(x, SIGMAS), tweedie(lambda y: model.log_prob(y, SIGMAS), x, SIGMAS),
                               rtol=1e-9, atol=1e-10)
    W = model.factor_loadings
    torch.testing.assert_close(W @ W.mT + p["noise_variances"][:, None, None] * torch.eye(6, dtype=f64), C)


def test_ppca_fit_recovers_low_rank_gaussian():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(8, 2, generator=g, dtype=f64)
    true_C = W @ W.T + 0.01 * torch.eye(8, dtype=f64)
    x = 0.3 + torch.randn(40000, 8, generator=g, dtype=f64) @ torch.linalg.cholesky(true_C).T
    model = PPCAMixtureDenoiser.fit(x, components=1, rank=2)
    fitted_C = dense_covariances(dict(model.named_buffers()))[0]
    assert torch.linalg.matrix_norm(fitted_C - true_C) / torch.linalg.matrix_norm(true_C) < 0.03
    assert abs(float(model.noise_variances[0]) / 0.01 - 1) < 0.05
    # rank D - 1: the PPCA covariance is exactly the (biased) sample covariance
    y = torch.randn(300, 5, generator=g, dtype=f64) @ torch.randn(5, 5, generator=g, dtype=f64)
    full = PPCAMixtureDenoiser.fit(y, components=1, rank=4)
    torch.testing.assert_close(dense_covariances(dict(full.named_buffers()))[0], torch.cov(y.T, correction=0))
    torch.testing.assert_close(full.means[0], y.mean(0))


def test_ppca_fit_on_images_speed_conditioning_and_state_dict():
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(500) % 5
    images = (0.3 * torch.randn(500, 1, 8, 8, generator=g) + labels[:, None, None, None] / 5 - 0.4).clamp(-1, 1)
    PPCAMixtureDenoiser.fit(images[:50], components=1, rank=4)  # warm up the linear algebra backend
    start = time.perf_counter()
    model = PPCAMixtureDenoiser.fit(images, components=2, rank=4, labels=labels, iters=3)
    assert time.perf_counter() - start < 2.0
    assert model.shape == (1, 8, 8) and model.means.shape == (10, 1, 8, 8) and model.num_classes == 5
    assert model.component_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert abs(float(model.weights.sum()) - 1) < 1e-12
    x = torch.randn(4, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 0.5, 1.0, 5.0])
    buffers = dict(model.named_buffers())
    keep = buffers["component_labels"] == 3
    class_three = PPCAMixtureDenoiser(**{k: v[keep] for k, v in buffers.items()})
    torch.testing.assert_close(model(x, sigma, class_labels=torch.full((4,), 3)), class_three(x, sigma))
    blob = io.BytesIO()
    torch.save(model.state_dict(), blob)
    blob.seek(0)
    restored = PPCAMixtureDenoiser(**torch.load(blob, weights_only=True))
    torch.testing.assert_close(restored(x, sigma), model(x, sigma), rtol=0, atol=0)
    draws = model.sample(2000, torch.Generator().manual_seed(0), class_labels=torch.full((2000,), 4))
    assert draws.shape == (2000, 1, 8, 8)
    assert abs(float(draws.mean()) - float(images[labels == 4].mean())) < 0.05
    with pytest.raises(ValueError, match="rank"):
        PPCAMixtureDenoiser.fit(images, components=1, rank=64)


def test_ppca_mixture_fit_separates_clusters():
    g = torch.Generator().manual_seed(9)
    centres = 4 * torch.randn(3, 10, generator=g, dtype=f64)
    x = centres.repeat_interleave(200, 0) + 0.3 * torch.randn(600, 10, generator=g, dtype=f64)
    model = PPCAMixtureDenoiser.fit(x, components=3, rank=2, iters=2)
    assert torch.cdist(centres, model.means).amin(1).max() < 0.1
    torch.testing.assert_close(model.weights, torch.full((3,), 1 / 3, dtype=f64), atol=1e-6, rtol=0)
    # the unconditional teacher's class_labels select a component, as for the Gaussian mixture
    assert model.num_classes == 3
    out = model(x[:6], torch.full((6,), 0.2), class_labels=torch.zeros(6, dtype=torch.int64))
    assert torch.cdist(out, model.means[:1]).max() < torch.cdist(out, model.means[1:]).min()
