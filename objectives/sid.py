"""SiD: Score identity Distillation of a diffusion teacher into a one-step generator.

Zhou, Zheng, Wang, Yin & Huang 2024, "Score identity Distillation: Exponentially Fast Distillation of Pretrained
Diffusion Models for One-Step Generation", checked against mingyuanzhou/SiD (training/sid_loss.py,
sid_training_loop.py). With f_psi the teacher's denoiser, f_phi the fake score's, x_g = G_theta(2.5 z, 2.5) and
x_t = x_g + sigma n, the generator's loss per element (the paper's final loss, with alpha = 1.2):

    L = (f_psi(x_t) - f_phi(x_t)) . [ (f_psi(x_t) - x_g) - alpha (f_psi(x_t) - f_phi(x_t)) ] / w,
    w = sg(mean |x_g - f_psi(x_t)|) per sample (at least 1e-5)

Gradients flow through x_g directly AND through both frozen networks via x_t (only w is stopped): the fake score's
parameters are not updated in this phase, but its input gradient is used (fact sheet pitfall 3; unlike DI and DMD).

What the loss measures: with f_phi exactly the denoiser of the generator's distribution q_sigma, the score identity
E[u(x_t) . (x_g - x_t)] = sigma^2 E[u(x_t) . s_q(x_t)] gives E[(f_psi - f_phi) . (f_psi - x_g)] = E||f_psi - f_phi||^2,
so before the normaliser E[L w] = (1 - alpha) sigma^4 E_q||s_p - s_q||^2: a multiple of the Fisher divergence
between q_sigma and p_sigma. Had the gradient stopped at both networks' outputs, it would be -delta . dx_g/dtheta
with delta = f_psi - f_phi, exactly DMD's (before the normaliser) whatever alpha: everything alpha changes and SiD adds
flows through the networks (tests/test_distribution_matching.py checks the value and both gradients in closed form).

  fake score   EDM DSM on detached x_g, ln sigma ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2) (the code's fake loss)
  levels       u ~ U[0, t_max], t_max = 0.8, sigma = karras_sigma(u) on [sigma_min, sigma_max] = [0.002, 80]
               (the code's tmax = 800 of 1000: sigma in [0.002, 24.4])
  order        one fake-score step, then one generator step, every iteration (the code's loop)

Choices and differences:
- Optimisers: Adam betas (0, 0.999) for both roles, no gradient clipping (the code: none), the generator's EMA
  half-life 500 kimg (the code's 0.5 M images), no EMA of the fake score. The learning rate is train.lr (the
  code: 1e-5 for both at batch 256 on CIFAR-10).
- The code sums the per-element loss over elements, divides by the batch and scales the generator's loss by 100;
  here it is the mean over elements and samples (constant factors that Adam absorbs up to its epsilon).
- The code drops samples with NaN outputs from the loss and zeroes non-finite gradients; here a non-finite loss stops
  the run (the loop's check), which says where it happened rather than training on.
- The teacher is the loop's frozen teacher in eval mode; the fake score is called in the mode the loop leaves it in
  (the code switches it to eval for the generator step: the same for dropout-free backbones).
"""
import torch

from objectives.distribution_matching import DistributionMatching, karras_sigma, lognormal_sigma


def sid_terms(x_g, teacher_x0, fake_x0, alpha):
    """Per sample [B], before the normaliser: mean over elements of
    (f_psi - f_phi) . [(f_psi - x_g) - alpha (f_psi - f_phi)], all on the graph."""
    difference = teacher_x0.float() - fake_x0.float()
    per_element = difference * ((teacher_x0.float() - x_g.float()) - alpha * difference)
    return per_element.flatten(1).mean(1)


class SiD(DistributionMatching):
    """SiD (Zhou et al. 2024): a one-step generator trained by score identity distillation, alpha = 1.2."""

    method = "sid"

    def __init__(self, backbone, teacher=None, alpha=1.2, sigma_init=2.5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 t_max=0.8, P_mean=-1.2, P_std=1.2):
        super().__init__(backbone, teacher, sigma_init)
        if not 0 < sigma_min < sigma_max or not rho > 0 or not 0 <= t_max <= 1 or not P_std >= 0:
            raise ValueError(f"sid needs 0 < sigma_min < sigma_max, rho > 0, t_max in [0, 1] and P_std >= 0; got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}, t_max={t_max}, P_std={P_std}")
        self.alpha = float(alpha)
        self.levels = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))
        self.t_max = float(t_max)
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def generator_sigma(self, n, device):
        return karras_sigma(self.t_max * torch.rand(n, device=device), **self.levels)

    def fake_sigma(self, n, device):
        return lognormal_sigma(n, device, self.P_mean, self.P_std)

    def student_loss(self, x_g, labels, batch, step):
        sigma = self.generator_sigma(x_g.shape[0], x_g.device)
        teacher_x0, fake_x0 = self.denoised(x_g, sigma, labels)  # on the graph: gradients pass through both networks
        loss = (sid_terms(x_g, teacher_x0, fake_x0, self.alpha) / self.normaliser(x_g, teacher_x0)).mean()
        return loss, {"loss": loss.detach()}

    def optimizer_settings(self):
        return {"student": {"betas": (0.0, 0.999), "grad_clip": 0.0, "ema_halflife_kimg": 500.0},
                "fake_score": {"betas": (0.0, 0.999), "grad_clip": 0.0, "ema": False}}
