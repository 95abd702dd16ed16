"""A time-conditioned one-pass generator: unit noise z -> the state at target noise levels sigma_out.

The student of trajectory methods that learn the teacher's ODE solution as a function of time from the start
noise alone (BOOT's g(eps, t), Gu et al. 2023; DSNO's operator, Zheng et al. 2023). It reuses a denoiser backbone
with EDM preconditioning (Karras et al. 2022, Eq. 7) frozen at the start level sigma_max, and lets the target level
enter only through the noise label:

    x_T = sigma_max z
    x_hat(sigma_out) = c_skip(sigma_max) x_T
                       + c_out(sigma_max) F(c_in(sigma_max) x_T, c_noise(max(sigma_out, sigma_min)))

with (c_skip, c_out, c_in, c_noise) = models.denoiser.preconditioning(parameterisation, ...). So at sigma_out =
sigma_max the generator IS the denoiser D(x_T, sigma_max) whose backbone it holds: a student built on a copy of
the teacher's backbone starts at the teacher's first x0 prediction. sigma_out = 0 takes the label of sigma_min.

Two kinds of backbone:
  plain       forward(x, noise_labels [B], class_labels) -> [B, *shape] (unet, mlp, ...): sigma_out is [B] (one
              target per sample) or a number; the output is [B, *shape].
  trajectory  forward(x, noise_labels [B, K], class_labels) -> [B, K, *shape] (fno): sigma_out is [K] (the same K
              targets for every sample) or [B, K]; the output is [B, K, *shape], one state per target.
A backbone is a trajectory backbone when it says so (`outputs_trajectory`), see `outputs_trajectory()`.
"""
import torch
from torch import nn

from models.denoiser import PARAMETERISATIONS, preconditioning
from models.noise import append_dims, sigma_batch


def outputs_trajectory(backbone):
    """Whether `backbone` returns one output per target time ([B, K, *shape]), like fno.

    Recognised by an `outputs_trajectory` attribute, or, failing that, by the attributes of fno's contract:
    `num_times` (K) or `TEACHER_FREE_PREFIXES` (its temporal layers, absent from a teacher)."""
    flag = getattr(backbone, "outputs_trajectory", None)
    if flag is not None:
        return bool(flag)
    return hasattr(backbone, "num_times") or hasattr(type(backbone), "TEACHER_FREE_PREFIXES")


class TimeGenerator(nn.Module):
    """x_hat(sigma_out) from unit noise z in one backbone pass, preconditioned at sigma_max (see module docstring)."""

    def __init__(self, backbone, sigma_max=80.0, parameterisation="edm", sigma_data=0.5, sigma_min=0.002):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {parameterisation!r}; known: {', '.join(PARAMETERISATIONS)}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"TimeGenerator needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.backbone = backbone
        self.sigma_max, self.sigma_min = float(sigma_max), float(sigma_min)
        self.parameterisation, self.sigma_data = parameterisation, float(sigma_data)
        self.trajectory = outputs_trajectory(backbone)

    @property
    def label_dim(self):
        return getattr(self.backbone, "label_dim", 0)

    def _sigma_out(self, sigma_out, z):
        """sigma_out as [B] (plain backbone) or [B, K] (trajectory backbone), in the dtype of the sigma batch."""
        batch = z.shape[0]
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        if isinstance(sigma_out, torch.Tensor):
            sigma = sigma_out.to(device=z.device, dtype=dtype)
        else:  # a number: a fill on the device (no host-to-device copy); a list: copied once
            sigma = (torch.full((), float(sigma_out), dtype=dtype, device=z.device) if isinstance(sigma_out, (int, float))
                     else torch.as_tensor(sigma_out, dtype=dtype, device=z.device))
        if self.trajectory:
            if sigma.ndim == 1:
                return sigma.expand(batch, -1)
            if sigma.ndim == 2 and sigma.shape[0] == batch:
                return sigma
            raise ValueError(f"a trajectory backbone takes sigma_out of shape [K] or [{batch}, K]; "
                             f"got {list(sigma.shape)}")
        if sigma.ndim == 0:
            return sigma.expand(batch)
        if sigma.shape == (batch,):
            return sigma
        raise ValueError(f"a plain backbone takes sigma_out as a number or of shape [{batch}] (one target per "
                         f"sample); got {list(sigma.shape)}")

    def forward(self, z, sigma_out, class_labels=None):
        sigma_T = sigma_batch(self.sigma_max, z)
        x_T = sigma_T[0] * z
        c_skip, c_out, c_in, _ = preconditioning(self.parameterisation, append_dims(sigma_T, z.ndim), self.sigma_data)
        sigma_out = self._sigma_out(sigma_out, z)
        c_noise = preconditioning(self.parameterisation, sigma_out.clamp_min(self.sigma_min), self.sigma_data)[3]
        F = self.backbone((c_in * x_T).to(torch.float32), c_noise.to(torch.float32), class_labels)
        F = F.to(z.dtype if z.dtype == torch.float64 else torch.float32)
        if self.trajectory:
            if F.shape[:2] != sigma_out.shape or F.shape[2:] != z.shape[1:]:
                raise ValueError(f"the trajectory backbone returned {list(F.shape)}; expected "
                                 f"{[*sigma_out.shape, *z.shape[1:]]}")
            x_T, c_skip, c_out = x_T[:, None], c_skip[:, None], c_out[:, None]
        return c_skip * x_T + c_out * F
