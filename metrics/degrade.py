"""Known degradations of real MNIST digits, for validating a sample-quality metric: a trustworthy FID must rise
monotonically with each one's level (runs/bench_metric.py).

Every function takes uint8 images [N, 1, 28, 28] or [N, 28, 28] (numpy or torch; 0 = background, 255 = ink) and
returns a new uint8 numpy array of the same shape (`drop_classes`: a chosen subset, and its labels). Level 0 returns
the images unchanged (a copy); randomness comes from `seed` alone (numpy's PCG64), so the same call gives the same
images; levels outside a function's range, and unknown names in `degrade`, are one-line ValueErrors.

    gaussian_noise   level = sigma of added N(0, sigma^2) noise, in units of the full intensity range [0, 1]
                     (then clipped and rounded back to uint8); range [0, 1]
    blur             level = sigma in pixels of a separable Gaussian blur (kernel radius ceil(3 sigma), the
                     background value 0 beyond the border); range [0, 5]
    drop_classes     level = number of classes dropped (which ones: a seeded permutation of the labels present, the
                     first `level` of it, so a higher level drops a superset); the result is `n` digits (default: all
                     of the kept ones) drawn without replacement from the kept classes; range [0, classes - 1]
    duplicate        level = fraction of the set replaced by copies: round((1 - level) N) seeded-random images are
                     kept and the rest of the N slots are filled with copies of randomly chosen kept ones;
                     range [0, 1)
"""
import math

import numpy as np
import torch

LEVEL_RANGES = {"gaussian_noise": (0.0, 1.0), "blur": (0.0, 5.0), "drop_classes": (0, 9), "duplicate": (0.0, 1.0)}


def _as_uint8(images):
    """uint8 numpy [N, 1, 28, 28] or [N, 28, 28] (a copy is not made here)."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {array.dtype}")
    if array.ndim not in (3, 4) or len(array) == 0 or (array.ndim == 4 and array.shape[1] != 1):
        raise ValueError(f"images must be [N >= 1, 1, H, W] or [N, H, W], got shape {list(array.shape)}")
    return array


def _check_level(name, level, integer=False, upper_open=False):
    low, high = LEVEL_RANGES[name]
    if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)) or \
            (integer and float(level) != int(level)) or not math.isfinite(float(level)):
        raise ValueError(f"{name} level must be a {'whole ' if integer else ''}number, got {level!r}")
    if not (low <= level < high if upper_open else low <= level <= high):
        raise ValueError(f"{name} level must be in [{low}, {high}{')' if upper_open else ']'}, got {level}")
    return int(level) if integer else float(level)


def gaussian_noise(images, level, seed=0):
    """images + N(0, level^2) per pixel (intensity scale [0, 1]), clipped to [0, 1] and rounded to uint8."""
    level = _check_level("gaussian_noise", level)
    images = _as_uint8(images)
    if level == 0:
        return images.copy()
    noise = np.random.default_rng(seed).standard_normal(images.shape) * (level * 255)
    return np.clip(np.rint(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma):
    """The normalised 1-d Gaussian kernel of radius ceil(3 sigma) (float64)."""
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def blur(images, level, seed=0):
    """Separable Gaussian blur with sigma = level pixels (zero, i.e. background, beyond the border), rounded to uint8;
    seed is unused (the blur is deterministic) and accepted for a uniform signature."""
    level = _check_level("blur", level)
    images = _as_uint8(images)
    if level == 0:
        return images.copy()
    kernel = torch.from_numpy(gaussian_kernel(level))
    r = len(kernel) // 2
    x = torch.from_numpy(images.reshape(-1, 1, *images.shape[-2:]).astype(np.float64))
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [r, r, 0, 0]), kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [0, 0, r, r]), kernel.view(1, 1, -1, 1))
    return np.clip(np.rint(x.numpy()), 0, 255).astype(np.uint8).reshape(images.shape)


def drop_classes(images, labels, level, n=None, seed=0):
    """(images, labels) of `n` digits (default: every kept one) drawn without replacement from those whose label is
    not among the `level` dropped classes (the first `level` of a seeded permutation of the labels present), in their
    original order. level 0 with n = None (or n = N) returns the input unchanged."""
    images = _as_uint8(images)
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers [N] matching the {len(images)} images, got {labels.dtype} "
                         f"{list(labels.shape)}")
    classes = np.unique(labels)
    level = _check_level("drop_classes", level, integer=True)
    if level >= len(classes):
        raise ValueError(f"drop_classes level must leave at least one of the {len(classes)} classes present, "
                         f"got {level}")
    dropped = np.random.default_rng(seed).permutation(classes)[:level]
    kept = np.flatnonzero(~np.isin(labels, dropped))
    n = len(kept) if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(kept):
        raise ValueError(f"drop_classes: n must be between 1 and the {len(kept)} digits of the kept classes, got {n}")
    if n < len(kept):
        kept = np.sort(np.random.default_rng([seed, 1]).choice(kept, n, replace=False))
    return images[kept].copy(), labels[kept].copy()


def duplicate(images, level, seed=0):
    """N images of which round((1 - level) N) are distinct seeded-random originals (kept in order, first) and the rest
    copies of randomly chosen kept ones; level 0 returns the input unchanged."""
    level = _check_level("duplicate", level, upper_open=True)
    images = _as_uint8(images)
    if level == 0:
        return images.copy()
    n = len(images)
    unique = max(1, round((1 - level) * n))
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(n, unique, replace=False))
    copies = rng.choice(kept, n - unique, replace=True)
    return images[np.concatenate([kept, copies])]


DEGRADATIONS = {"gaussian_noise": gaussian_noise, "blur": blur, "drop_classes": drop_classes, "duplicate": duplicate}


def degrade(name, images, level, seed=0, labels=None, n=None):
    """DEGRADATIONS[name] at `level`: uint8 images of the same shape (drop_classes needs labels and may take n; it
    returns the images only here, `drop_classes` itself also returns their labels)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)}")
    if name == "drop_classes":
        if labels is None:
            raise ValueError("drop_classes needs the images' labels")
        return drop_classes(images, labels, level, n=n, seed=seed)[0]
    if n is not None:
        raise ValueError(f"n is for drop_classes only, not {name}")
    return DEGRADATIONS[name](images, level, seed=seed)
