"""Sample-quality metrics. `METRICS` maps a name to a plain function `fn(samples, reference, **kw)` returning a float,
or, for the metrics that measure several things at once (precision-recall*, class-histogram-mnist), a dict of
named numbers: for the *-mnist and *-inception metrics, samples and reference are uint8 images [N, C, H, W]; for
swd / mmd / precision-recall, vectors [N, D]. Add your own with METRICS["mine"] = my_metric.

`mnist_metrics` computes every MNIST number (FID, precision / recall / density / coverage, class coverage) from
one pass of the feature net over each set.

The feature networks (metrics.mnist_net, metrics.inception) are imported inside the FID functions, so that
`python -m metrics.mnist_net` does not import itself twice.
"""
import torch

from metrics.classes import class_coverage, class_histogram
from metrics.frechet import feature_statistics, frechet_distance
from metrics.precision_recall import DEFAULT_K, knn_radii, manifold_metrics
from metrics.toy import mmd, sliced_wasserstein


def fid_mnist(samples, reference, net=None, device="cpu"):
    """Frechet distance in the features of the project's offline MNIST classifier (uint8 [N, 1, 28, 28])."""
    from metrics.mnist_net import load_metric_net, mnist_features
    net = load_metric_net(device=device) if net is None else net
    stats = [feature_statistics(mnist_features(net, images)) for images in (samples, reference)]
    return frechet_distance(*stats[0], *stats[1])


def fid_inception(samples, reference, weights_path=None, device="cpu", batch=100, net=None):
    """Standard FID in torch-fidelity's TF-compatible Inception-v3 features, against images or a stats .npz."""
    from metrics.inception import inception_features, load_inception, load_reference_statistics
    net = load_inception(weights_path, device=device) if net is None else net
    stats = feature_statistics(inception_features(net, samples, batch=batch))
    if isinstance(reference, (str, bytes)) or hasattr(reference, "__fspath__"):
        reference_stats = tuple(torch.as_tensor(a) for a in load_reference_statistics(reference))
    else:
        reference_stats = feature_statistics(inception_features(net, reference, batch=batch))
    return frechet_distance(*stats, *reference_stats)


def is_inception(samples, reference=None, weights_path=None, device="cpu", batch=100, net=None, splits=10):
    """Inception Score (Salimans et al. 2016, torch-fidelity's computation): is_mean and is_std over splits."""
    from metrics.inception import inception_outputs, inception_score, load_inception
    net = load_inception(weights_path, device=device) if net is None else net
    mean, std = inception_score(inception_outputs(net, samples, batch=batch)[1], splits=splits)
    return {"is_mean": mean, "is_std": std}


def swd(samples, reference, projections=256, seed=0, p=2):
    """Sliced Wasserstein-p distance between two vector sets [N, D] (seeded random projections)."""
    return sliced_wasserstein(samples, reference, projections, torch.Generator().manual_seed(seed), p)


def mmd2(samples, reference, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0)):
    """Unbiased squared MMD with a sum of RBF kernels between two vector sets [N, D]."""
    return mmd(samples, reference, bandwidths)


def precision_recall(samples, reference, k=DEFAULT_K, device=None):
    """k-NN precision, recall, density and coverage (a dict) between two vector sets [N, D]."""
    return manifold_metrics(samples, reference, k=k, device=device)


def _mnist_labels(net, features):
    """The classifier's predicted labels [N] from its own features: forward() in eval mode is head(relu(features))."""
    device = next(net.parameters()).device
    with torch.inference_mode():
        return torch.cat([net.head(torch.relu(features[i:i + 4096].to(device))).argmax(1).cpu()
                          for i in range(0, len(features), 4096)])


def mnist_metrics(samples, reference, net=None, device="cpu", k=DEFAULT_K, min_share=None, fid=True, classes=True,
                  manifold=True):
    """MNIST-FID (`fid_mnist`), k-NN precision / recall / density / coverage and the predicted-class coverage
    (`classes_covered`, `class_tv_uniform`, ..., see metrics.classes) of uint8 MNIST samples against uint8 real
    digits, in the features of the project's MNIST classifier, as one flat dict; each set goes through the net once.
    fid / classes / manifold switch the three groups off."""
    from metrics.mnist_net import load_metric_net, mnist_features
    net = load_metric_net(device=device) if net is None else net
    return mnist_feature_metrics(mnist_features(net, samples), mnist_features(net, reference), net, device, k,
                                 min_share, fid, classes, manifold)


def mnist_feature_metrics(fake, real, net, device="cpu", k=DEFAULT_K, min_share=None, fid=True, classes=True,
                          manifold=True):
    """mnist_metrics from the feature net's features of the samples (fake) and the real digits (real): for callers
    that score one set of features against several reference splits."""
    report = {}
    if fid:
        report["fid_mnist"] = frechet_distance(*feature_statistics(fake), *feature_statistics(real))
    if manifold:
        report.update(manifold_metrics(fake, real, k=k, device=device))
    if classes:
        report.update(class_coverage(_mnist_labels(net, fake), _mnist_labels(net, real), net.head.out_features,
                                     min_share))
    return report


def precision_recall_mnist(samples, reference, net=None, device="cpu", k=DEFAULT_K):
    """k-NN precision, recall, density and coverage (a dict) in the MNIST classifier's features (uint8 images)."""
    return mnist_metrics(samples, reference, net, device, k, fid=False, classes=False)


def class_histogram_mnist(samples, reference, net=None, device="cpu", min_share=None):
    """Predicted-digit histogram of uint8 MNIST samples: classes covered, TV / KL to uniform and to the reference's."""
    return mnist_metrics(samples, reference, net, device, min_share=min_share, fid=False, manifold=False)


def precision_recall_inception(samples, reference, weights_path=None, device="cpu", batch=100, net=None, k=DEFAULT_K):
    """k-NN precision, recall, density and coverage (a dict) in Inception-v3 pool3 features (needs the weights file)."""
    from metrics.inception import inception_features, load_inception
    net = load_inception(weights_path, device=device) if net is None else net
    fake, real = (inception_features(net, images, batch=batch) for images in (samples, reference))
    return manifold_metrics(fake, real, k=k, device=device)


METRICS = {"fid-mnist": fid_mnist, "fid-inception": fid_inception, "is-inception": is_inception, "swd": swd, "mmd": mmd2,
           "precision-recall": precision_recall, "precision-recall-mnist": precision_recall_mnist,
           "class-histogram-mnist": class_histogram_mnist, "precision-recall-inception": precision_recall_inception}

__all__ = ["METRICS", "DEFAULT_K", "feature_statistics", "frechet_distance", "fid_mnist", "fid_inception", "swd", "mmd2",
           "mmd", "sliced_wasserstein", "precision_recall", "precision_recall_mnist", "class_histogram_mnist",
           "precision_recall_inception", "mnist_metrics", "mnist_feature_metrics", "manifold_metrics", "knn_radii",
           "class_coverage", "class_histogram"]
