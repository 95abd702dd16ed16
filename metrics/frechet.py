"""Frechet distance between Gaussians fitted to features (the FID of Heusel et al. 2017, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6):

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

Tr (S1 S2)^{1/2} is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2; this needs no complex arithmetic and no eps offset
when the covariances are singular (e.g. fewer samples than feature dimensions).
"""
import numpy as np
import torch


def feature_statistics(features):
    """Mean [F] and unbiased covariance [F, F], both float64 numpy, of features [N, F] (tensor or array)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2, got shape {tuple(features.shape)}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix):
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); a Python float >= 0."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    f = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"expected mu [F] and sigma [F, F] for both Gaussians, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigvals, 0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))
