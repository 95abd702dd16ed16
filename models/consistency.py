"""The consistency function f(x, sigma): a backbone with the boundary-condition parameterisation of consistency models.

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Sec. 3 and App. C (Eq. 5 and its EDM form):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / ((sigma - eps)^2 + sd^2),   c_out = sd (sigma - eps) / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),            c_noise = ln(sigma) / 4 (the project's label, models.noise)

with eps = sigma_min, so f(x, eps) = x exactly (c_skip = 1, c_out = 0) whatever F is: the boundary condition holds
by construction. Far from eps the coefficients are EDM's (Karras et al. 2022, Table 1), so a student built on a
copy of an EDM teacher's backbone starts close to the teacher's denoiser (the paper initialises CD this way).
It is a models.denoiser.Denoiser with other coefficients: it takes (x, sigma[, class_labels]) and returns an
estimate of the ODE trajectory's end point x(eps) rather than the posterior mean.
"""
from models.denoiser import Denoiser, preconditioning
from models.noise import append_dims, edm_log_noise_label, sigma_batch


def consistency_preconditioning(sigma, sigma_data=0.5, sigma_min=0.002):
    """(c_skip, c_out, c_in, c_noise) of the consistency parameterisation (module docstring)."""
    s, sd = sigma, sigma_data
    c_skip = sd**2 / ((s - sigma_min) ** 2 + sd**2)
    c_out = sd * (s - sigma_min) / (s**2 + sd**2).sqrt()
    c_in = (s**2 + sd**2).rsqrt()
    return c_skip, c_out, c_in, edm_log_noise_label(s)


class ConsistencyFunction(Denoiser):
    """f(x, sigma) with f(x, sigma_min) = x (Song et al. 2023, Eq. 5 with EDM's coefficients)."""

    def __init__(self, backbone, sigma_data=0.5, sigma_min=0.002):
        super().__init__(backbone, "edm", sigma_data)
        if not sigma_min > 0:
            raise ValueError(f"a consistency function needs sigma_min > 0 (its boundary), got {sigma_min!r}")
        self.sigma_min = float(sigma_min)

    def coefficients(self, sigma):
        return consistency_preconditioning(sigma, self.sigma_data, self.sigma_min)


class BoundaryShifted:
    """f(x, sigma) from an EDM-parameterised denoiser D trained without the boundary shift (ECT trains the plain EDM
    coefficients and switches to the shifted ones to sample): D = c_skip x + c_out F gives F, and

        f = c_skip' x + (c_out' / c_out) (D(x, sigma) - c_skip x)        (primes: consistency_preconditioning)

    so every evaluation is one call of D (a wrapper that counts D's calls still counts them)."""

    def __init__(self, denoiser, sigma_data=0.5, sigma_min=0.002):
        self.denoiser, self.sigma_data, self.sigma_min = denoiser, float(sigma_data), float(sigma_min)

    def __call__(self, x, sigma, class_labels=None):
        denoised = self.denoiser(x, sigma, class_labels)
        sigma = append_dims(sigma_batch(sigma, x), x.ndim)
        c_skip, c_out = preconditioning("edm", sigma, self.sigma_data)[:2]
        shifted_skip, shifted_out = consistency_preconditioning(sigma, self.sigma_data, self.sigma_min)[:2]
        return shifted_skip * x + (shifted_out / c_out) * (denoised - c_skip * x)
