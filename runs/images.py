"""Images in [-1, 1] to uint8 arrays and PNG grids."""
import math
from pathlib import Path

import torch
from PIL import Image


def to_uint8(images):
    """[-1, 1] float [N, C, H, W] -> uint8 [N, C, H, W], rounding as EDM's generate.py does."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def save_image_grid(images, path, nrow=None):
    """Save [N, C, H, W] images in [-1, 1] as one PNG grid (rows of sqrt(N) images by default)."""
    images = to_uint8(images.detach().cpu())
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(c, ncol * h, nrow * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if c == 1 else array).save(path)
