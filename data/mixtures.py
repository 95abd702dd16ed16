"""The analytic Gaussian mixture: a fixed, seeded toy distribution whose exact denoiser is known in closed form.

    p(x0) = sum_k w_k N(x0; mu_k, diag(v_k)), x = x0 + sigma n => p_sigma(x) = sum_k w_k N(x; mu_k, diag(v_k + sigma^2))

The exact teacher for this data is `models.analytic.GaussianMixtureDenoiser.from_data(dataset)`. Mode layout:
dim 1: evenly spaced on [-radius, radius]; dim 2: a ring of radius `radius`; dim >= 3: `radius` times unit
directions picked greedily (farthest-point) from seeded random candidates, so modes are well separated.
Default radius 0.5 sqrt(dim) (per-coordinate scale ~0.5, like images in [-1, 1]); default per-coordinate std is
1/8 of the smallest distance between two means (modes at least 8 std apart), or 0.5 for a single component.
"""
import math

import numpy as np
import torch


def _unit_directions(dim, components, generator):
    """`components` unit vectors in R^dim, spread out by farthest-point selection among random candidates."""
    candidates = torch.randn(64 * components, dim, generator=generator, dtype=torch.float64)
    candidates = candidates / candidates.norm(dim=1, keepdim=True)
    chosen = [0]
    min_dist = (candidates - candidates[0]).norm(dim=1)
    for _ in range(components - 1):
        index = int(min_dist.argmax())
        chosen.append(index)
        min_dist = torch.minimum(min_dist, (candidates - candidates[index]).norm(dim=1))
    return candidates[chosen]


def gaussian_mixture_params(dim=2, components=8, seed=0, radius=None, std=None):
    """Means [K, D], diagonal variances [K, D], weights [K] (float64) of a well-separated, equally weighted mixture."""
    if int(dim) != dim or dim < 1:
        raise ValueError(f"gaussian mixture dim must be a positive integer; got {dim!r}")
    if int(components) != components or components < 1:
        raise ValueError(f"gaussian mixture components must be a positive integer; got {components!r}")
    if radius is not None and not radius > 0:
        raise ValueError(f"gaussian mixture radius must be > 0; got {radius!r}")
    if std is not None and not std > 0:
        raise ValueError(f"gaussian mixture std must be > 0; got {std!r}")
    dim, components = int(dim), int(components)
    radius = 0.5 * math.sqrt(dim) if radius is None else float(radius)
    generator = torch.Generator().manual_seed(int(seed))
    if dim == 1:
        positions = torch.linspace(-1.0, 1.0, components, dtype=torch.float64) if components > 1 else torch.zeros(1)
        directions = positions.to(torch.float64)[:, None]
    elif dim == 2:
        angle = 2 * math.pi * torch.arange(components, dtype=torch.float64) / components
        directions = torch.stack([angle.cos(), angle.sin()], dim=1)
    else:
        directions = _unit_directions(dim, components, generator)
    means = radius * directions
    if std is None:
        if components == 1:
            std = 0.5
        else:
            distances = torch.cdist(means, means).fill_diagonal_(math.inf)
            std = float(distances.min()) / 8
    variances = torch.full((components, dim), float(std) ** 2, dtype=torch.float64)
    weights = torch.full((components,), 1.0 / components, dtype=torch.float64)
    return dict(means=means, variances=variances, weights=weights)


def sample_gaussian_mixture(means, variances, weights, n, generator=None):
    """Draw n samples: (x [n, D] in means' dtype, component index [n] int64)."""
    if means.ndim != 2 or variances.shape != means.shape or weights.shape != means.shape[:1]:
        raise ValueError(f"expected means [K, D], variances [K, D], weights [K]; got {list(means.shape)}, "
                         f"{list(variances.shape)}, {list(weights.shape)}")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0 or bool((variances < 0).any()):
        raise ValueError("mixture weights must be >= 0 with a positive sum, and variances must be >= 0")
    if int(n) != n or n < 0:
        raise ValueError(f"number of samples must be a non-negative integer; got {n!r}")
    device = means.device
    component = torch.multinomial(weights.to(torch.float64).cpu(), int(n), replacement=True, generator=generator)
    noise = torch.randn(int(n), means.shape[1], generator=generator, dtype=means.dtype).to(device)
    component = component.to(device)
    return means[component] + variances[component].sqrt() * noise, component


class GaussianMixtureData(torch.utils.data.Dataset):
    """The analytic Gaussian mixture: n seeded samples (x [dim] float32, label = component index int64).

    image_shape=[C, H, W] (C*H*W = dim) serves the same mixture as images, for image backbones (unet, fno); the
    means and variances in `params` then carry that shape too, and the exact teacher is unchanged."""

    def __init__(self, dim=2, components=8, n=50000, seed=0, image_shape=None):
        if int(n) != n or n < 1:
            raise ValueError(f"gaussian mixture dataset size n must be a positive integer; got {n!r}")
        if image_shape is not None and (len(image_shape) != 3 or math.prod(image_shape) != dim):
            raise ValueError(f"gmm image_shape must be [C, H, W] with C*H*W = dim = {dim}; got {image_shape}")
        self.params = gaussian_mixture_params(dim=dim, components=components, seed=seed)
        # a generator seeded apart from the one that laid out the modes
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0]))
        x, component = sample_gaussian_mixture(**self.params, n=int(n), generator=generator)
        self.shape = (int(dim),) if image_shape is None else tuple(int(s) for s in image_shape)
        if image_shape is not None:
            self.params = {k: v.reshape(-1, *self.shape) if v.ndim == 2 else v for k, v in self.params.items()}
        self.x = x.to(torch.float32).reshape(-1, *self.shape)
        self.labels = component
        self.num_classes = int(components)

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, index):
        return self.x[index], self.labels[index]
