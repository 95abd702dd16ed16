"""Easy consistency tuning (ECT): Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency Models Made Easy".

Consistency training in continuous time, started from a trained diffusion model (the authors call that stage 0),
with the gap between the two levels shrinking stage by stage (the step's stage s = step // stage_steps):

    t ~ lognormal: ln t ~ N(P_mean, P_std^2)                               P_mean = -1.1, P_std = 2.0
    r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))                     q = 2, k = 8, b = 1 ("sigmoid" mapping)
    x_t = x0 + t z,  x_r = x0 + r z                                        the same z
    L = d(D_theta(x_t, t), SG D_theta(x_r, r)) / (t - r),    SG D(x_r, r) := x0 where r = 0
    d(a, b) = sqrt(||a - b||^2 + c^2) - c                                  c = 0: the plain L2 norm (the default)

(at s = 0, r = 0 whenever t < ln 7, so the first stage regresses on the clean image: diffusion pretraining). No EMA
target (SG of the student itself, one dropout mask for both passes: objectives/consistency.py). The student trains
with EDM's plain coefficients (a models.denoiser.Denoiser) and samples through the boundary-shifted ones
(models.consistency.BoundaryShifted), as the authors' code does. Defaults: CIFAR-10's stage length, 25k iterations
at batch 128, and its two-step re-noising level 0.821. The student starts from the teacher's weights (required by
the method; with an analytic teacher it starts from random weights).
"""
import torch

from models.consistency import BoundaryShifted
from models.denoiser import Denoiser
from models.noise import append_dims
from objectives.consistency import ConsistencyObjective
from objectives.distances import make_distance


class ECT(ConsistencyObjective):
    """ECT (Geng et al. 2024): continuous-time consistency tuning of a teacher-initialised denoiser."""

    needs_teacher = True

    def __init__(self, backbone, teacher=None, p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0, stage_steps=25000,
                 huber_c=0.0, sigma_min=0.002, sigma_max=80.0, rho=7.0, sample_sigmas=(0.821,)):
        if teacher is None:
            raise ValueError("ect tunes a trained diffusion model: pass --teacher RUN (an edm denoiser)")
        if not (p_std > 0 and q > 1 and k >= 0 and b > 0 and huber_c >= 0):
            raise ValueError(f"ect needs p_std > 0, q > 1, k >= 0, b > 0, huber_c >= 0; got p_std={p_std}, q={q}, "
                             f"k={k}, b={b}, huber_c={huber_c}")
        if int(stage_steps) != stage_steps or stage_steps < 1:
            raise ValueError(f"ect stage_steps must be an integer >= 1; got {stage_steps!r}")
        super().__init__(backbone, teacher, sigma_min, sigma_max, rho, sample_sigmas=sample_sigmas)
        self.p_mean, self.p_std, self.q, self.k, self.b = float(p_mean), float(p_std), float(q), float(k), float(b)
        self.stage_steps = int(stage_steps)
        self.distance = make_distance("pseudo_huber", c=float(huber_c))

    def make_student(self, backbone, sigma_data):
        return Denoiser(backbone, "edm", sigma_data)

    def r_of_t(self, t, step):
        """The lower level r for levels t at `step` (the "sigmoid" mapping above)."""
        shrink = self.q ** -(step // self.stage_steps + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - shrink)).clamp_min(0)

    def levels(self, n, device, step):
        t = (self.p_mean + self.p_std * torch.randn(n, device=device)).exp()
        return t, self.r_of_t(t, step)

    def weight(self, sigma_hi, sigma_lo):
        return 1 / (sigma_hi - sigma_lo)

    def target_values(self, x_lo, sigma_lo, x0, labels, step):
        at_r = self.target_network(step)(x_lo, sigma_lo.clamp_min(1e-20), labels).nan_to_num()
        return torch.where(append_dims(sigma_lo > 0, x0.ndim), at_r, x0)

    def consistency_function(self):
        return BoundaryShifted(self.networks["student"], self.sigma_data, self.sigma_min)
