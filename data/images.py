"""Shared pieces of the image datasets: an in-memory uint8 image array and the uint8 <-> [-1, 1] conventions.

Images are stored as uint8 [N, C, H, W] (0..255) and returned per item as float32 in [-1, 1]: x = u / 127.5 - 1,
the EDM convention.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def check_resolution(resolution):
    """Return `resolution` if it is a positive int, else raise a one-line ValueError."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer (pixels per side), got {resolution!r}")
    return resolution


def uint8_to_float(images):
    """Map uint8 pixels 0..255 to float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def resize_uint8(images, resolution, chunk=1024):
    """Resize uint8 [N, C, H, W] images to [N, C, resolution, resolution] (bilinear, antialiased)."""
    out = torch.empty(images.shape[0], images.shape[1], resolution, resolution, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


class ImageArray(Dataset):
    """Labelled images held in memory as uint8 [N, C, H, W] (base of MNIST and CIFAR10)."""

    def __init__(self, images, labels, num_classes):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}] to match the images, "
                             f"got {list(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.num_classes = num_classes
        self.shape = tuple(images.shape[1:])

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        return uint8_to_float(self.images[index]), self.labels[index]
