"""Diff-Instruct: a one-step generator trained by the integral KL divergence to a frozen diffusion teacher.

Luo, Hu, Zhang, Sun, Li & Zhang 2023, "Diff-Instruct: A Universal Approach for Transferring Knowledge From
Pre-trained Diffusion Models". The Integral KL divergence and its gradient (the paper's main theorem):

    IKL(q, p) = int w(t) KL(q_t || p_t) dt,     grad_theta IKL = E_{t, z, n}[ w(t) (s_q - s_p)(x_t)^T dx_t/dtheta ]

with x_t = G_theta(z) + sigma n, s_p the teacher's score and s_q the score of the generator's distribution, learnt
by the fake score (Algorithm 1 alternates the two updates). In EDM's denoiser form (distribution_matching.py):

    fake score  EDM DSM on sg(G(z)), ln sigma ~ N(P_mean, P_std^2)
    student     g = D_fake(x_t) - D_teacher(x_t) under no-grad (= sigma^2 (s_q - s_p)), ln sigma ~ N(P_mean, P_std^2),
                loss 0.5 ||G(z) - sg(G(z) - g)||^2: the gradient of the IKL with w(sigma) = sigma^2 under EDM's
                lognormal density of sigma

The official code (pkulwj1994/diff_instruct, training/di_loss.py) takes the same gradient from the surrogate
sum((D_fake - D_teacher) * G(z)); ours has the same gradient up to the constant 1 / elements, and its value is half
the mean squared score difference (a number worth logging). Generator G(z) = D(sigma_init z, sigma_init) with
sigma_init = 1.0 (the official CIFAR-10 unconditional setting).

Choices and differences:
- One fake step, then one student step, every iteration (the paper's alternation; the official loop's order).
- Both roles: Adam betas (0, 0.999) (official code; fact sheet pitfall 2: a lagging fake score with momentum feeds
  stale directions), no gradient clipping (the official EDM-derived loop has none), no EMA of the fake score. The
  learning rate is train.lr for both roles (the paper: equal rates, 1e-5 on CIFAR-10 with batch 128: set
  train.lr / optim.<role>.lr for that scale).
- The official generator step runs the teacher in train mode with the fake score's dropout mask; here the teacher is
  frozen in eval mode (the loop's teacher), so there is no mask to share.
- The loss is the mean over elements and samples, where the official code sums over elements (a constant factor).
"""
import torch

from objectives.distribution_matching import DistributionMatching, lognormal_sigma, matching_surrogate


class DiffInstruct(DistributionMatching):
    """Diff-Instruct (Luo et al. 2023): a one-step generator minimising the integral KL to the teacher."""

    method = "diff_instruct"

    def __init__(self, backbone, teacher=None, sigma_init=1.0, P_mean=-1.2, P_std=1.2):
        super().__init__(backbone, teacher, sigma_init)
        if not P_std >= 0:
            raise ValueError(f"diff_instruct: P_std must be >= 0; got {P_std!r}")
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def generator_sigma(self, n, device):
        return lognormal_sigma(n, device, self.P_mean, self.P_std)

    def fake_sigma(self, n, device):
        return lognormal_sigma(n, device, self.P_mean, self.P_std)

    def student_loss(self, x_g, labels, batch, step):
        sigma = self.generator_sigma(x_g.shape[0], x_g.device)
        with torch.no_grad():
            teacher_x0, fake_x0 = self.denoised(x_g, sigma, labels)
        loss = matching_surrogate(x_g, fake_x0 - teacher_x0)
        return loss, {"loss": loss.detach()}

    def optimizer_settings(self):
        return {"student": {"betas": (0.0, 0.999), "grad_clip": 0.0},
                "fake_score": {"betas": (0.0, 0.999), "grad_clip": 0.0, "ema": False}}
