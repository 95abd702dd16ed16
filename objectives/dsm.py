"""Denoising score matching for diffusion teachers, in EDM's formulation.

Karras et al. 2022 (EDM), Eq. 2 and Sec. 5 / Table 1: minimise E_{x0, sigma, n} [ lambda(sigma) ||D(x0 + sigma n,
sigma) - x0||^2 ] with sigma ~ p_train. The parameterisation (`models.denoiser`) decides what the network predicts;
the weighting decides lambda:

  weighting="target"  lambda = 1 / c_out^2: plain MSE on the network's own target F. For `edm` this is EDM's
                      lambda = (s^2 + sd^2)/(s sd)^2; for `eps` it is DDPM's eps-MSE (Ho et al. 2020, L_simple);
                      for `v` the v-MSE of Salimans & Ho 2022; for `flow` the velocity MSE of flow matching
                      (Lipman et al. 2023, Liu et al. 2023); for `x0` plain x0-MSE.
  weighting="edm"     EDM's lambda whatever the parameterisation.
  weighting="uniform" lambda = 1 (x0-MSE).

Sigma sampling ("sigma_sampler"):
  lognormal  ln sigma ~ N(P_mean, P_std^2), EDM's -1.2, 1.2
  vp         t ~ U(eps_t, 1), sigma = vp_sigma(t) (Song et al. 2021, VP SDE)
  flow       t ~ U(0, 1) (or logit-normal with flow_logit_normal=True, Esser et al. 2024), sigma = t / (1 - t)
"""
import torch

from models.denoiser import Denoiser, preconditioning
from models.noise import append_dims, flow_sigma, vp_sigma
from objectives.base import Objective, choose, pick
from solvers import SCHEDULES, SOLVERS, options_for_nfe, schedule_kwargs, sigmas_for_nfe

SIGMA_SAMPLERS = ("lognormal", "vp", "flow")
WEIGHTINGS = ("target", "edm", "uniform")


def loss_weight(weighting, parameterisation, sigma, sigma_data):
    """lambda(sigma) of one of WEIGHTINGS (module docstring) for a denoiser of `parameterisation`."""
    if weighting == "uniform":
        return torch.ones_like(sigma)
    kind = "edm" if weighting == "edm" else parameterisation
    c_out = preconditioning(kind, sigma, sigma_data)[1]
    return 1 / c_out**2


def denoising_loss(denoiser, x0, sigma, weight, class_labels=None):
    """EDM's Eq. 2 on a batch: mean_b weight_b * mean_elements (D(x0 + sigma_b n, sigma_b) - x0)^2, n ~ N(0, I) drawn
    here; sigma and weight are [B]. Used by DSM and by the fake scores of the distribution-matching objectives."""
    noise = torch.randn_like(x0)
    x0_hat = denoiser(x0 + append_dims(sigma, x0.ndim) * noise, sigma, class_labels)
    per_sample = (x0_hat - x0).float().square().flatten(1).mean(1)
    return (weight * per_sample).mean()


class DSM(Objective):
    """Diffusion teacher by denoising score matching (EDM; eps / v / x0 / flow-matching variants)."""

    def __init__(self, backbone, parameterisation="edm", sigma_data=0.5, sigma_sampler="lognormal",
                 weighting="target", P_mean=-1.2, P_std=1.2, vp_eps_t=1e-5, flow_logit_normal=False,
                 solver="heun", schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__()
        self.sigma_sampler = choose(sigma_sampler, SIGMA_SAMPLERS, "sigma_sampler")
        self.weighting = choose(weighting, WEIGHTINGS, "weighting")
        self.networks["denoiser"] = Denoiser(backbone, parameterisation, sigma_data)
        self.parameterisation, self.sigma_data = parameterisation, sigma_data
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.P_mean, self.P_std = P_mean, P_std
        self.vp_eps_t, self.flow_logit_normal = vp_eps_t, flow_logit_normal
        self.solver = pick(SOLVERS, solver, "solver")
        self.schedule = pick(SCHEDULES, schedule, "schedule")
        self.schedule_kwargs = schedule_kwargs(schedule, sigma_min, sigma_max, rho)

    def sample_sigma(self, n, device):
        u = torch.rand(n, device=device)
        if self.sigma_sampler == "lognormal":
            return (self.P_mean + self.P_std * torch.randn(n, device=device)).exp()
        if self.sigma_sampler == "vp":
            return vp_sigma(self.vp_eps_t + (1 - self.vp_eps_t) * u).float()
        t = torch.sigmoid(torch.randn(n, device=device)) if self.flow_logit_normal else u
        return flow_sigma(t.clamp(1e-5, 1 - 1e-5))

    def weight(self, sigma):
        return loss_weight(self.weighting, self.parameterisation, sigma, self.sigma_data)

    def loss(self, role, batch, step):
        x0, labels = batch
        sigma = self.sample_sigma(x0.shape[0], x0.device)
        loss = denoising_loss(self.networks["denoiser"], x0, sigma, self.weight(sigma),
                              labels if self.conditional else None)
        return loss, {"loss": loss.detach()}

    def denoiser(self):
        return self.networks["denoiser"]

    def sampler(self):
        """The teacher's own solver and schedule (objective.solver / schedule / sigma_min / sigma_max / rho)."""
        return self.solver, self.schedule, dict(self.schedule_kwargs)

    def generate(self, z, nfe, cond=None):
        sigmas = sigmas_for_nfe(self.solver, nfe, self.schedule, **self.schedule_kwargs).to(z.device)
        return self.solver(self.networks["denoiser"], z * sigmas[0], sigmas, cond=cond,
                           **options_for_nfe(self.solver, nfe))
