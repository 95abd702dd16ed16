"""Differentiable augmentation (DiffAugment; Zhao et al., "Differentiable Augmentation for Data-Efficient GAN
Training", NeurIPS 2020), as in their reference code: color (brightness, saturation, contrast), translation by up to
1/8 of the image side with zero padding, cutout of a square of 1/2 the image side. Every sample draws its own
transform; all ops are differentiable w.r.t. the images. Images are in [-1, 1], shape [B, C, H, W]."""
import torch
import torch.nn.functional as F


def _rand(x, generator, *shape):
    """Uniform [0, 1) numbers drawn on the generator's device (so a seeded generator reproduces), moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.rand(*shape, generator=generator, device=device).to(x.device, x.dtype)


def _randint(x, generator, low, high, *shape):
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, shape, generator=generator, device=device).to(x.device)


def brightness(x, g=None):
    return x + (_rand(x, g, x.shape[0], 1, 1, 1) - 0.5)


def saturation(x, g=None):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, g, x.shape[0], 1, 1, 1) * 2) + mean


def contrast(x, g=None):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x, g, x.shape[0], 1, 1, 1) + 0.5) + mean


def translation(x, g=None, ratio=0.125):
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty = _randint(x, g, -sh, sh + 1, B, 1, 1)
    tx = _randint(x, g, -sw, sw + 1, B, 1, 1)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(H, device=x.device),
                                torch.arange(W, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, H + 1)  # index into the 1-pixel zero-padded image: out of range reads zeros
    gx = torch.clamp(gx + tx + 1, 0, W + 1)
    x_pad = F.pad(x, [1, 1, 1, 1])
    return x_pad.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2).contiguous()


def cutout(x, g=None, ratio=0.5):
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oy = _randint(x, g, 0, H + (1 - ch % 2), B, 1, 1)
    ox = _randint(x, g, 0, W + (1 - cw % 2), B, 1, 1)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - ch // 2, 0, H - 1)
    gx = torch.clamp(gx + ox - cw // 2, 0, W - 1)
    mask = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


AUGMENTS = {"color": [brightness, saturation, contrast], "translation": [translation], "cutout": [cutout]}


def diff_augment(x, policy="color,translation,cutout", generator=None):
    """Apply the comma-separated `policy` (names from AUGMENTS, in order) to x [B, C, H, W]; "" is the identity.
    `generator` (a torch.Generator) makes the draws reproducible; None uses the global RNG."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in AUGMENTS]
    if unknown:
        raise ValueError(f"diff_augment: unknown policy {unknown}; choose from {list(AUGMENTS)}")
    for name in names:
        for fn in AUGMENTS[name]:
            x = fn(x, generator)
    return x
