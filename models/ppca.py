"""Mixture of probabilistic PCA (Tipping & Bishop 1999) fitted to images, with its exact denoiser.

C_k = W_k W_k^T + s_k^2 I is stored in the eigenbasis U_k (D x q, orthonormal) of W_k W_k^T:
C_k = U_k diag(lam_k) U_k^T + s_k^2 (I - U_k U_k^T), W_k = U_k (diag(lam_k) - s_k^2 I)^(1/2), and
D(x, sigma) = sum_k r_k [mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)], r_k ∝ w_k N(x; mu_k, C_k + sigma^2 I), applied in
that basis. Conventions (buffers, dtypes, class_labels) as in models/analytic.py.
"""

import torch

from models.analytic import (LOG_2PI, AnalyticTeacher, _draw_components, _flat_input, _label_indices,
                             _mask_components, _mixture_variance, _sigma_squared)


class PPCAMixtureDenoiser(AnalyticTeacher):
    """Exact denoiser of a mixture of probabilistic PCA models; build one with `PPCAMixtureDenoiser.fit(images)`.

    means [K, *shape], basis U [K, D, q] (orthonormal columns), eigenvalues lam [K, q] (>= noise variance),
    noise_variances s^2 [K], weights [K], component_labels [K] (the class of each component; default: its index).
    Per call the cost is O(B K D q): (C + sigma^2 I)^-1 acts as 1/(lam + sigma^2) on span U and 1/(s^2 + sigma^2)
    on its complement, so no D x D matrix is ever formed. A fitted mixture is saved with `export_state()` and rebuilt,
    exactly and without fitting, with `PPCAMixtureDenoiser.from_state(state)` (models.analytic.AnalyticTeacher).
    """

    def __init__(self, means, basis, eigenvalues, noise_variances, weights, component_labels=None):
        super().__init__()
        K, D = means.shape[0], means[0].numel()
        q = basis.shape[-1] if basis.ndim == 3 else -1
        if (basis.shape != (K, D, q) or eigenvalues.shape != (K, q) or noise_variances.shape != (K,)
                or weights.shape != (K,) or not 0 < q < D):
            raise ValueError(f"expected means [K, *shape], basis [K, D, q] with 0 < q < D, eigenvalues [K, q], "
                             f"noise_variances [K], weights [K]; got {list(means.shape)}, {list(basis.shape)}, "
                             f"{list(eigenvalues.shape)}, {list(noise_variances.shape)}, {list(weights.shape)}")
        if not bool((noise_variances > 0).all()) or bool((eigenvalues < noise_variances[:, None]).any()):
            raise ValueError("PPCA noise_variances must be > 0 and eigenvalues >= their component's noise variance")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("PPCA mixture weights must be >= 0 with a positive sum")
        if component_labels is None:
            component_labels = torch.arange(K)
        self.shape = tuple(means.shape[1:])
        self.register_buffer("means", means.to(torch.float64))
        self.register_buffer("basis", basis.to(torch.float64))
        self.register_buffer("eigenvalues", eigenvalues.to(torch.float64))
        self.register_buffer("noise_variances", noise_variances.to(torch.float64))
        self.register_buffer("weights", weights.to(torch.float64) / weights.sum())
        self.register_buffer("component_labels", component_labels.long().to(means.device))
        self.num_classes = int(self.component_labels.max()) + 1
        # diag(C_k) = sum_j U_dj^2 (lam_j - s^2) + s^2
        diag = torch.einsum("kdq,kq->kd", self.basis**2, self.eigenvalues - self.noise_variances[:, None])
        mu = self.means.flatten(1)
        self.sigma_data = _mixture_variance(mu, diag + self.noise_variances[:, None] + mu**2, self.weights)

    @property
    def factor_loadings(self):
        """Tipping & Bishop's W_k = U_k (diag(lam_k) - s_k^2 I)^(1/2), [K, D, q]."""
        return self.basis * (self.eigenvalues - self.noise_variances[:, None]).sqrt()[:, None, :]

    def _terms(self, x, sigma2):
        """log w_k + log N(x; mu_k, C_k + sigma^2 I) [B, K], coordinates U_k^T (x - mu_k) [B, K, q], lam + sigma^2."""
        mu, U, D = self.means.flatten(1), self.basis, x.shape[1]
        proj = torch.einsum("bd,kdq->bkq", x, U) - torch.einsum("kd,kdq->kq", mu, U)
        dist2 = (x**2).sum(1, keepdim=True) - 2 * x @ mu.T + (mu**2).sum(1)
        off_subspace2 = (dist2 - (proj**2).sum(-1)).clamp_min(0)
        lam_total = self.eigenvalues + sigma2[:, :, None]
        iso_total = self.noise_variances + sigma2
        log_det = lam_total.log().sum(-1) + (D - U.shape[-1]) * iso_total.log()
        mahalanobis = (proj**2 / lam_total).sum(-1) + off_subspace2 / iso_total
        return self.weights.log() - 0.5 * (mahalanobis + log_det + D * LOG_2PI), proj, lam_total

    def forward(self, x, sigma, class_labels=None):
        flat = _flat_input(x, self.shape, self.means.dtype)
        sigma2 = _sigma_squared(sigma, flat)
        logits, proj, lam_total = self._terms(flat, sigma2)
        if class_labels is not None:
            labels = _label_indices(class_labels, x.shape[0], self.num_classes)
            logits = logits + _mask_components(torch.zeros_like(self.weights), labels, self.component_labels)
        r = logits.softmax(-1)
        # mu_k + C_k (C_k + sigma^2)^-1 (x - mu_k) = mu_k + a_k (x - mu_k) + U_k [(lam / (lam + sigma^2) - a_k) proj]
        # with a_k = s_k^2 / (s_k^2 + sigma^2), the shrinkage off span U_k
        a = self.noise_variances / (self.noise_variances + sigma2)
        in_subspace = r[:, :, None] * (self.eigenvalues / lam_total - a[:, :, None]) * proj
        x0_hat = ((r * a).sum(1, keepdim=True) * flat + (r * (1 - a)) @ self.means.flatten(1)
                  + torch.einsum("bkq,kdq->bd", in_subspace, self.basis))
        return x0_hat.reshape(x.shape).to(x.dtype)

    def log_prob(self, x, sigma):
        """log p_sigma(x) [B] of the noised mixture (differentiable in x)."""
        flat = _flat_input(x, self.shape, self.means.dtype)
        return self._terms(flat, _sigma_squared(sigma, flat))[0].logsumexp(-1)

    def sample(self, n, generator=None, class_labels=None):
        """n draws x0 = mu_k + W_k z + s_k e, [n, *shape]; class_labels [n] restrict each draw's class."""
        component = _draw_components(self.weights, self.component_labels, class_labels, n, generator)
        K, D, q = self.basis.shape
        z = torch.randn(n, q, generator=generator, dtype=self.means.dtype).to(self.means.device)
        e = torch.randn(n, D, generator=generator, dtype=self.means.dtype).to(self.means.device)
        x0 = torch.empty(n, D, dtype=self.means.dtype, device=self.means.device)
        W, mu = self.factor_loadings, self.means.flatten(1)
        for k in component.unique().tolist():
            rows = (component == k).to(self.means.device)
            x0[rows] = mu[k] + z[rows] @ W[k].T + self.noise_variances[k].sqrt() * e[rows]
        return x0.reshape((n,) + self.shape)

    @classmethod
    def fit(cls, images, components=10, rank=16, labels=None, iters=3, kmeans_iters=20, seed=0, min_variance=None):
        """Fit a mixture of PPCA to images [N, C, H, W] (or any [N, *shape]) by maximum likelihood.

        Method: k-means++ seeding and `kmeans_iters` Lloyd steps give hard clusters; each cluster gets the closed-form
        PPCA fit of Tipping & Bishop (1999): from the eigendecomposition of its sample covariance, U = top-q
        eigenvectors, s^2 = mean of the D - q discarded eigenvalues, W = U (L_q - s^2 I)^(1/2). Then `iters` EM steps:
        responsibilities under the current mixture, and the same closed-form fit to each component's
        responsibility-weighted covariance (the exact M-step for a mixture of PPCA). With labels, each class gets
        its own `components` components (weights = class frequency x within-class weight) and class_labels
        condition on them. min_variance (default 1e-6 x the mean per-coordinate data variance) floors s^2.
        """
        if images.ndim < 2:
            raise ValueError(f"expected images [N, C, H, W] or [N, D]; got {list(images.shape)}")
        X = images.reshape(images.shape[0], -1).to(torch.float64)
        D = X.shape[1]
        if int(rank) != rank or not 0 < rank < D:
            raise ValueError(f"PPCA rank must be an integer in [1, {D - 1}] for data of dimension {D}; got {rank!r}")
        if int(components) != components or components < 1 or int(iters) != iters or iters < 0:
            raise ValueError(f"components must be >= 1 and iters >= 0; got {components!r}, {iters!r}")
        if labels is not None and (labels.shape != X.shape[:1] or labels.is_floating_point()):
            raise ValueError(f"expected int labels [{X.shape[0]}]; got {labels.dtype} {list(labels.shape)}")
        if min_variance is None:
            min_variance = max(1e-6 * float(X.var(0, unbiased=False).mean()), 1e-12)
        generator = torch.Generator().manual_seed(int(seed))
        groups = [(None, X)] if labels is None else [(c, X[labels == c]) for c in labels.unique().tolist()]
        parts = []
        for label, points in groups:
            if points.shape[0] < components:
                raise ValueError(f"cannot fit {components} components to {points.shape[0]} points"
                                 + ("" if label is None else f" of class {label}"))
            params = _fit_group(points, int(components), int(rank), int(iters), int(kmeans_iters), min_variance,
                                generator)
            params["weights"] = params["weights"] * points.shape[0] / X.shape[0]
            params["component_labels"] = torch.full((components,), -1 if label is None else label)
            parts.append(params)
        params = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        if labels is None:
            params["component_labels"] = None
        params["means"] = params["means"].reshape((-1,) + tuple(images.shape[1:]))
        return cls(**params).to(images.device)


def _kmeans(X, K, iters, generator):
    """Hard cluster assignments [N] by k-means++ seeding and Lloyd steps (empty clusters are re-seeded)."""
    centres = X[torch.randint(X.shape[0], (1,), generator=generator)]
    nearest_d2 = ((X - centres[0]) ** 2).sum(1)
    for _ in range(K - 1):  # k-means++: the next centre is drawn with probability proportional to d^2
        if float(nearest_d2.sum()) > 0:
            index = torch.multinomial(nearest_d2, 1, generator=generator)
        else:
            index = torch.randint(X.shape[0], (1,), generator=generator)
        centres = torch.cat([centres, X[index]])
        nearest_d2 = torch.minimum(nearest_d2, ((X - X[index]) ** 2).sum(1))
    half_sq = 0.5 * (X**2).sum(1)
    previous = None
    for step in range(iters + 1):
        scores = X @ centres.T - 0.5 * (centres**2).sum(1)  # = (||x||^2 - ||x - c||^2) / 2: argmax is the nearest
        assign = scores.argmax(1)
        if step == iters or (previous is not None and bool((assign == previous).all())):
            return assign
        previous = assign
        members = torch.nn.functional.one_hot(assign, K).to(X.dtype)
        counts, sums = members.sum(0), members.T @ X
        farthest = (half_sq - scores.amax(1)).argsort(descending=True)
        for j, k in enumerate((counts == 0).nonzero()[:, 0].tolist()):  # an empty cluster takes a far point
            sums[k], counts[k] = X[farthest[j]], 1
        centres = sums / counts[:, None]


def _ppca_fit(points, resp, rank, min_variance):
    """Closed-form PPCA of the resp-weighted points: (mean [D], U [D, q], lam [q], s^2)."""
    mass = resp.sum()
    mean = resp @ points / mass
    Y = (points - mean) * (resp / mass).sqrt()[:, None]  # covariance = Y^T Y
    total_variance = (Y**2).sum()
    n, D = Y.shape
    if rank < n < D:  # the n x n Gram matrix shares the nonzero spectrum and is smaller
        lam, V = torch.linalg.eigh(Y @ Y.T)
        lam, V = lam.flip(0)[:rank], V.flip(1)[:, :rank]
        U = Y.T @ V / lam.clamp_min(1e-300).sqrt() if bool((lam > 1e-12 * total_variance).all()) else None
    else:
        U = None
    if U is None:
        lam, U = torch.linalg.eigh(Y.T @ Y)
        lam, U = lam.flip(0)[:rank], U.flip(1)[:, :rank]
    noise_variance = ((total_variance - lam.sum()) / (D - rank)).clamp_min(min_variance)
    return mean, U, lam.clamp_min(noise_variance), noise_variance


def _fit_group(X, K, rank, iters, kmeans_iters, min_variance, generator):
    """A K-component mixture of PPCA fitted to X [N, D]: k-means, closed-form PPCA per cluster, then EM."""
    resp = torch.nn.functional.one_hot(_kmeans(X, K, kmeans_iters, generator), K).to(torch.float64)
    params = None
    iters = iters if K > 1 else 0  # one component: the closed-form fit is already the maximum likelihood
    for step in range(iters + 1):
        if step > 0:  # E-step under the current mixture
            logits = PPCAMixtureDenoiser(**params)._terms(X, torch.zeros(X.shape[0], 1, dtype=X.dtype))[0]
            resp = logits.softmax(-1)
        fits = []
        for k in range(K):
            active = resp[:, k] > 1e-10  # negligible responsibilities do not change the fit
            if float(resp[active, k].sum()) < 1 and params is not None:  # a dying component keeps its last fit
                fits.append((params["means"][k], params["basis"][k], params["eigenvalues"][k],
                             params["noise_variances"][k]))
            else:
                fits.append(_ppca_fit(X[active], resp[active, k], rank, min_variance))
        means, basis, eigenvalues, noise_variances = (torch.stack(t) for t in zip(*fits))
        params = dict(means=means, basis=basis, eigenvalues=eigenvalues, noise_variances=noise_variances,
                      weights=resp.sum(0) / X.shape[0])
    return params
