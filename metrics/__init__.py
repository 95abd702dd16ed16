"""Sample-quality metrics. `METRICS` maps a name to a plain function `fn(samples, reference, **kw) -> float`:
for the FIDs, samples and reference are uint8 images [N, C, H, W]; for swd / mmd, vectors [N, D].
Add your own with METRICS["mine"] = my_metric.

The feature networks (metrics.mnist_net, metrics.inception) are imported inside the FID functions, so that
`python -m metrics.mnist_net` does not import itself twice.
"""
import torch

from metrics.frechet import feature_statistics, frechet_distance
from metrics.toy import mmd, sliced_wasserstein


def fid_mnist(samples, reference, net=None, device="cpu"):
    """Frechet distance in the features of the project's offline MNIST classifier (uint8 [N, 1, 28, 28])."""
    from metrics.mnist_net import load_mnist_feature_net, mnist_features
    net = load_mnist_feature_net(device=device) if net is None else net
    stats = [feature_statistics(mnist_features(net, images)) for images in (samples, reference)]
    return frechet_distance(*stats[0], *stats[1])


def fid_inception(samples, reference, weights_path=None, device="cpu", batch=100, net=None):
    """Standard FID: Frechet distance in Inception-v3 pool3 features (needs the FID Inception weights file)."""
    from metrics.inception import inception_features, load_inception
    net = load_inception(weights_path, device=device) if net is None else net
    stats = [feature_statistics(inception_features(net, images, batch=batch)) for images in (samples, reference)]
    return frechet_distance(*stats[0], *stats[1])


def swd(samples, reference, projections=256, seed=0, p=2):
    """Sliced Wasserstein-p distance between two vector sets [N, D] (seeded random projections)."""
    return sliced_wasserstein(samples, reference, projections, torch.Generator().manual_seed(seed), p)


def mmd2(samples, reference, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0)):
    """Unbiased squared MMD with a sum of RBF kernels between two vector sets [N, D]."""
    return mmd(samples, reference, bandwidths)


METRICS = {"fid-mnist": fid_mnist, "fid-inception": fid_inception, "swd": swd, "mmd": mmd2}

__all__ = ["METRICS", "feature_statistics", "frechet_distance", "fid_mnist", "fid_inception", "swd", "mmd2",
           "mmd", "sliced_wasserstein"]
