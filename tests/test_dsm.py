"""Denoising score matching: each variant's loss is its paper's target MSE, the sigma samplers follow their laws,
and a few hundred steps of training on a Gaussian approach the exact denoiser."""

import pytest
import torch

from models.analytic import GaussianMixtureDenoiser
from models.mlp import MLP
from models.noise import flow_t, vp_t
from objectives.dsm import DSM
from tests.test_denoiser import Probe, target


def objective(parameterisation, **kwargs):
    return DSM(Probe(None), parameterisation=parameterisation, **kwargs)


@pytest.mark.parametrize("parameterisation", ["edm", "eps", "v", "x0", "flow"])
def test_target_weighting_is_the_mse_on_each_papers_target(parameterisation):
    """loss = mean ||F - F_target||^2 where F_target is eps, v, x0, the flow velocity or EDM's F target."""
    dsm = objective(parameterisation)
    x0 = torch.randn(6, 3, dtype=torch.float64) * 0.5
    F_pred = torch.randn(6, 3, dtype=torch.float64)
    dsm.networks["denoiser"].backbone.output = F_pred
    torch.manual_seed(0)
    loss, _ = dsm.loss("denoiser", (x0, torch.zeros(6, dtype=torch.long)), step=0)
    torch.manual_seed(0)  # replay the same sigma and noise draws
    sigma = dsm.sample_sigma(6, "cpu")
    noise = torch.randn_like(x0)
    expected = (F_pred - target(parameterisation, x0, noise, sigma.double(), 0.5)).square().mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_edm_weighting_and_uniform_weighting():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    edm = objective("eps", weighting="edm").weight(sigma)
    torch.testing.assert_close(edm, (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    assert torch.equal(objective("eps", weighting="uniform").weight(sigma), torch.ones(3))


def test_sigma_samplers_follow_their_laws():
    torch.manual_seed(0)
    log_sigma = objective("edm").sample_sigma(200_000, "cpu").log()
    assert abs(log_sigma.mean() + 1.2) < 0.01 and abs(log_sigma.std() - 1.2) < 0.01
    t = vp_t(objective("eps", sigma_sampler="vp").sample_sigma(200_000, "cpu").double())
    assert abs(t.mean() - 0.5) < 0.01 and t.min() > 0 and t.max() <= 1 + 1e-6
    t = flow_t(objective("flow", sigma_sampler="flow").sample_sigma(200_000, "cpu"))
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.002
    with pytest.raises(ValueError, match="known: flow, lognormal, vp"):
        objective("edm", sigma_sampler="cosine")


@pytest.mark.parametrize("parameterisation, sampler", [("edm", "lognormal"), ("eps", "vp"), ("v", "vp"),
                                                       ("x0", "lognormal"), ("flow", "flow")])
def test_training_approaches_the_exact_denoiser(parameterisation, sampler):
    """On a 2-D Gaussian the optimum of every variant is the same exact D; a small MLP gets close in 400 steps."""
    torch.manual_seed(0)
    teacher = GaussianMixtureDenoiser(torch.tensor([[0.3, -0.2]]), torch.tensor([[0.25, 0.04]]), torch.ones(1))
    dsm = DSM(MLP(dim=2, hidden=64, num_blocks=2), parameterisation=parameterisation, sigma_sampler=sampler)
    net = dsm.networks["denoiser"]
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(400):
        loss, _ = dsm.loss("denoiser", (teacher.sample(256).float(), None), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sigma = torch.tensor([0.2, 0.5, 1.0])
    x = teacher.sample(3000).float()
    errors = []
    for s in sigma:
        noisy = x + s * torch.randn_like(x)
        with torch.no_grad():
            err = (net(noisy, s.expand(len(x))) - teacher(noisy, s.expand(len(x)))).square().mean()
        # compare to the error of the trivial guess D = x (the scale of the problem at this sigma)
        errors.append(float(err / (noisy - teacher(noisy, s.expand(len(x)))).square().mean()))
    assert max(errors) < 0.1, errors
