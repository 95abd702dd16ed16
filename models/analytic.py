"""Analytic teachers: exact denoisers D(x, sigma) = E[x0 | x0 + sigma n = x] for distributions known in closed form.

With p_sigma = p_data * N(0, sigma^2 I), Tweedie's formula gives D(x, sigma) = x + sigma^2 grad log p_sigma(x), so the
probability-flow ODE dx/dsigma = (x - D) / sigma of these teachers is exact, and so is the map z -> x0 it defines.

- GaussianMixtureDenoiser: p = sum_k w_k N(mu_k, diag v_k);  D = sum_k r_k [mu_k + v_k / (v_k + sigma^2) (x - mu_k)],
  r_k = softmax_k(log w_k + log N(x; mu_k, v_k + sigma^2)).  For K = 1 the flow is linear: x(s) - mu ∝ sqrt(v + s^2).
- EmpiricalDenoiser: p = (1/N) sum_i delta(y_i), the optimum of denoising score matching on a finite set (it memorises):
  D = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i.
- PPCAMixtureDenoiser: a mixture of probabilistic PCA (Tipping & Bishop 1999), C_k = W_k W_k^T + s_k^2 I, stored in the
  eigenbasis U_k (D x q, orthonormal) of W_k W_k^T: C_k = U_k diag(lam_k) U_k^T + s_k^2 (I - U_k U_k^T), W_k = U_k
  (diag(lam_k) - s_k^2 I)^(1/2).  D = sum_k r_k [mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)], applied in that basis.

All compute in their buffers' dtype (float64 unless the module is cast) and return x's dtype. Buffers are named as
the constructor's arguments, so a teacher is restored with `Cls(**torch.load(path, weights_only=True))`. `sigma_data`
is sqrt of the per-coordinate variance averaged over coordinates; `shape` is the per-sample shape. class_labels: int64
[B] indices, or float one-hot [B, num_classes] (an all-zero row means unconditional).
"""
import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def _flat_input(x, shape, dtype):
    """x [B, *shape] as a [B, D] matrix of the teacher's dtype."""
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected x of shape [B, {', '.join(map(str, shape))}]; got {list(x.shape)}")
    return x.reshape(x.shape[0], -1).to(dtype)


def _sigma_squared(sigma, like):
    """sigma (float, 0-dim or [B] tensor) as sigma^2 of shape [B, 1], with the dtype and device of `like` [B, D]."""
    batch = like.shape[0]
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"expected sigma as a number or a [{batch}] tensor; got shape {list(sigma.shape)}")
    return (sigma**2)[:, None]


def _label_indices(class_labels, batch, num_classes):
    """class_labels as int64 [B] with -1 for unconditional rows, or None."""
    if class_labels is None:
        return None
    if class_labels.is_floating_point() and class_labels.shape == (batch, num_classes):
        is_one = class_labels == 1
        if not bool(((class_labels == 0) | is_one).all()) or bool((is_one.sum(1) > 1).any()):
            raise ValueError("float class_labels must be one-hot rows (or all-zero rows for unconditional)")
        return torch.where(is_one.any(1), class_labels.argmax(1), -1)
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.shape != (batch,):
        raise ValueError(f"class_labels must be int indices [{batch}] or one-hot float [{batch}, {num_classes}]; "
                         f"got {class_labels.dtype} {list(class_labels.shape)}")
    if bool(((class_labels < 0) | (class_labels >= num_classes)).any()):
        raise ValueError(f"class_labels must lie in [0, {num_classes}); got values {class_labels.unique().tolist()}")
    return class_labels.long()


def _mask_components(log_weights, labels, component_labels):
    """log_weights [K] -> [B, K] with components not of row b's class set to -inf (rows with label -1 untouched)."""
    allowed = (component_labels[None, :] == labels[:, None]) | (labels[:, None] < 0)
    if not bool(allowed.any(1).all()):
        raise ValueError(f"no mixture component has class {labels[~allowed.any(1)].unique().tolist()}")
    return log_weights.expand(labels.shape[0], -1).masked_fill(~allowed, -math.inf)


def _draw_components(weights, component_labels, class_labels, n, generator):
    """n component indices [n] (on the CPU) drawn by weight, restricted to each row's class when labels are given."""
    probs = weights.detach().cpu().expand(n, -1)
    if class_labels is not None:
        labels = _label_indices(class_labels.cpu(), n, int(component_labels.max()) + 1)
        probs = _mask_components(probs.log(), labels, component_labels.cpu()).exp()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]


def _mixture_variance(means, second_moments, weights):
    """sqrt(mean_d Var[x_d]) of a mixture from component means [K, D], E[x_d^2 | k] [K, D] and weights [K]."""
    w = weights / weights.sum()
    mean = w @ means
    return float((w @ second_moments - mean**2).clamp_min(0).mean().sqrt())


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of a Gaussian mixture with diagonal covariances; class_labels pick a component."""

    def __init__(self, means, variances, weights):
        super().__init__()
        if means.ndim < 2 or variances.shape != means.shape or weights.shape != means.shape[:1]:
            raise ValueError(f"expected means [K, *shape], variances like means, weights [K]; got "
                             f"{list(means.shape)}, {list(variances.shape)}, {list(weights.shape)}")
        if not bool((variances > 0).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("mixture variances must be > 0 and weights >= 0 with a positive sum")
        self.shape = tuple(means.shape[1:])
        self.num_classes = means.shape[0]
        self.register_buffer("means", means.to(torch.float64))
        self.register_buffer("variances", variances.to(torch.float64))
        self.register_buffer("weights", weights.to(torch.float64) / weights.sum())
        mu, v = self.means.flatten(1), self.variances.flatten(1)
        self.sigma_data = _mixture_variance(mu, v + mu**2, self.weights)

    @classmethod
    def from_data(cls, dataset):
        """The exact teacher of a `data.mixtures.GaussianMixtureData`."""
        if not hasattr(dataset, "params"):
            raise ValueError(f"from_data needs a GaussianMixtureData (with .params); got {type(dataset).__name__}")
        return cls(**dataset.params)

    def _log_responsibility_terms(self, x, sigma2):
        """log w_k + log N(x; mu_k, v_k + sigma^2) as [B, K], and the per-component posterior means [B, K, D]."""
        mu, v = self.means.flatten(1), self.variances.flatten(1)
        total = v[None] + sigma2[:, :, None]
        diff = x[:, None, :] - mu[None]
        log_normal = -0.5 * (diff**2 / total + total.log() + LOG_2PI).sum(-1)
        return self.weights.log() + log_normal, mu + v / total * diff

    def forward(self, x, sigma, class_labels=None):
        flat = _flat_input(x, self.shape, self.means.dtype)
        labels = _label_indices(class_labels, x.shape[0], self.num_classes)
        logits, x0_k = self._log_responsibility_terms(flat, _sigma_squared(sigma, flat))
        if labels is not None:
            components = torch.arange(self.num_classes, device=x.device)
            logits = logits + _mask_components(torch.zeros_like(self.weights), labels, components)
        x0_hat = (logits.softmax(-1)[:, :, None] * x0_k).sum(1)
        return x0_hat.reshape(x.shape).to(x.dtype)

    def log_prob(self, x, sigma):
        """log p_sigma(x) [B] of the noised mixture (differentiable in x)."""
        flat = _flat_input(x, self.shape, self.means.dtype)
        return self._log_responsibility_terms(flat, _sigma_squared(sigma, flat))[0].logsumexp(-1)

    def sample(self, n, generator=None, class_labels=None):
        """n draws of x0, [n, *shape]; class_labels [n] fix the component of each draw."""
        component = _draw_components(self.weights, torch.arange(self.num_classes), class_labels, n, generator)
        noise = torch.randn((n,) + self.shape, generator=generator, dtype=self.means.dtype).to(self.means.device)
        component = component.to(self.means.device)
        return self.means[component] + self.variances[component].sqrt() * noise

    def exact_flow(self, x, sigma_from, sigma_to):
        """Closed-form probability-flow ODE solution from sigma_from to sigma_to (single Gaussian only)."""
        if self.num_classes != 1:
            raise ValueError(f"exact_flow is closed-form only for a single Gaussian (K = 1); this mixture has "
                             f"K = {self.num_classes}")
        flat = _flat_input(x, self.shape, self.means.dtype)
        s2_from, s2_to = _sigma_squared(sigma_from, flat), _sigma_squared(sigma_to, flat)
        mu, v = self.means.flatten(1), self.variances.flatten(1)
        out = mu + ((v + s2_to) / (v + s2_from)).sqrt() * (flat - mu)
        return out.reshape(x.shape).to(x.dtype)


class EmpiricalDenoiser(nn.Module):
    """Exact denoiser of the empirical distribution of `data` [N, *shape] (the memorising optimum of DSM).

    The softmax over N runs chunk by chunk with a running max (online log-sum-exp), so memory stays
    O(B * chunk_size); chunk_size=None picks about 4M logits per chunk. sigma -> 0 gives the nearest data point,
    sigma -> inf the data mean. Data is kept in float64: at sigma ~ 1e-3 float32 logits would be off by O(1).
    """

    def __init__(self, data, labels=None, chunk_size=None):
        super().__init__()
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"expected data [N, *shape] with N >= 1; got {list(data.shape)}")
        if labels is not None and (labels.shape != data.shape[:1] or labels.is_floating_point()):
            raise ValueError(f"expected int labels [{data.shape[0]}]; got {labels.dtype} {list(labels.shape)}")
        self.shape = tuple(data.shape[1:])
        self.chunk_size = chunk_size
        self.register_buffer("data", data.to(torch.float64))
        self.register_buffer("labels", None if labels is None else labels.long())
        self.register_buffer("_half_sq_norms", 0.5 * self.data.flatten(1).pow(2).sum(1), persistent=False)
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        self.sigma_data = float(self.data.flatten(1).var(0, unbiased=False).mean().sqrt())

    def forward(self, x, sigma, class_labels=None):
        flat = _flat_input(x, self.shape, self.data.dtype)
        sigma2 = _sigma_squared(sigma, flat)
        points, half_sq = self.data.flatten(1), self._half_sq_norms
        if class_labels is None:
            return self._posterior_mean(flat, sigma2, points, half_sq).reshape(x.shape).to(x.dtype)
        if self.labels is None:
            raise ValueError("class_labels given, but this EmpiricalDenoiser was built without labels")
        labels = _label_indices(class_labels, x.shape[0], self.num_classes)
        x0_hat = torch.zeros_like(flat)
        for label in labels.unique().tolist():
            rows = labels == label
            members = slice(None) if label < 0 else self.labels == label
            if label >= 0 and not bool(members.any()):
                raise ValueError(f"class {label} has no data points in this EmpiricalDenoiser")
            x0_hat[rows] = self._posterior_mean(flat[rows], sigma2[rows], points[members], half_sq[members])
        return x0_hat.reshape(x.shape).to(x.dtype)

    def _posterior_mean(self, x, sigma2, points, half_sq_norms):
        """sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i; ||x||^2 is constant in i and dropped."""
        chunk = self.chunk_size or max(1, 2**22 // max(1, x.shape[0]))
        inv_sigma2 = 1 / sigma2.clamp_min(1e-20)
        running_max = torch.full_like(sigma2, -math.inf)
        total = torch.zeros_like(sigma2)
        weighted_sum = torch.zeros_like(x)
        for start in range(0, points.shape[0], chunk):
            y = points[start:start + chunk]
            logits = (x @ y.T - half_sq_norms[start:start + chunk]) * inv_sigma2
            new_max = torch.maximum(running_max, logits.amax(1, keepdim=True))
            rescale = (running_max - new_max).exp()
            p = (logits - new_max).exp()
            total = total * rescale + p.sum(1, keepdim=True)
            weighted_sum = weighted_sum * rescale + p @ y
            running_max = new_max
        return weighted_sum / total


class PPCAMixtureDenoiser(nn.Module):
    """Exact denoiser of a mixture of probabilistic PCA models; build one with `PPCAMixtureDenoiser.fit(images)`.

    means [K, *shape], basis U [K, D, q] (orthonormal columns), eigenvalues lam [K, q] (>= noise variance),
    noise_variances s^2 [K], weights [K], component_labels [K] (the class of each component; default: its index).
    Per call the cost is O(B K D q): (C + sigma^2 I)^-1 acts as 1/(lam + sigma^2) on span U and 1/(s^2 + sigma^2)
    on its complement, so no D x D matrix is ever formed.
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
