"""The Denoiser wrapper against closed forms: every parameterisation is D = c_skip x + c_out F(c_in x)."""
import math

import pytest
import torch

from models.denoiser import PARAMETERISATIONS, Denoiser, preconditioning
from models.noise import flow_alpha, flow_sigma, flow_t, vp_alpha, vp_sigma, vp_t


class Probe(torch.nn.Module):
    """A backbone that returns a chosen tensor and records its inputs."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, noise_labels, class_labels=None):
        self.x_in, self.noise_labels = x, noise_labels
        return self.output


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5
    n = torch.randn(4, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    return x0, n, sigma


def target(parameterisation, x0, n, sigma, sigma_data):
    """What the network must output for D to return x0 exactly, from each paper's own definition."""
    s = sigma[:, None]
    if parameterisation == "edm":  # EDM Eq. 8: F_target = (x0 - c_skip x) / c_out
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
        return (x0 - c_skip * (x0 + s * n)) / c_out
    if parameterisation == "eps":
        return n
    if parameterisation == "v":  # v = alpha eps - sigma_vp x0 in the VP process
        alpha = 1 / (1 + s**2).sqrt()
        return alpha * n - s * alpha * x0
    if parameterisation == "x0":
        return x0
    return n - x0  # flow velocity


@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_each_parameterisation_recovers_x0_from_its_own_target(parameterisation):
    x0, n, sigma = data()
    probe = Probe(target(parameterisation, x0, n, sigma, 0.5))
    D = Denoiser(probe, parameterisation, sigma_data=0.5)
    x0_hat = D(x0 + sigma[:, None] * n, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(probe.noise_labels, (sigma.log() / 4).float())


def test_backbone_inputs_are_the_process_scaled_states():
    x0, n, sigma = data()
    x = x0 + sigma[:, None] * n
    for parameterisation, scale in [("eps", vp_alpha(sigma)), ("v", vp_alpha(sigma)), ("flow", flow_alpha(sigma)),
                                    ("edm", 1 / (sigma**2 + 0.25).sqrt())]:
        probe = Probe(torch.zeros_like(x))
        Denoiser(probe, parameterisation)(x, sigma)
        torch.testing.assert_close(probe.x_in, (scale[:, None] * x).float())


def test_flow_process_conversion_matches_rectified_flow():
    """x_t = (1 - t) x0 + t n is the VE state x0 + sigma n scaled by 1 - t, with sigma = t / (1 - t)."""
    x0, n, _ = data()
    t = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    sigma = flow_sigma(t)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * n
    torch.testing.assert_close(x_t / flow_alpha(sigma)[:, None], x0 + sigma[:, None] * n)
    torch.testing.assert_close(flow_t(sigma), t)


def test_vp_conversion_round_trips_and_matches_edm_table_1():
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp_t(vp_sigma(t)), t)
    assert math.isclose(float(vp_sigma(1.0)), 152.17, rel_tol=1e-4)


def test_edm_coefficients_and_unknown_parameterisation():
    sigma = torch.tensor([0.5], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = preconditioning("edm", sigma, 0.5)
    assert math.isclose(float(c_skip), 0.5) and math.isclose(float(c_out), 0.5 / math.sqrt(2))
    assert math.isclose(float(c_in), 1 / math.sqrt(0.5)) and math.isclose(float(c_noise), math.log(0.5) / 4)
    with pytest.raises(ValueError, match="known: edm, eps, v, x0, flow"):
        Denoiser(Probe(None), "score")


def test_sigma_may_be_a_float_or_a_batch_and_dtype_follows_x():
    probe = Probe(torch.zeros(2, 3))
    D = Denoiser(probe)
    x = torch.randn(2, 3)
    assert D(x, 1.0).dtype == torch.float32
    assert D(x.double(), torch.tensor([1.0, 2.0])).dtype == torch.float64
