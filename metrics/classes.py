"""Class coverage: the histogram of a classifier's predicted labels on generated samples.

The mode-counting test of the GAN literature (Metz et al. 2017, "Unrolled Generative Adversarial Networks";
Lin et al. 2018, "PacGAN: The power of two samples in generative adversarial networks"): classify every sample,
count the classes it lands in, and compare the label histogram p with a target histogram q by

    total variation  TV(p, q) = 1/2 sum_c |p_c - q_c|                     (in [0, 1])
    KL divergence    KL(p || q) = sum_{c: p_c > 0} p_c log(p_c / q_c)      (nats; the "reverse" KL of PacGAN)

KL(p || q) stays finite when the generator drops classes (a generator of one class out of K scores log K against
the uniform target) and is inf only when p puts mass on a class q never has. q is the uniform histogram, and the
reference's histogram (the SAME classifier's predictions on real images, so that its errors cancel) when given.

A class is counted as covered when its share of the samples is at least `min_share`, by default half the uniform
share, 1 / (2K) (5 % for MNIST): well above the scatter a 98.5 %-accurate classifier's mistakes leave on the other
classes, and well below the smallest class of real MNIST (about 9 %), so real digits cover all 10.
"""
import math

import numpy as np
import torch


def class_histogram(labels, num_classes=10):
    """Shares [num_classes] (float64, summing to 1) of integer labels [N] in [0, num_classes)."""
    labels = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if labels.ndim != 1 or len(labels) == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers [N >= 1], got {labels.dtype} {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min().item()}..{labels.max().item()}")
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    return counts / counts.sum()


def total_variation(p, q):
    """1/2 sum |p - q| between two histograms."""
    return 0.5 * (p - q).abs().sum().item()


def kl_divergence(p, q):
    """KL(p || q) = sum_{p > 0} p log(p / q) in nats; inf when q = 0 somewhere p > 0."""
    support = p > 0
    if (q[support] <= 0).any():
        return math.inf
    return (p[support] * (p[support] / q[support]).log()).sum().item()


def class_coverage(labels, reference_labels=None, num_classes=10, min_share=None):
    """Classes covered and the label histogram's TV / KL(p || q) to uniform (and to the reference's histogram when
    reference_labels are given), as a dict of plain numbers; the shares themselves are `class_shares`."""
    min_share = 0.5 / num_classes if min_share is None and isinstance(num_classes, int) else min_share
    shares = class_histogram(labels, num_classes)
    if not isinstance(min_share, (int, float)) or not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
    uniform = torch.full_like(shares, 1 / num_classes)
    report = {"classes_covered": int((shares >= min_share).sum()), "class_min_share": float(min_share),
              "class_tv_uniform": total_variation(shares, uniform), "class_kl_uniform": kl_divergence(shares, uniform)}
    if reference_labels is not None:
        reference = class_histogram(reference_labels, num_classes)
        report.update(class_tv_reference=total_variation(shares, reference),
                      class_kl_reference=kl_divergence(shares, reference),
                      reference_classes_covered=int((reference >= min_share).sum()))
    report["class_shares"] = [round(s, 6) for s in shares.tolist()]
    return report
