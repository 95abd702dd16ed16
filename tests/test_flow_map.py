"""Two-time students (models/flow_map.py) and flow-map sampling (solvers/flow_map.py)."""
import pytest
import torch
from torch import nn

from models import BACKBONES
from models.denoiser import Denoiser
from models.flow_map import FlowMap
from models.noise import flow_t
from objectives.base import flow_map_student
from solvers import (CountingDenoiser, euler_step, flow_map_levels, karras, sample_consistency, sample_flow_map)
from tests.gaussian import V, exact_flow, problem

torch.set_num_threads(1)

IMAGE = dict(img_resolution=8, in_channels=1)
BACKBONE_ARGS = {
    "unet": dict(IMAGE, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,)),
    "dit": dict(IMAGE, depth=1, hidden_size=32, num_heads=2, patch_size=2),
    "mlp": dict(dim=6, hidden=32, num_blocks=2, emb_channels=16),
}
SHAPES = {"unet": (3, 1, 8, 8), "dit": (3, 1, 8, 8), "mlp": (3, 6)}


def trained_like(name, seed):
    """A backbone whose weights are all visibly non-zero (a stand-in for a trained teacher's)."""
    torch.manual_seed(seed)
    net = BACKBONES[name](**BACKBONE_ARGS[name])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("name", list(BACKBONE_ARGS))
def test_teacher_initialised_flow_map_is_the_teachers_euler_step(name):
    teacher = Denoiser(trained_like(name, 0)).eval()
    torch.manual_seed(1)
    student, initialised = flow_map_student(BACKBONES[name](**BACKBONE_ARGS[name]), teacher)
    student.eval()
    assert initialised and student.backbone.two_time
    x = 3 * torch.randn(SHAPES[name])
    sigma, sigma_to = torch.tensor([5.0, 1.0, 0.3]), torch.tensor([1.0, 0.0, 0.3])
    expected = euler_step(teacher, x, sigma, sigma_to)[0]
    torch.testing.assert_close(student(x, sigma, sigma_to), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student(x, sigma, sigma), x)                      # G(x, t, t) = x
    torch.testing.assert_close(student.denoise(x, sigma), teacher(x, sigma))    # g(x, t, t) is a denoiser
    G, g = student.jump(x, sigma, torch.zeros(3))
    torch.testing.assert_close(G, g)                                            # G(x, t, 0) = g(x, t, 0)


@pytest.mark.parametrize("name", list(BACKBONE_ARGS))
def test_second_time_input_reaches_the_output_once_trained(name):
    flow_map = FlowMap(trained_like(name, 2)).eval()
    x = torch.randn(SHAPES[name])
    before = flow_map.jump(x, 2.0, 0.5)[1]
    assert torch.equal(before, flow_map.jump(x, 2.0, 0.05)[1])  # zero-initialised: the target is not read yet
    with torch.no_grad():
        for key, p in flow_map.backbone.named_parameters():
            if key.startswith(type(flow_map.backbone).TARGET_PREFIXES):
                p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(flow_map.jump(x, 2.0, 0.5)[1], flow_map.jump(x, 2.0, 0.05)[1])


class ConstantVelocity(nn.Module):
    """A backbone that outputs a fixed tensor u (with a second time input, so FlowMap takes it as is)."""

    two_time = True

    def __init__(self, u):
        super().__init__()
        self.u = u

    def forward(self, x, noise_labels, class_labels=None, target_noise_labels=None):
        return self.u.expand_as(x)


def test_flow_parameterisation_is_the_meanflow_jump():
    """With "flow" coefficients, G is z_r = z_t - (t - r) u in flow coordinates (z = x / (1 + sigma))."""
    torch.manual_seed(0)
    x, u = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    sigma = torch.tensor([3.0, 1.0, 0.5, 9.0], dtype=torch.float64)
    sigma_to = torch.tensor([1.0, 0.0, 0.2, 0.002], dtype=torch.float64)
    flow_map = FlowMap(ConstantVelocity(u), "flow")
    t, r = flow_t(sigma)[:, None], flow_t(sigma_to)[:, None]
    z_r = x / (1 + sigma[:, None]) - (t - r) * u
    torch.testing.assert_close(flow_map(x, sigma, sigma_to), z_r * (1 + sigma_to[:, None]))


class ExactGaussianFlowMap:
    """G*(x, s, s') = mu + sqrt((V + s'^2) / (V + s^2)) (x - mu), the exact flow map of N(mu, V I)."""

    def __init__(self, mu):
        self.mu = mu

    def __call__(self, x, sigma, sigma_to, class_labels=None):
        ratio = ((V + sigma_to**2) / (V + sigma**2)).sqrt()[:, None]
        return self.mu + ratio * (x - self.mu)


def test_deterministic_jumps_compose_to_the_exact_ode_solution():
    mu, z = problem()
    flow_map = ExactGaussianFlowMap(mu)
    expected = exact_flow(80.0 * z, mu, 80.0, 0.0)
    for nfe in (1, 2, 4):
        counted = CountingDenoiser(flow_map)
        out = sample_flow_map(counted, 80.0 * z, flow_map_levels(nfe))
        torch.testing.assert_close(out, expected)
        assert counted.nfe == nfe == sample_flow_map.steps_for_nfe(nfe)


def test_gamma_one_is_multistep_consistency_sampling():
    mu, z = problem()
    flow_map = ExactGaussianFlowMap(mu)
    consistency = lambda x, sigma, class_labels=None: flow_map(x, sigma, torch.zeros_like(sigma))  # noqa: E731
    sigmas = flow_map_levels(3)
    out = sample_flow_map(flow_map, 80.0 * z, sigmas, gamma=1.0, generator=torch.Generator().manual_seed(5))
    reference = sample_consistency(consistency, 80.0 * z, sigmas, sigma_min=1e-12,
                                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, reference)


def test_levels():
    assert flow_map_levels(1) == [80.0, 0.0]
    two = flow_map_levels(2, 0.002, 80.0, 7.0)
    assert two[0] == 80.0 and two[-1] == 0.0 and two[1] == pytest.approx(float(karras(3)[1]))


def test_jvp_through_a_dit_flow_map_matches_finite_differences():
    flow_map = FlowMap(trained_like("dit", 3))  # float32: Denoiser runs its backbone in float32
    with torch.no_grad():
        for key, p in flow_map.backbone.named_parameters():
            if key.startswith("target_embed"):
                p.add_(0.1 * torch.randn_like(p))
    x, dx = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    sigma, sigma_to = torch.tensor([2.0, 0.7]), torch.tensor([0.5, 0.1])

    def G(x, sigma):
        return flow_map(x, sigma, sigma_to)

    _, tangent = torch.func.jvp(G, (x, sigma), (dx, torch.ones_like(sigma)))
    h = 1e-2
    finite = (G(x + h * dx, sigma + h) - G(x - h * dx, sigma - h)) / (2 * h)
    assert (tangent - finite).norm() < 1e-3 * tangent.norm()


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="second time input"):
        FlowMap(BACKBONES["fno"](**BACKBONE_ARGS["unet"]))
    with pytest.raises(ValueError, match="second time input"):
        FlowMap(nn.Linear(2, 2))
    one_time = BACKBONES["mlp"](**BACKBONE_ARGS["mlp"])
    with pytest.raises(ValueError, match="target_noise_labels given"):
        one_time(torch.randn(2, 6), torch.zeros(2), target_noise_labels=torch.zeros(2))
    dit = BACKBONES["dit"](**BACKBONE_ARGS["dit"])
    with pytest.raises(ValueError, match="guidance given to a DiT without"):  # checked before any embedding runs
        dit(torch.randn(2, 1, 8, 8), torch.zeros(2), guidance=torch.ones(2))
    two_time = BACKBONES["unet"](**BACKBONE_ARGS["unet"]).add_target_embedding()
    with pytest.raises(ValueError, match="needs target_noise_labels"):
        two_time(torch.randn(2, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="already"):
        two_time.add_target_embedding()
    with pytest.raises(ValueError, match="gamma"):
        sample_flow_map(ExactGaussianFlowMap(torch.zeros(2)), torch.randn(2, 2), [80.0, 0.0], gamma=1.5)
    with pytest.raises(ValueError, match="nfe"):
        flow_map_levels(0)
