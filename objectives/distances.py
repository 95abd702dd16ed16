"""Distances for regression losses: `make_distance(name, **kwargs)(pred, target) -> [B]`, one value per sample.

  mse           mean squared error over the sample's elements
  l1            mean absolute error (Luhman & Luhman 2021 use L1 for CIFAR-10)
  pseudo_huber  sqrt(||pred - target||^2 + c^2) - c (Song & Dhariwal 2023, iCT, Sec. 3.3), c = 0.00054 sqrt(d) by
                default, d the number of elements of a sample
  lpips         LPIPS (Zhang et al. 2018, Eq. 1) through the `lpips` package: unit-normalise each layer's features
                across channels, weight the squared differences with the calibrated 1x1 linear heads, average over
                space, sum over layers (lpips=False: plain channel sums instead of the heads). Backbone "vgg"
                (default, VGG16) or "alex"; `resize=None` scores at native resolution (rectified flow's k=1
                distillation: VGG at 32x32; DSNO: VGG with lpips=False at 32x32), an int upsamples both images
                bilinearly first (consistency models, Song et al. 2023: 224 below 256). The ImageNet weights are
                read from a local file (no downloads): `weights=`, else $FASTDIFF_LPIPS_BACKBONE, else torchvision's
                torch hub cache file (<torch hub dir>/checkpoints/vgg16-397923af.pth or alexnet-owt-7be5be79.pth).
  mnist_feature an offline perceptual distance for MNIST from the project's own feature net (metrics/mnist_net.py):
                LPIPS without linear heads (Zhang et al.'s "baseline" variant) on MnistNet's three ReLU conv
                stages and its 128-d feature layer

The perceptual distances are frozen nn.Modules (requires_grad False, always in eval mode) that move with
`.to(device)`; gradients flow to `pred`. Inputs are images in [-1, 1].
"""
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F


class MSE(nn.Module):
    """Mean squared error per sample."""

    def forward(self, pred, target):
        return (pred - target).float().square().flatten(1).mean(1)


class L1(nn.Module):
    """Mean absolute error per sample."""

    def forward(self, pred, target):
        return (pred - target).float().abs().flatten(1).mean(1)


class PseudoHuber(nn.Module):
    """sqrt(||pred - target||^2 + c^2) - c; c defaults to iCT's 0.00054 sqrt(d)."""

    def __init__(self, c=None):
        super().__init__()
        self.c = c

    def forward(self, pred, target):
        diff = (pred - target).float().flatten(1)
        c = 0.00054 * math.sqrt(diff.shape[1]) if self.c is None else self.c
        return (diff.square().sum(1) + c**2).sqrt() - c


class Frozen(nn.Module):
    """A distance holding a frozen network: no trainable parameters, and eval mode whatever `.train()` asks."""

    def freeze(self):
        return self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)


# The file names torchvision's ImageNet weights have in the torch hub cache (VGG16_Weights.IMAGENET1K_V1,
# AlexNet_Weights.IMAGENET1K_V1), and the smallest image side each LPIPS backbone accepts (VGG16's fifth slice
# starts with the fourth 2x2 max-pool; AlexNet's stride-4 stem and two 3x3/2 pools leave nothing below 31).
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
LPIPS_MIN_SIZE = {"vgg": 16, "alex": 31}
LPIPS_BACKBONE_ENV = "FASTDIFF_LPIPS_BACKBONE"


def lpips_backbone_path(net, weights=None):
    """Where the ImageNet weights of LPIPS's backbone are read from: `weights`, else $FASTDIFF_LPIPS_BACKBONE,
    else torchvision's file in the torch hub cache. A one-line FileNotFoundError says what to put where."""
    file_name = LPIPS_BACKBONE_FILES[net]
    url = f"https://download.pytorch.org/models/{file_name}"
    if weights is not None:
        source, path = "weights=", Path(weights).expanduser()
    elif os.environ.get(LPIPS_BACKBONE_ENV):
        source, path = f"${LPIPS_BACKBONE_ENV}", Path(os.environ[LPIPS_BACKBONE_ENV]).expanduser()
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not path.is_file():
            raise FileNotFoundError(f"lpips (net={net}) needs torchvision's ImageNet weights: put {file_name} "
                                    f"({url}) at {path}, or point weights= or ${LPIPS_BACKBONE_ENV} at a copy")
        return path
    if not path.is_file():
        raise FileNotFoundError(f"lpips (net={net}): no backbone weights file at {path} (from {source}); "
                                f"expected torchvision's {file_name} ({url})")
    return path


def load_lpips_backbone(backbone, path, net):
    """Copy a torchvision VGG16 / AlexNet state_dict (the whole model's, keys "features.i.*", or its `.features`',
    keys "i.*") into the lpips package's sliced backbone, whose keys are "slice<k>.i.*"."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"lpips: cannot read backbone weights {path} ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"lpips: {path} holds a {type(state).__name__}, not a state_dict")
    if any(key.startswith("features.") for key in state):
        state = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    mapped = {}
    for key, param in backbone.state_dict().items():
        source = key.split(".", 1)[1]  # "slice2.5.weight" -> "5.weight"
        if source not in state or state[source].shape != param.shape:
            found = "missing" if source not in state else f"shape {tuple(state[source].shape)}"
            raise ValueError(f"lpips: {path} is not a torchvision {LPIPS_BACKBONE_FILES[net].split('-')[0]} "
                             f"state_dict (features.{source}: {found}, expected shape {tuple(param.shape)})")
        mapped[key] = state[source]
    backbone.load_state_dict(mapped)


class LPIPS(Frozen):
    """LPIPS(pred, target) -> [B] for images in [-1, 1] with 1 or 3 channels (1 is repeated to 3).

    net: "vgg" or "alex". resize: None (native resolution) or an int / [H, W] to upsample both images to
    (bilinear) before scoring. lpips: True for the calibrated linear heads shipped with the package (v0.1), False
    for their uncalibrated "baseline" (channel sums). weights: path of torchvision's ImageNet state_dict for the
    backbone (see `lpips_backbone_path` for the fallbacks). random_init: keep the backbone random (tests only).
    """

    def __init__(self, net="vgg", resize=None, lpips=True, weights=None, random_init=False):
        super().__init__()
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"lpips net must be one of {', '.join(LPIPS_BACKBONE_FILES)}; got {net!r}")
        self.net, self.resize = net, (None if resize is None else _pair(resize))
        if self.resize is not None and min(self.resize) < LPIPS_MIN_SIZE[net]:
            raise ValueError(f"lpips (net={net}) resize must be at least {LPIPS_MIN_SIZE[net]}; got {resize}")
        path = None if random_init else lpips_backbone_path(net, weights)  # fail before the slow construction
        import lpips as lpips_package  # imports torchvision: only when an LPIPS distance is built
        with warnings.catch_warnings():  # the package calls torchvision with its deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand: torchvision's random init, so nothing is downloaded; pretrained: the shipped linear heads
            self.model = lpips_package.LPIPS(net=net, lpips=lpips, pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            load_lpips_backbone(self.model.net, path, net)
        self.freeze()

    def forward(self, pred, target):
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] not in (1, 3):
            raise ValueError(f"lpips needs two images [B, 1 or 3, H, W] of one shape; got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        pred, target = pred.float(), target.float()
        if pred.shape[1] == 1:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        if self.resize is not None:
            pred = F.interpolate(pred, size=self.resize, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=self.resize, mode="bilinear", align_corners=False)
        if min(pred.shape[2:]) < LPIPS_MIN_SIZE[self.net]:
            raise ValueError(f"lpips (net={self.net}) needs images of at least {LPIPS_MIN_SIZE[self.net]} pixels a "
                             f"side; got {tuple(pred.shape[2:])}: set resize (e.g. 224)")
        return self.model(pred, target).reshape(len(pred))


def _pair(size):
    size = [size, size] if isinstance(size, int) else list(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"resize must be a positive int or [H, W]; got {size}")
    return tuple(size)


def unit_normalise(features, eps=1e-10):
    """Scale each position's feature vector (dim 1) to unit length, as LPIPS does."""
    return features / (features.square().sum(1, keepdim=True).sqrt() + eps)


class MnistFeature(Frozen):
    """Perceptual distance for MNIST [B, 1, 28, 28] in [-1, 1] from the project's MnistNet (metrics/mnist_net.py).

    Layers: the output of each ReLU in `net.convs` (16, 32 and 64 channels) and the 128-d feature layer. With
    normalize=True (default; LPIPS's baseline without linear heads) each layer is unit-normalised across channels
    per position and the squared differences are summed over channels and averaged over positions, so each layer
    contributes a value in [0, 4]; with normalize=False each layer contributes the plain mean squared difference
    of its activations. The result is the sum over the four layers.
    path: the feature-net checkpoint (None: the cached one, trained in about a minute if missing).
    random_init: an untrained, randomly initialised MnistNet (tests only: no file, no training).
    """

    def __init__(self, path=None, normalize=True, random_init=False):
        super().__init__()
        from metrics.mnist_net import MnistNet, load_mnist_feature_net
        self.normalize = normalize
        self.net = MnistNet() if random_init else load_mnist_feature_net(path, device="cpu", train_if_missing=True)
        self.freeze()

    def layers(self, x):
        activations = []
        for module in self.net.convs:
            x = module(x)
            if isinstance(module, nn.ReLU):
                activations.append(x)
        activations.append(self.net.feature(x.flatten(1))[:, :, None, None])  # as [B, C, 1, 1]
        return activations

    def forward(self, pred, target):
        if pred.shape != target.shape or tuple(pred.shape[1:]) != (1, 28, 28):
            raise ValueError(f"mnist_feature needs two images [B, 1, 28, 28] of one shape; got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        total = 0
        for a, b in zip(self.layers(pred.float()), self.layers(target.float())):
            if self.normalize:
                total = total + (unit_normalise(a) - unit_normalise(b)).square().sum(1).flatten(1).mean(1)
            else:
                total = total + (a - b).square().flatten(1).mean(1)
        return total


DISTANCES = {
    "mse": MSE,
    "l1": L1,
    "pseudo_huber": PseudoHuber,
    "lpips": LPIPS,
    "mnist_feature": MnistFeature,
}


def make_distance(name, **kwargs):
    """The distance `name` built with `kwargs`; a one-line ValueError lists the known names."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; known: {', '.join(sorted(DISTANCES))}")
    distance = DISTANCES[name](**kwargs)
    return distance.requires_grad_(False).eval()
