"""The solver contract (DESIGN.md), checked for EVERY sampler in the registry, so a newly registered solver is covered
the moment it is added: exact NFE budgets, trajectory and callback, dtype, cond and sigma batch, and clear errors."""
import inspect

import pytest
import torch

from solvers import SOLVERS, CountingDenoiser, karras, options_for_nfe, sigmas_for_nfe
from tests.gaussian import gaussian_denoiser, problem


def run(name, denoiser, x, sigmas, seed=0, **kwargs):
    """Call a registered sampler; stochastic ones get a seeded generator."""
    sample = SOLVERS[name]
    if "generator" in inspect.signature(sample).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return sample(denoiser, x, sigmas, **kwargs)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("nfe", range(1, 13))
def test_nfe_budget_is_met_exactly(name, nfe):
    mu, z = problem(batch=2, dim=3)
    counter = CountingDenoiser(gaussian_denoiser(mu))
    sigmas = sigmas_for_nfe(name, nfe)
    x0 = run(name, counter, sigmas[0] * z, sigmas, **options_for_nfe(name, nfe))
    assert counter.nfe == nfe
    assert torch.isfinite(x0).all()


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_trajectory_and_callback(name):
    mu, z = problem(batch=3, dim=4)
    denoiser = gaussian_denoiser(mu.reshape(2, 2))
    sigmas = karras(6)
    x = sigmas[0] * z.reshape(3, 2, 2)
    infos = []
    x0, trajectory = run(name, denoiser, x, sigmas, callback=infos.append, return_trajectory=True)
    assert trajectory.shape == (7, 3, 2, 2) and trajectory.dtype == torch.float64
    assert torch.equal(trajectory[0], x) and torch.equal(trajectory[-1], x0)
    assert [info["i"] for info in infos] == list(range(6))
    assert [info["sigma"] for info in infos] == sigmas[:-1].tolist()
    assert [info["sigma_next"] for info in infos] == sigmas[1:].tolist()
    assert all(torch.equal(info["x"], trajectory[info["i"]]) and info["x0_hat"].shape == x.shape for info in infos)
    assert torch.equal(run(name, denoiser, x, sigmas), x0)  # same seed, with or without the extras


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_keeps_dtype_and_denoiser_sees_cond_and_a_sigma_batch(name, dtype):
    mu, z = problem(batch=3, dim=2)
    seen = []

    def denoiser(x, sigma, class_labels=None):
        seen.append((tuple(sigma.shape), class_labels))
        return gaussian_denoiser(mu)(x, sigma).float()  # deliberately float32

    labels = torch.tensor([0, 1, 2])
    sigmas = karras(5)
    x0, trajectory = run(name, denoiser, (sigmas[0] * z).to(dtype), sigmas, cond={"class_labels": labels},
                         return_trajectory=True)
    assert x0.dtype == dtype and trajectory.dtype == dtype
    assert seen and all(shape == (3,) and labels_seen is labels for shape, labels_seen in seen)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bad, problem_text", [
    ([0.0, 1.0, 2.0], "decreasing"), ([3.0, 2.0, 1.0], "end in 0"), ([3.0, float("nan"), 0.0], "finite")])
def test_bad_schedules_are_value_errors(name, bad, problem_text):
    mu, z = problem()
    with pytest.raises(ValueError, match=problem_text):
        run(name, gaussian_denoiser(mu), z, torch.tensor(bad, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_bad_denoisers_are_value_errors(name):
    mu, z = problem()
    sigmas = karras(4)
    with pytest.raises(ValueError, match="shape"):
        run(name, lambda x, s: x[:, :1], sigmas[0] * z, sigmas)
    with pytest.raises(ValueError, match="non-finite"):
        run(name, lambda x, s: x * float("nan"), sigmas[0] * z, sigmas)
    with pytest.raises(ValueError, match="nfe"):
        sigmas_for_nfe(name, 0)
