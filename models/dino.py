"""The `dino` discriminator: a frozen DINO ViT with small trainable heads on its tokens.

StyleGAN-T (Sauer et al., "StyleGAN-T: Unlocking the Power of GANs for Fast Large-Scale Text-to-Image Synthesis",
ICML 2023; autonomousvision/stylegan-t networks/discriminator.py, vit_utils.py) and ADD (Sauer et al., "Adversarial
Diffusion Distillation", 2023, which swaps in DINOv2 ViT-S/14: model="vit_small_patch14_dinov2.lvd142m").

Pipeline: DiffAugment (color, translation, cutout; training only) on [-1, 1] -> [0, 1] -> grayscale repeated to RGB ->
random img_size crop with probability p_crop for larger images -> resize to img_size -> ImageNet mean/std -> ViT.
Taps: the token sequence after the patch embedding (+ position embedding, norm_pre) and the outputs of blocks `taps`;
the CLS token is added to every patch token and dropped (register tokens, if any, are dropped too), giving
[B, embed_dim, tokens]. One head per tap: SN-conv1d k=1 -> residual (SN-conv1d k=9 circular, (x + f(x)) / sqrt 2) ->
SN-conv1d k=1 out; each conv followed (except the last) by BatchNormLocal and LeakyReLU(0.2). Projection
conditioning: the out conv has cmap_dim channels, dotted with a linear embedding of the label row, / sqrt(cmap_dim);
unconditional: 1 channel. Logits of all heads are concatenated per token: [B, (len(taps) + 1) * tokens], float32.

Choices where we deviate or the papers are silent:
- Normalisation is StyleGAN-T's BatchNormLocal: the batch is split into ceil(B / 8) near-equal groups ("virtual
  batch" of 8) and normalised with each group's own statistics over samples and tokens, in train and eval alike (no
  running statistics), learned affine. Remainders are allowed (torch.chunk) where the reference code would fail.
- Resize: area when downsampling (as StyleGAN-T); bilinear when upsampling small images (e.g. 32 -> 224), where area
  would be nearest-neighbour blocks; the papers only train at >= 64 px.
- The random crop is drawn once per batch (torchvision RandomCrop on a batch) and only in training mode; the reference
  crops whenever called.
- Normalisation constants are ImageNet's whatever `model` is (DINO and DINOv2 both use them).
- DINOv2 runs at img_size=224 (16x16 tokens); timm resamples its 518-px position embedding when loading.
- The label embedding is a plain nn.Linear per head (StyleGAN-T: its FullyConnectedLayer); no spectral norm on it.
- Blocks after the last tap are not run. The frozen ViT lives in this module (its weights are in state_dict).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from models.diffaug import diff_augment
from models.labels import label_rows

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _hf_cache_dir():
    """The Hugging Face hub cache as huggingface_hub resolves it, but read now (its constants are read at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(cache)


def load_vit(model, weights, img_size):
    """timm ViT `model` at img_size without classifier. weights: "random"; a local file (timm loads it: safetensors
    or torch.load weights_only); None: $FASTDIFF_DINO, else timm's Hugging Face cache offline, else a ValueError."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    if not timm.is_model(model):
        raise ValueError(f"dino discriminator: unknown timm model {model!r}")
    kwargs = dict(img_size=img_size, num_classes=0)
    if weights == "random":
        vit = timm.create_model(model, pretrained=False, **kwargs)
    elif weights is not None or os.environ.get("FASTDIFF_DINO"):
        path = os.fspath(weights) if weights is not None else os.environ["FASTDIFF_DINO"]
        source = "disc_args.weights" if weights is not None else "FASTDIFF_DINO"
        if not os.path.isfile(path):
            raise ValueError(f"dino discriminator: weights file {path!r} (from {source}) does not exist")
        try:
            # num_classes=0 in the overlay keeps timm's load strict (it relaxes it when the classifier size differs)
            overlay = dict(file=path, num_classes=0)
            vit = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as e:  # wrong keys / shapes / format: timm's message is multi-line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"dino discriminator: could not load {path!r} into {model}: {first}") from e
    else:
        import huggingface_hub.constants as hf_constants
        saved_env, saved_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
        os.environ["HF_HUB_OFFLINE"], hf_constants.HF_HUB_OFFLINE = "1", True  # cache only: never download
        try:
            vit = timm.create_model(model, pretrained=True, cache_dir=_hf_cache_dir(), **kwargs)
        except Exception:
            vit = None
        finally:
            hf_constants.HF_HUB_OFFLINE = saved_const
            if saved_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved_env
        if vit is None:
            raise ValueError(
                f"dino discriminator: no weights for {model} found offline; download them on a connected machine "
                f"(timm.create_model('{model}', pretrained=True) fills ~/.cache/huggingface) or pass "
                f"objective.disc_args={{weights: /path/to/file}} (or set FASTDIFF_DINO=/path); weights: random is for "
                f"tests only")
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"dino discriminator: {model} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


class BatchNormLocal(nn.Module):
    """BatchNorm over a "virtual batch": ceil(B / group) groups, each normalised by its own statistics over its
    samples and tokens (no running statistics); learned per-channel affine. Input [B, C, L]."""

    def __init__(self, channels, group=8, eps=1e-5):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        parts = []
        for g in x.chunk(math.ceil(x.shape[0] / self.group)):
            var, mean = torch.var_mean(g, dim=(0, 2), keepdim=True, unbiased=False)
            parts.append((g - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(parts) * self.weight[:, None] + self.bias[:, None]


def _block(channels, kernel_size):
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class DiscHead(nn.Module):
    """Per-token logits [B, L] from tokens [B, C, L] (and label rows [B, label_dim] when conditional)."""

    def __init__(self, channels, label_dim=0, cmap_dim=64):
        super().__init__()
        self.pre, self.res = _block(channels, 1), _block(channels, 9)
        self.out = spectral_norm(nn.Conv1d(channels, cmap_dim if label_dim else 1, 1))
        self.cmap = nn.Linear(label_dim, cmap_dim) if label_dim else None

    def forward(self, h, c=None):
        h = self.pre(h)
        h = (h + self.res(h)) / math.sqrt(2)
        out = self.out(h)
        if self.cmap is not None:
            out = (out * self.cmap(c).unsqueeze(-1)).sum(1, keepdim=True) / math.sqrt(out.shape[1])
        return out.flatten(1)


class DinoDiscriminator(nn.Module):
    """Projected-GAN style discriminator on a frozen timm ViT (see the module docstring). sigma is ignored."""
    noise_conditional = False

    def __init__(self, in_channels=3, img_resolution=32, label_dim=0, model="vit_small_patch16_224.dino",
                 weights=None, taps=(2, 5, 8, 11), cmap_dim=64, augment="color,translation,cutout", img_size=224,
                 p_crop=0.5):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"dino discriminator: in_channels must be 1 (grayscale) or 3 (RGB); got {in_channels}")
        self.in_channels, self.img_resolution, self.label_dim = in_channels, img_resolution, label_dim
        self.augment, self.img_size, self.p_crop = augment, img_size, p_crop
        self.vit = load_vit(model, weights, img_size).requires_grad_(False).eval()
        depth = len(self.vit.blocks)
        self.taps = tuple(sorted(int(t) for t in taps))
        if not self.taps or len(set(self.taps)) != len(self.taps) or not all(0 <= t < depth for t in self.taps):
            raise ValueError(f"dino discriminator: taps must be distinct block indices in 0..{depth - 1} "
                             f"({model} has depth {depth}); got {tuple(taps)}")
        self.heads = nn.ModuleList(DiscHead(self.vit.embed_dim, label_dim, cmap_dim) for _ in range(len(self.taps) + 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # frozen feature net: always eval
        return self

    def _tokens(self, h):
        """[B, prefix + L, C] -> [B, C, L]: CLS added to each patch token; CLS and register tokens dropped."""
        tokens = h[:, self.vit.num_prefix_tokens:]
        if self.vit.cls_token is not None:
            tokens = tokens + h[:, :1]
        return tokens.transpose(1, 2)

    def features(self, x):
        """Token maps of the patch embedding and of blocks `taps`, for normalised images [B, 3, img_size, img_size].
        No no_grad: the ViT is frozen by requires_grad, and gradients flow to x."""
        vit = self.vit
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        feats = [self._tokens(h)]
        for i, block in enumerate(vit.blocks[:self.taps[-1] + 1]):
            h = block(h)
            if i in self.taps:
                feats.append(self._tokens(h))
        return feats

    def forward(self, x, sigma=None, class_labels=None):
        C, R = self.in_channels, self.img_resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, R, R):
            raise ValueError(f"dino discriminator: expected images [B, {C}, {R}, {R}]; got {list(x.shape)}")
        if self.label_dim and class_labels is None:
            raise ValueError(f"dino discriminator: conditional (label_dim={self.label_dim}) but no class_labels given")
        if not self.label_dim and class_labels is not None:
            raise ValueError("dino discriminator: unconditional (label_dim=0) but class_labels were given")
        c = label_rows(class_labels, x.shape[0], self.label_dim, x.device).to(x.dtype) if self.label_dim else None
        if self.training and self.augment:
            x = diff_augment(x, self.augment)
        x = (x + 1) / 2
        if C == 1:
            x = x.expand(-1, 3, -1, -1)
        S = self.img_size
        if self.training and R > S and torch.rand(()) < self.p_crop:
            i, j = torch.randint(0, R - S + 1, (2,)).tolist()
            x = x[:, :, i:i + S, j:j + S]
        if x.shape[-1] > S:
            x = F.interpolate(x, size=(S, S), mode="area")
        elif x.shape[-1] < S:
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        logits = [head(f, c) for head, f in zip(self.heads, self.features(x))]
        return torch.cat(logits, dim=1).float()
