"""Standard FID features: the 2048-d pool3 output of the Inception-v3 network of Szegedy et al. 2016
("Rethinking the Inception Architecture"), with the TensorFlow FID weights of Heusel et al. 2017 as converted
by pytorch-fid (pt_inception-2015-12-05-6726825d.pth, 1008 classes). Nothing is downloaded: the file must be
present (argument, $FASTDIFF_INCEPTION, or the cache directory).

Inputs are uint8 images, resized to 299x299 bilinearly (as pytorch-fid does) and scaled to [-1, 1].

Comparability: the network is torchvision's Inception3 with the FID weights loaded, not the TF graph itself.
They differ in the pooling branches of four blocks (the TF graph / pytorch-fid's FIDInceptionA, C, E_1 average
without counting padding, and Mixed_7c (FIDInceptionE_2) max-pools), so features differ slightly and FID values
are close to, but not bit-comparable with, published TF / pytorch-fid numbers. Compare methods with each other
inside this codebase; for paper-comparable numbers, score the saved samples with pytorch-fid or the TF code.
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.mnist_net import cache_dir

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


def default_inception_path():
    """$FASTDIFF_INCEPTION, else <cache dir>/pt_inception-2015-12-05-6726825d.pth."""
    env = os.environ.get("FASTDIFF_INCEPTION")
    return Path(env).expanduser() if env else cache_dir() / WEIGHTS_NAME


def load_inception(weights_path=None, device="cpu", random_init=False):
    """Inception-v3 returning pool3 features [B, 2048] for inputs [B, 3, 299, 299] in [-1, 1], in eval mode.
    random_init=True skips the weights (for tests of shapes and batching only)."""
    from torchvision.models import inception_v3

    path = Path(weights_path).expanduser() if weights_path is not None else default_inception_path()
    if not random_init and not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: put {WEIGHTS_NAME} (pytorch-fid's release) "
                                f"at {path}, or pass weights_path / set FASTDIFF_INCEPTION")
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008, transform_input=False)
    if not random_init:
        try:
            result = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]  # unused in eval
            if missing or result.unexpected_keys:
                raise KeyError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        except Exception as error:  # unreadable file, or not the 1008-class FID Inception state_dict
            detail = " ".join(str(error).split())[:160]
            raise ValueError(f"cannot load FID Inception weights from {path} ({type(error).__name__}: {detail}); "
                             f"expected pytorch-fid's {WEIGHTS_NAME}") from None
    net.fc = nn.Identity()  # forward now ends at pool3 (dropout is inactive in eval mode)
    return net.to(device).eval()


def _as_uint8_images(images):
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C in (1, 3) or [N, H, W], got {tuple(images.shape)}")
    return images


def inception_features(net, images, batch=100):
    """pool3 features [N, 2048] (float32, CPU) of uint8 images [N, C, H, W] (C = 1 is repeated to RGB) or [N, H, W]."""
    images = _as_uint8_images(images)
    device = next(net.parameters()).device
    features = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).float().div(255).expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            features.append(net(2 * x - 1).float().cpu())
    return torch.cat(features) if features else torch.zeros(0, FEATURE_DIM)
