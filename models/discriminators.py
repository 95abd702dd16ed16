"""Discriminators for adversarial one-step training: ADD, UFOGen, the GAN terms of DMD2 and CTM
(objectives/adversarial.py holds their losses).

Every discriminator is an nn.Module with one contract, so any objective can use any of them:

    forward(x, sigma=None, class_labels=None) -> logits, float32 [B, N]

x is a batch shaped like the data (images [B, C, H, W] or vectors [B, D]), clean or noised to `sigma` [B]; the N
logits of a sample (pixels of a patch discriminator, tokens x heads of a ViT one) are each scored by the loss and
averaged. `noise_conditional` says whether sigma is read: a noise-conditional discriminator needs it, the others
judge their input as given. Class-conditional discriminators use the projection of Miyato & Koyama 2018 (the
head's cmap_dim channels dotted with an embedding of the class, divided by sqrt(cmap_dim)). Frozen feature
networks (a DINO ViT, the teacher) have requires_grad False from construction, so the loop never optimises them,
but gradients flow through them to x: the generator learns through the discriminator.

    conv              ConvDiscriminator: a small trainable net for tests and tiny data (images: strided
                      spectral-normalised convs; vectors: a spectral-normalised MLP), noise-conditional by default
    teacher_features  TeacherFeatureDiscriminator: trainable heads on a frozen denoiser's encoder activations at
                      the input's noise level (LADD, Sauer et al. 2024; DMD2's head, Yin et al. 2024). It needs no
                      downloaded network, so it is the offline default
    dino              models.dino.DinoDiscriminator: heads on a frozen DINO ViT (StyleGAN-T, ADD)

`build_discriminator` builds one from the student's backbone (which fixes the data's shape and classes), the
teacher and the user's arguments, with one-line ValueErrors for combinations that cannot work.
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.labels import label_rows
from models.noise import edm_log_noise_label
from models.unet import GroupNorm, PositionalEmbedding


class ClassProjection(nn.Module):
    """Projection conditioning: logits = <out, embed(c)> / sqrt(cmap_dim) over the channel axis (1) of a head's
    output [B, cmap_dim, *S] -> [B, prod(S)]; unconditional (label_dim 0): the single channel of out."""

    def __init__(self, label_dim, cmap_dim):
        super().__init__()
        self.label_dim, self.cmap_dim = int(label_dim), int(cmap_dim) if label_dim else 1
        self.embed = nn.Linear(self.label_dim, self.cmap_dim, bias=False) if label_dim else None

    def forward(self, out, class_labels):
        batch = out.shape[0]
        if self.embed is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional discriminator (label_dim=0)")
            return out.float().reshape(batch, -1)
        if class_labels is None:
            raise ValueError(f"a class-conditional discriminator (label_dim={self.label_dim}) needs class_labels")
        cmap = self.embed(label_rows(class_labels, batch, self.label_dim, out.device))
        cmap = cmap.reshape(batch, self.cmap_dim, *([1] * (out.ndim - 2)))
        return ((out.float() * cmap.float()).sum(1) / math.sqrt(self.cmap_dim)).reshape(batch, -1)


def data_shape(backbone):
    """The shape of one sample of the data `backbone` takes: (dim,) for vectors, (C, H, W) for images."""
    dim = getattr(backbone, "dim", 0)
    return (int(dim),) if dim else (int(backbone.in_channels), int(backbone.img_resolution),
                                    int(backbone.img_resolution))


def check_input(x, shape, name):
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} expects inputs of shape [B, {', '.join(map(str, shape))}]; got {list(x.shape)}")


class ConvDiscriminator(nn.Module):
    """A small patch discriminator (images) or MLP discriminator (vectors), spectral-normalised, LeakyReLU(0.2).

    Images: conv3x3 to `channels`, then stride-2 conv blocks doubling the channels (at most 4x) while the
    resolution stays >= 8, then a 1x1 conv to the projection's channels: one logit per position of the last map.
    Vectors: `depth` linear layers of `channels` units. With noise_conditional the sigma embedding (sinusoidal in
    EDM's c_noise = ln(sigma)/4, then a linear map) is added to every block's activations (a per-channel shift)."""

    def __init__(self, in_channels=1, img_resolution=28, dim=0, label_dim=0, channels=32, depth=3,
                 cmap_dim=32, noise_conditional=True):
        super().__init__()
        self.noise_conditional = bool(noise_conditional)
        self.shape = (dim,) if dim else (in_channels, img_resolution, img_resolution)
        widths = [channels]
        if dim:
            widths += [channels] * (depth - 1)
        else:
            resolution = img_resolution
            while resolution >= 16 and len(widths) < depth:
                widths.append(min(widths[-1] * 2, 4 * channels))
                resolution = (resolution + 1) // 2
        self.project = ClassProjection(label_dim, cmap_dim)
        conv = (lambda a, b: nn.Linear(a, b)) if dim else (
            lambda a, b, stride=1: nn.Conv2d(a, b, 3, stride=stride, padding=1))
        layers = [spectral_norm(conv(dim or in_channels, widths[0]))]
        for a, b in zip(widths, widths[1:]):
            layers.append(spectral_norm(conv(a, b) if dim else conv(a, b, stride=2)))
        self.layers = nn.ModuleList(layers)
        self.out = spectral_norm(nn.Linear(widths[-1], self.project.cmap_dim) if dim
                                 else nn.Conv2d(widths[-1], self.project.cmap_dim, 1))
        if self.noise_conditional:
            self.noise_embed = PositionalEmbedding(64)
            self.noise_shift = nn.ModuleList(nn.Linear(64, w) for w in widths)

    def forward(self, x, sigma=None, class_labels=None):
        check_input(x, self.shape, "the conv discriminator")
        if self.noise_conditional:
            if sigma is None:
                raise ValueError("a noise-conditional conv discriminator needs sigma (noise_conditional=false "
                                 "judges clean inputs)")
            emb = self.noise_embed(edm_log_noise_label(sigma.float().expand(x.shape[0])))
        h = x.float()
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.noise_conditional:
                shift = self.noise_shift[i](emb)
                h = h + shift.reshape(*shift.shape, *([1] * (h.ndim - 2)))
            h = F.leaky_relu(h, 0.2)
        return self.project(self.out(h), class_labels)


class FeatureHead(nn.Module):
    """A trainable head on one feature map: [conv3x3 -> GroupNorm -> SiLU] x 2 -> 1x1 conv to the projection's
    channels (per-position logits), for [B, C, H, W] features (DMD2's head on the bottleneck, with stride 1: our
    bottlenecks are 7x7 or smaller); Linear -> SiLU -> Linear for [B, C] features."""

    def __init__(self, channels, spatial, width, out_channels):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), GroupNorm(width), nn.SiLU(),
                                     nn.Conv2d(width, width, 3, padding=1), GroupNorm(width), nn.SiLU(),
                                     nn.Conv2d(width, out_channels, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, out_channels))

    def forward(self, h):
        return self.net(h)


class FeatureHeads(nn.Module):
    """One FeatureHead per feature map of a network (`features`: a probe's list of [B, C, ...] tensors), each with
    the projection; forward(features, class_labels) -> the heads' logits concatenated, [B, N]."""

    def __init__(self, features, label_dim, width, cmap_dim):
        super().__init__()
        self.project = ClassProjection(label_dim, cmap_dim)
        self.heads = nn.ModuleList(FeatureHead(f.shape[1], f.ndim == 4, width, self.project.cmap_dim)
                                   for f in features)

    def forward(self, features, class_labels):
        return torch.cat([self.project(head(h), class_labels) for head, h in zip(self.heads, features)], dim=1)


def feature_levels(features, levels):
    """The feature maps a head reads: "bottleneck" (the deepest only, DMD2) or "all" (LADD's multi-scale heads)."""
    if levels not in ("bottleneck", "all"):
        raise ValueError(f"feature levels must be 'bottleneck' or 'all'; got {levels!r}")
    return list(features) if levels == "all" else [features[-1]]


def probe_features(network, shape, levels):
    """The feature maps `network` (a Denoiser) gives for one zero input of `shape` at sigma 1, under no_grad."""
    with torch.no_grad():
        probe = torch.zeros(1, *shape, device=next(network.parameters()).device)
        labels = torch.zeros(1, dtype=torch.long, device=probe.device) if network.label_dim else None
        return feature_levels(network.features(probe, torch.ones(1, device=probe.device), labels), levels)


class TeacherFeatureDiscriminator(nn.Module):
    """Trainable heads on the frozen teacher's encoder activations (Denoiser.features at the input's sigma):
    LADD (Sauer et al. 2024) with a diffusion teacher as the feature network, and the form of DMD2's GAN head
    (FastGen's dmd2 puts its heads on the frozen teacher in this way).

    `levels`: "all" (every resolution level and the bottleneck, LADD's multi-scale heads; the default) or
    "bottleneck" (the middle blocks' output only, as DMD2's head). Telling the shipped MNIST teacher's one-step
    samples from real digits (batch 32, Adam (0, 0.99) at lr 1e-3, hinge), "all" reached a loss of 0.72 in 50 steps,
    "bottleneck" 1.75 (2.0 is chance). Inputs are noised images at sigma (noise_conditional): an objective with clean images noises them
    first (LADD: real and generated alike). The teacher is a registered but frozen submodule (its weights are saved
    with the discriminator's state)."""

    noise_conditional = True

    def __init__(self, teacher, in_channels=1, img_resolution=28, dim=0, label_dim=0, levels="all", width=64,
                 cmap_dim=32):
        super().__init__()
        if not isinstance(teacher, nn.Module) or not hasattr(teacher, "features"):
            raise ValueError("the teacher_features discriminator needs a trained denoiser teacher (--teacher RUN); "
                             f"this teacher ({type(teacher).__name__}) has no network features")
        self.shape = (dim,) if dim else (in_channels, img_resolution, img_resolution)
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher_conditional = bool(teacher.label_dim)
        self.levels = levels
        try:
            features = probe_features(teacher, self.shape, levels)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"the teacher_features discriminator cannot read this teacher on data of shape "
                             f"{list(self.shape)}: {str(error).splitlines()[0]}") from None
        self.heads = FeatureHeads(features, label_dim, width, cmap_dim)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x, sigma=None, class_labels=None):
        check_input(x, self.shape, "the teacher_features discriminator")
        if sigma is None:
            raise ValueError("the teacher_features discriminator reads the teacher at the input's noise level: "
                             "pass sigma")
        features = self.teacher.features(x, sigma, class_labels if self.teacher_conditional else None)
        return self.heads(feature_levels(features, self.levels), class_labels)


def _dino():
    from models.dino import DinoDiscriminator
    return DinoDiscriminator


DISCRIMINATORS = {
    "conv": lambda: ConvDiscriminator,
    "teacher_features": lambda: TeacherFeatureDiscriminator,
    "dino": _dino,
}


def build_discriminator(name, backbone, teacher=None, args=None):
    """The discriminator `name` for data shaped like `backbone`'s (its in_channels / img_resolution or dim, and its
    label_dim: a conditional generator gets a conditional discriminator), with `args` (a dict) its own settings.
    Unknown names and arguments, and data it cannot take, are one-line ValueErrors."""
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; known: {', '.join(sorted(DISCRIMINATORS))}")
    cls = DISCRIMINATORS[name]()
    args = dict(args or {})
    takes = inspect.signature(cls).parameters
    data = {"label_dim": int(getattr(backbone, "label_dim", 0) or 0)}
    if getattr(backbone, "dim", 0):
        data["dim"] = int(backbone.dim)
    else:
        data.update(in_channels=int(backbone.in_channels), img_resolution=int(backbone.img_resolution))
    fixed = sorted(set(args) & set(data))
    unknown = sorted(set(args) - set(takes) - {"teacher"})
    if fixed or unknown:
        settable = [k for k in takes if k not in ("in_channels", "img_resolution", "dim", "label_dim", "teacher")]
        raise ValueError(f"discriminator {name!r}: " + (f"{', '.join(fixed)} come(s) from the data, not disc_args"
                                                        if fixed else f"takes no argument(s) {', '.join(unknown)}")
                         + f"; it takes: {', '.join(settable)}")
    if "dim" in data and "dim" not in takes:
        raise ValueError(f"discriminator {name!r} takes images; the data are vectors of dimension {data['dim']}")
    data = {k: v for k, v in data.items() if k in takes}
    if "teacher" in takes:
        args["teacher"] = teacher
    return cls(**data, **args)
