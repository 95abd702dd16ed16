"""Mode-coverage metrics on feature vectors: k-NN manifold precision / recall and density / coverage.

Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", section 2, eq. 1-2). The manifold of a set Phi of feature vectors is the union of balls
centred on its points, each with the radius to that point's k-th nearest neighbour in Phi (itself excluded):

    f(phi, Phi) = 1  if  ||phi - phi'||_2 <= ||phi' - NN_k(phi')||_2  for at least one phi' in Phi, else 0  (eq. 1)

    precision(Phi_r, Phi_g) = 1/|Phi_g| sum_{phi_g} f(phi_g, Phi_r)      (generated points on the real manifold)
    recall(Phi_r, Phi_g)    = 1/|Phi_r| sum_{phi_r} f(phi_r, Phi_g)      (real points on the generated manifold, eq. 2)

with k = 3 as the paper recommends. Precision measures fidelity, recall measures how much of the real data the
generator covers: a mode-seeking generator keeps precision high and loses recall, which FID mixes into one number.

Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models",
section 3.2) use only the real manifold, with B(X_i, r_i) the real ball of X_i as above, N real, M fake:

    density  = 1/(k M) sum_j sum_i 1[Y_j in B(X_i, r_i)]      (can exceed 1; about 1 when fake ~ real)
    coverage = 1/N sum_i 1[exists j: Y_j in B(X_i, r_i)]      (in [0, 1]; robust to outliers among the fakes)

All four come from one pass over the fake x real distance matrix (plus one pass over each set against itself for
the radii), computed by torch.cdist in row blocks of at most `block_elements` distances, so 10k x 10k needs a
few tens of MB, never the whole matrix. Ball membership is `<=` throughout (eq. 1; Naeem et al.'s code uses `<`;
the two differ only on exact ties).

Precision: float32 by default, as the reference implementations (NVlabs' TF code, the `prdc` package) are.
torch.cdist computes large blocks as sqrt(|a|^2 + |b|^2 - 2 a.b), whose rounding error is about
eps * |a|^2; both sets are therefore centred on the real mean first (in float64; distances do not change), which
keeps |a| small. The error then moves a ball's surface by ~1e-7 relative, which only flips points lying that
close to it; dtype=torch.float64 removes even that at about twice the CPU time.

The numbers depend on k and on the set sizes (more points -> smaller balls): compare runs only at the same k and
the same numbers of real and generated points.
"""
import numpy as np
import torch

DEFAULT_K = 3
BLOCK_ELEMENTS = 2 ** 24  # distances per block: 64 MB in float32, plus two boolean masks of a quarter of that


def as_feature_matrix(x, name="features"):
    """A tensor [N, D] (numpy or torch, any real dtype) checked for shape and finiteness; one-line ValueErrors."""
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be feature vectors [N, D], got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    x = x.detach()
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _rows_per_block(columns, block_elements):
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}")
    return max(1, block_elements // max(columns, 1))


def knn_radii(points, k=DEFAULT_K, block_elements=BLOCK_ELEMENTS):
    """Distance from each point of points [N, D] to its k-th nearest neighbour among the OTHER points, [N] (the
    radii r_i = ||phi_i - NN_k(phi_i)|| of eq. 1), in points' dtype and on its device; needs N > k."""
    n = len(points)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points per set, got {n}")
    radii = torch.empty(n, dtype=points.dtype, device=points.device)
    rows = _rows_per_block(n, block_elements)
    for start in range(0, n, rows):
        block = torch.cdist(points[start:start + rows], points)  # [b, N]
        local = torch.arange(len(block), device=points.device)
        block[local, local + start] = float("inf")  # exclude each point itself, whatever rounding gave it
        radii[start:start + rows] = block.topk(k, dim=1, largest=False).values[:, -1]
    return radii


def manifold_metrics(samples, reference, k=DEFAULT_K, dtype=torch.float32, block_elements=BLOCK_ELEMENTS,
                     device=None):
    """Precision, recall (Kynkaanniemi et al. 2019, eq. 1-2), density and coverage (Naeem et al. 2020, section 3.2) of
    generated features samples [M, D] against real features reference [N, D], as a dict of Python floats.

    k: the neighbour defining each ball's radius (3, as the paper); needs M > k and N > k.
    dtype: float32 (default, as the reference implementations) or float64; see the module docstring.
    block_elements: the most distances held at once (memory ~ 6 bytes each in float32).
    device: where to compute (default: the device of samples; a GPU makes 50k x 50k Inception features quick).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    fake, real = as_feature_matrix(samples, "samples"), as_feature_matrix(reference, "reference")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"samples and reference must have the same feature dimension, got {fake.shape[1]} "
                         f"and {real.shape[1]}")
    device = torch.device(device) if device is not None else fake.device
    centre = real.to(device, torch.float64).mean(0)  # translation-invariant; shrinks the cdist rounding error
    real = (real.to(device, torch.float64) - centre).to(dtype)
    fake = (fake.to(device, torch.float64) - centre).to(dtype)
    real_radii = knn_radii(real, k, block_elements)
    fake_radii = knn_radii(fake, k, block_elements)

    precise = torch.zeros(len(fake), dtype=torch.bool, device=device)      # fake j on the real manifold
    recalled = torch.zeros(len(real), dtype=torch.bool, device=device)     # real i on the fake manifold
    covered = torch.zeros(len(real), dtype=torch.bool, device=device)      # real ball i holds some fake
    in_real_balls = torch.zeros((), dtype=torch.int64, device=device)      # sum_j sum_i 1[Y_j in B(X_i, r_i)]
    rows = _rows_per_block(len(real), block_elements)
    for start in range(0, len(fake), rows):
        distances = torch.cdist(fake[start:start + rows], real)  # [b fake, N real]
        inside_real = distances <= real_radii[None, :]
        precise[start:start + rows] = inside_real.any(1)
        covered |= inside_real.any(0)
        in_real_balls += inside_real.sum()
        recalled |= (distances <= fake_radii[start:start + rows, None]).any(0)
    return {"precision": precise.double().mean().item(), "recall": recalled.double().mean().item(),
            "density": in_real_balls.item() / (k * len(fake)), "coverage": covered.double().mean().item()}
