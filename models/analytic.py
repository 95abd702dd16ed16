"""Analytic teachers: exact denoisers D(x, sigma) = E[x0 | x0 + sigma n = x] for distributions known in closed form.

With p_sigma = p_data * N(0, sigma^2 I), Tweedie's formula gives D(x, sigma) = x + sigma^2 grad log p_sigma(x), so the
probability-flow ODE dx/dsigma = (x - D) / sigma of these teachers is exact, and so is the map z -> x0 it defines.

- GaussianMixtureDenoiser: p = sum_k w_k N(mu_k, diag v_k);  D = sum_k r_k [mu_k + v_k / (v_k + sigma^2) (x - mu_k)],
  r_k = softmax_k(log w_k + log N(x; mu_k, v_k + sigma^2)).  For K = 1 the flow is linear: x(s) - mu ∝ sqrt(v + s^2).
- EmpiricalDenoiser: p = (1/N) sum_i delta(y_i), the optimum of denoising score matching on a finite set (it memorises):
  D = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i.
- PPCAMixtureDenoiser (models/ppca.py): a mixture of probabilistic PCA fitted to images, with exact D.

All compute in their buffers' dtype (float64 unless the module is cast) and return x's dtype. Buffers are named as
the constructor's arguments. `teacher.export_state()` is a dict of plain tensors and python values (it loads with
torch.load(weights_only=True)) from which `Cls.from_state(state)` rebuilds the same teacher, bit for bit and with the
same data.trajectories.fingerprint, without fitting anything again: a student's checkpoint stores its analytic
teacher this way (runs/teacher.py, teacher_record). `sigma_data`
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


class AnalyticTeacher(nn.Module):
    """What the analytic teachers share: export to plain tensors and exact reconstruction from them."""

    def export_state(self):
        """{"buffers": the persistent buffers (the constructor's arguments), "dtype": the module's float dtype,
        "sigma_data": float}: plain tensors on the CPU and python values, for a checkpoint."""
        buffers = {name: value.detach().cpu().clone() for name, value in self.state_dict().items()}
        dtype = next(v.dtype for v in buffers.values() if v.is_floating_point())
        return {"buffers": buffers, "options": self._options(), "dtype": str(dtype).removeprefix("torch."),
                "sigma_data": float(self.sigma_data)}

    def _options(self):
        """Constructor arguments that are not buffers (python values)."""
        return {}

    @classmethod
    def from_state(cls, state):
        """The teacher `export_state()` described, rebuilt exactly (the saved buffers and sigma_data, not
        values recomputed from them: a mixture's weights are not renormalised twice). A state that is not one
        is a ValueError."""
        try:
            buffers, dtype, sigma_data = dict(state["buffers"]), getattr(torch, state["dtype"]), state["sigma_data"]
            teacher = cls(**buffers, **state.get("options", {})).to(dtype)
            for name, value in buffers.items():
                getattr(teacher, name).copy_(value)
        except (KeyError, TypeError, AttributeError, RuntimeError) as error:
            raise ValueError(f"not a saved {cls.__name__} state ({type(error).__name__}: {error})") from None
        teacher.sigma_data = float(sigma_data)
        return teacher


class GaussianMixtureDenoiser(AnalyticTeacher):
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


class EmpiricalDenoiser(AnalyticTeacher):
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

    def _options(self):
        return {"chunk_size": self.chunk_size}

    def export_state(self):
        """As AnalyticTeacher's, with the points stored in float32 when that loses nothing (data read from float32
        images, as a fitted teacher's are): half the size in a checkpoint, the same teacher when rebuilt."""
        state = super().export_state()
        data = state["buffers"]["data"]
        if data.dtype == torch.float64 and torch.equal(data.float().double(), data):
            state["buffers"]["data"] = data.float()
        return state

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
