"""The Denoiser wrapper: turns a backbone F(x_in, c_noise) into D(x, sigma) with EDM preconditioning.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), Eq. 7 and Table 1:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

Every parameterisation below is this one formula with its own coefficients, all in VE sigma space, so solvers and
distillation never branch on what the network predicts. With a = signal scale of the process (x_t = a x_ve):

  edm   F is EDM's preconditioned target:   c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2)
  eps   F predicts the noise n (DDPM, VP):  c_skip = 1, c_out = -s, c_in = a_vp = 1/sqrt(1+s^2)
  v     F predicts v = a n - s_vp x0 (Salimans & Ho 2022, VP):  x0 = a^2 x - s a v,
                                            c_skip = 1/(1+s^2), c_out = -s/sqrt(1+s^2), c_in = 1/sqrt(1+s^2)
  x0    F predicts x0 directly:             c_skip = 0, c_out = 1, c_in = 1/sqrt(s^2+sd^2)
  flow  F predicts the velocity u = n - x0 of x_t = (1-t) x0 + t n (Lipman et al. 2023; Liu et al. 2023):
        x_t = x/(1+s), t = s/(1+s), x0 = x_t - t u:  c_skip = 1/(1+s), c_out = -s/(1+s), c_in = 1/(1+s)

c_noise is EDM's ln(sigma)/4 for every parameterisation: our backbones are trained from scratch, and one noise label
keeps a backbone's weights transferable between parameterisations (used by distillation students).
"""
import torch
from torch import nn

from models.noise import append_dims, edm_log_noise_label, sigma_batch

PARAMETERISATIONS = ("edm", "eps", "v", "x0", "flow")


def preconditioning(parameterisation, sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) for a sigma tensor, per EDM Table 1 and the module docstring."""
    s, sd = sigma, sigma_data
    if parameterisation == "edm":
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = (s**2 + sd**2).rsqrt()
    elif parameterisation == "eps":
        c_skip = torch.ones_like(s)
        c_out = -s
        c_in = (1 + s**2).rsqrt()
    elif parameterisation == "v":
        c_skip = 1 / (1 + s**2)
        c_out = -s * (1 + s**2).rsqrt()
        c_in = (1 + s**2).rsqrt()
    elif parameterisation == "x0":
        c_skip = torch.zeros_like(s)
        c_out = torch.ones_like(s)
        c_in = (s**2 + sd**2).rsqrt()
    elif parameterisation == "flow":
        c_skip = 1 / (1 + s)
        c_out = -s / (1 + s)
        c_in = 1 / (1 + s)
    else:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; known: {', '.join(PARAMETERISATIONS)}")
    return c_skip, c_out, c_in, edm_log_noise_label(s)


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise): a backbone wrapped with EDM preconditioning."""

    def __init__(self, backbone, parameterisation="edm", sigma_data=0.5):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {parameterisation!r}; known: {', '.join(PARAMETERISATIONS)}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not 0 < sigma_data < float("inf"):
            raise ValueError(f"sigma_data (the data's standard deviation) must be a positive number; got {sigma_data!r}")
        self.backbone = backbone
        self.parameterisation = parameterisation
        self.sigma_data = float(sigma_data)

    @property
    def label_dim(self):
        return getattr(self.backbone, "label_dim", 0)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (a subclass may change them: models.consistency)."""
        return preconditioning(self.parameterisation, sigma, self.sigma_data)

    def raw(self, x, sigma, class_labels=None, **extra):
        """(F, c_skip, c_out) with sigma broadcast against x; F is the backbone's output in float32."""
        sigma = append_dims(sigma_batch(sigma, x), x.ndim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = (c_in * x).to(torch.float32)
        F = self.backbone(x_in, c_noise.flatten().to(torch.float32), class_labels, **extra)
        return F.to(x.dtype if x.dtype == torch.float64 else torch.float32), c_skip, c_out

    def features(self, x, sigma, class_labels=None, **extra):
        """The backbone's intermediate activations at the preconditioned input (c_in x, c_noise): a list of tensors
        (see the backbone's `features`), for discriminator heads on a denoiser's features."""
        if not hasattr(self.backbone, "features"):
            raise ValueError(f"backbone {type(self.backbone).__name__} exposes no features() for a discriminator head")
        sigma = append_dims(sigma_batch(sigma, x), x.ndim)
        _, _, c_in, c_noise = self.coefficients(sigma)
        return self.backbone.features((c_in * x).to(torch.float32), c_noise.flatten().to(torch.float32),
                                      class_labels, **extra)

    def forward(self, x, sigma, class_labels=None, **extra):
        F, c_skip, c_out = self.raw(x, sigma, class_labels, **extra)
        return c_skip * x + c_out * F
