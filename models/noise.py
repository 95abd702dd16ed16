"""Noise processes in variance-exploding sigma space, and the conversions at the edge.

Everything in the project speaks VE sigma space (EDM / k-diffusion): x = x0 + sigma * n. Processes that scale the
signal are converted with sigma = b(t) / a(t) and x_ve = x_t / a(t) (EDM, Karras et al. 2022, Sec. 2 and Table 1):

- VP (DDPM / score SDE, linear beta):  a = 1 / sqrt(1 + sigma^2),  sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
- rectified flow / flow matching:      x_t = (1 - t) x0 + t n,     sigma = t / (1 - t),  a = 1 - t = 1 / (1 + sigma)
"""
import torch

VP_BETA_MIN = 0.1
VP_BETA_D = 19.9


def vp_sigma(t, beta_min=VP_BETA_MIN, beta_d=VP_BETA_D):
    """sigma(t) of the linear-beta VP process (EDM Table 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_t(sigma, beta_min=VP_BETA_MIN, beta_d=VP_BETA_D):
    """Inverse of `vp_sigma`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_alpha(sigma):
    """Signal scale a(sigma) = 1 / sqrt(1 + sigma^2) of the VP process: x_vp = a * x_ve."""
    return (1 + sigma**2).rsqrt()


def flow_sigma(t):
    """sigma of rectified flow x_t = (1 - t) x0 + t n at time t in [0, 1)."""
    return t / (1 - t)


def flow_t(sigma):
    """Inverse of `flow_sigma`: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def flow_alpha(sigma):
    """Signal scale a(sigma) = 1 - t = 1 / (1 + sigma) of rectified flow: x_t = a * x_ve."""
    return 1 / (1 + sigma)


def append_dims(sigma, ndim):
    """Reshape a [B] sigma to [B, 1, ..., 1] so that it broadcasts against an ndim-dimensional x."""
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def sigma_batch(sigma, x):
    """Any sigma (python float, 0-dim or [B] tensor) as a [B] tensor on x's device, in float32 or x's float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(sigma, torch.Tensor):  # a fill, not a host-to-device copy: no sync on CUDA
        return torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
    sigma = sigma.to(device=x.device, dtype=dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def noise_label_batch(noise_labels, batch):
    """A backbone's noise labels as [B]: a 0-dim label is broadcast; any other shape is a one-line ValueError."""
    if noise_labels.ndim == 0:
        noise_labels = noise_labels.expand(batch)
    if noise_labels.shape != (batch,):
        raise ValueError(f"noise_labels must have shape [{batch}]; got {list(noise_labels.shape)}")
    return noise_labels


def edm_log_noise_label(sigma):
    """EDM's noise conditioning c_noise = ln(sigma) / 4."""
    return sigma.log() / 4

