"""Standard FID / Inception Score features through torch-fidelity (Obukhov et al.), the maintained port of the
TensorFlow Inception-v3 graph that FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are reported with:
`torch_fidelity.FeatureExtractorInceptionV3` ("inception-v3-compat"), TF1-compatible bilinear resize to 299x299
included, pool3 features (2048-d) for FID and unbiased logits (1008 classes) for IS. Numbers from it are comparable
with torch-fidelity's and, per its documentation, with the TF reference code.

Nothing is downloaded: the weights file `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity's release
v0.2.0, github.com/toshas/torch-fidelity/releases) must be present: the `weights_path` argument, $FASTDIFF_INCEPTION,
the project's cache directory, or torch hub's checkpoints folder (where torch-fidelity itself caches it). The file is
first read with `weights_only=True` (a file holding pickled code is refused) before torch-fidelity loads it.

Reference statistics are kept in the EDM / pytorch-fid `.npz` format: `mu` [2048], `sigma` [2048, 2048].
"""
import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from metrics.mnist_net import cache_dir

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
FEATURE_DIM = 2048


def candidate_paths():
    """Where the weights are looked for, in order."""
    env = os.environ.get("FASTDIFF_INCEPTION")
    paths = [Path(env).expanduser()] if env else []
    return paths + [cache_dir() / WEIGHTS_NAME, Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME]


def inception_weights_path(weights_path=None):
    """The weights file to use, or a FileNotFoundError saying where to put it."""
    paths = [Path(weights_path).expanduser()] if weights_path is not None else candidate_paths()
    for path in paths:
        if path.is_file():
            return path
    raise FileNotFoundError(f"FID Inception weights not found: download {WEIGHTS_URL} on a machine with internet and "
                            f"put it at {paths[0]}" + (" (or pass weights_path / set FASTDIFF_INCEPTION)"
                                                       if weights_path is None else ""))


@contextlib.contextmanager
def _random_weights():
    """torch-fidelity's extractor always loads a state dict: make that load a no-op (random init, for tests)."""
    original = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        torch.nn.Module.load_state_dict = original


def load_inception(weights_path=None, device="cpu", random_init=False):
    """torch-fidelity's Inception-v3 (eval mode) returning (pool3 [B, 2048], logits_unbiased [B, 1008]) for uint8
    [B, 3, H, W]. random_init=True skips the weights (for tests of the machinery only)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    features = ["2048", "logits_unbiased"]
    if random_init:
        empty = cache_dir() / ".empty_state_dict.pt"
        empty.parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, empty)
        with _random_weights():
            net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=empty)
        return net.to(device).eval()
    path = inception_weights_path(weights_path)
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code
        net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=str(path))
    except Exception as error:  # unreadable, pickled code, or not the FID Inception state dict
        detail = " ".join(str(error).split())[:160]
        raise ValueError(f"cannot load FID Inception weights from {path} ({type(error).__name__}: {detail}); "
                         f"expected torch-fidelity's {WEIGHTS_NAME}") from None
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


def inception_outputs(net, images, batch=100):
    """(pool3 features [N, 2048] float64, unbiased logits [N, 1008] float64), on the CPU, of uint8 images
    [N, C, H, W] (C = 1 is repeated to RGB) or [N, H, W]."""
    images = _as_uint8_images(images)
    device = next(net.parameters()).device
    pools, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            pool, logit = net(images[i:i + batch].expand(-1, 3, -1, -1).contiguous().to(device))
            pools.append(pool.double().cpu())
            logits.append(logit.double().cpu())
    if not pools:
        return torch.zeros(0, FEATURE_DIM, dtype=torch.float64), torch.zeros(0, 1008, dtype=torch.float64)
    return torch.cat(pools), torch.cat(logits)


def inception_features(net, images, batch=100):
    """pool3 features [N, 2048] (float64, CPU): what FID and Inception precision / recall use."""
    return inception_outputs(net, images, batch)[0]


def inception_score(logits, splits=10):
    """(mean, std) of the Inception Score over `splits` splits (Salimans et al. 2016), by torch-fidelity."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    scores = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=2020)
    return scores["inception_score_mean"], scores["inception_score_std"]


def save_reference_statistics(path, mu, sigma):
    """Write (mu [D], sigma [D, D]) in the EDM / pytorch-fid .npz format."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_reference_statistics(path, dim=FEATURE_DIM):
    """(mu, sigma) from an EDM / pytorch-fid .npz, checked: mu [dim], sigma [dim, dim], finite."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a reference-statistics .npz with 'mu' and 'sigma' ({error})") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: reference statistics must be mu [{dim}] and sigma [{dim}, {dim}], got "
                         f"{list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: reference statistics are not finite")
    return mu.astype(np.float64), sigma.astype(np.float64)
