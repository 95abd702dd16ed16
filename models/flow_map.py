"""Flow maps: two-time networks G(x, sigma, sigma_to) that jump along the probability-flow ODE from sigma down to any
sigma_to <= sigma in one evaluation (CTM, MeanFlow; issue: "two-time students").

Kim et al. 2024, "Consistency Trajectory Models" (CTM), Sec. 4.1, in the project's VE sigma space (x = x0 + sigma n):

    G(x, sigma, sigma_to) = (sigma_to / sigma) x + (1 - sigma_to / sigma) g(x, sigma, sigma_to)
    g(x, sigma, sigma_to) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), c_noise(sigma_to))

with (c_skip, c_out, c_in, c_noise) any models.denoiser parameterisation. What follows from the form:
  - G(x, sigma, sigma) = x, and G(x, sigma, 0) = g(x, sigma, 0): the one-step sample.
  - G is an Euler (DDIM) step from sigma to sigma_to that uses g(x, sigma, sigma_to) as its x0 estimate, and
    g(x, sigma, sigma) is a denoiser (CTM's DSM term trains it as one; `denoiser()` exposes it to every solver).
    So a student whose backbone took a teacher's weights, with the second time input's zero-initialised embedding
    (`add_target_embedding` on the unet, dit and mlp backbones), computes exactly the teacher's Euler step for every
    jump before it trains: CTM's initialisation.
  - MeanFlow (Geng et al. 2025): with the "flow" parameterisation (c_skip = c_in = 1/(1+sigma), c_out = -sigma/(1+sigma))
    F is the average velocity u(z_t, r, t) of z_t = (1 - t) x0 + t n and G is its jump z_r = z_t - (t - r) u, written
    in VE coordinates (x = z / (1 - t), sigma = t / (1 - t)): both sides have coefficient 1 + sigma_to on z_t and
    -(sigma - sigma_to) / (1 + sigma) on u. One wrapper serves both methods.

The second time input is the noise label of the target level, c_noise(max(sigma_to, SIGMA_TO_FLOOR)): the project's
c_noise is ln(sigma)/4, which has no value at 0, and the jumps to 0 and to 0.002 differ by 0.002/sigma of the skip
term only (the floor is the project's sigma_min).
"""
import torch
from torch import nn

from models.denoiser import Denoiser
from models.noise import append_dims, edm_log_noise_label, sigma_batch

SIGMA_TO_FLOOR = 0.002


def two_time(backbone):
    """`backbone` with a second time input (its `add_target_embedding()`), or a one-line ValueError for a backbone
    that cannot take one."""
    if getattr(backbone, "two_time", False):
        return backbone
    add = getattr(backbone, "add_target_embedding", None)
    if add is None:
        raise ValueError(f"a two-time (flow map) objective needs a backbone with a second time input; "
                         f"{type(backbone).__name__} has none (use unet, dit or mlp)")
    return add()


class FlowMap(Denoiser):
    """G(x, sigma, sigma_to) over a two-time backbone (module docstring); forward(x, sigma, sigma_to, class_labels)."""

    def __init__(self, backbone, parameterisation="edm", sigma_data=0.5):
        super().__init__(two_time(backbone), parameterisation, sigma_data)

    def jump(self, x, sigma, sigma_to, class_labels=None):
        """(G(x, sigma, sigma_to), g(x, sigma, sigma_to)); sigmas as floats or [B] tensors, 0 <= sigma_to <= sigma."""
        sigma, sigma_to = sigma_batch(sigma, x), sigma_batch(sigma_to, x)
        target = edm_log_noise_label(sigma_to.clamp_min(SIGMA_TO_FLOOR)).to(torch.float32)
        x0_hat = Denoiser.forward(self, x, sigma, class_labels, target_noise_labels=target)
        ratio = append_dims(sigma_to / sigma, x.ndim)
        return ratio * x + (1 - ratio) * x0_hat, x0_hat

    def forward(self, x, sigma, sigma_to, class_labels=None):
        return self.jump(x, sigma, sigma_to, class_labels)[0]

    def denoise(self, x, sigma, class_labels=None):
        """g(x, sigma, sigma): the flow map's denoiser D(x, sigma) (CTM's DSM term; any ODE solver samples it)."""
        return self.jump(x, sigma, sigma, class_labels)[1]


class FlowMapDenoiser(nn.Module):
    """g(x, sigma, sigma) of a FlowMap as a denoiser D(x, sigma, class_labels=None), so any ODE solver samples a
    flow-map student and a flow-map run can serve as a teacher (CTM's g; MeanFlow's instantaneous velocity u(z, t, t),
    which is flow matching)."""

    def __init__(self, flow_map):
        super().__init__()
        self.flow_map = flow_map

    @property
    def backbone(self):
        return self.flow_map.backbone

    @property
    def parameterisation(self):
        return self.flow_map.parameterisation

    @property
    def sigma_data(self):
        return self.flow_map.sigma_data

    @property
    def label_dim(self):
        return self.flow_map.label_dim

    def forward(self, x, sigma, class_labels=None):
        return self.flow_map.denoise(x, sigma, class_labels)
