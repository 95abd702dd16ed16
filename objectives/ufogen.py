"""UFOGen: a diffusion GAN whose generator samples in one step.

Xu, Zhao, Xiao & Hou 2023, "UFOGen: You Forward Once Large Scale Text-to-Image Generation via Diffusion GANs"
(arXiv 2311.09257, CVPR 2024), in the DDGAN / SIDDM lineage. The paper's text was not at hand: details are checked
against the first author's "officially unofficial" DiT re-implementation (xuyanwu/SIDDMs-UFOGen, UFO_DiT/train_ufo.py
and run.sh) and the fact sheet's section 14. The paper's VP equations in sigma space (VE, x_sigma = x0 + sigma n),
on an ascending Karras grid of `levels` noise levels (sigma_min .. sigma_max, rho):

    t ~ U{1, .., levels - 1},  u = t / (levels - 1),  sigma = karras(u),  sigma_prev = karras(max(u - 1/num_levels, 0))
    x_t       = x0 + sigma n                           the real sample, forward process
    x0_hat    = G(x_t, sigma)                          the student's one-step prediction of x0
    x_prev    = x0 + sigma_prev n1                     real x_{t-1} ~ q(x_{t-1} | x0)
    x_prev'   = x0_hat + sigma_prev n2                 fake x'_{t-1} ~ q(x_{t-1} | x0_hat): the FORWARD process, not
                                                       DDGAN's posterior q(x_{t-1} | x_t, x0_hat). UFOGen's key
                                                       change: G is then trained to put x0_hat on the data, so one
                                                       step x0 = G(sigma_max z, sigma_max) samples
    D loss    GAN(D(x_prev, sigma_prev) real, D(sg x_prev', sigma_prev) fake)            (+ optional R1)
    G loss    GAN_G(D(x_prev', sigma_prev)) + gamma_t ||x0 - x0_hat||^2       (mean over the batch and elements)

Roles: "student" G, a Denoiser over the backbone with the teacher's weights and preconditioning (UFOGen starts
G from the pre-trained diffusion model); "discriminator" D_phi(x_{t-1}, t), objectives.adversarial.GanTerm's module,
by default ("auto") "teacher_features" (with an analytic teacher, which has no network: "conv"): trainable heads on
the frozen teacher's encoder at the input's noise level (UFOGen starts D from the diffusion model too; the DiT
code copies the whole teacher into D and zero-initialises its last layer, where ours freezes the teacher and trains
heads). The teacher has no other use. Data: real x0 (batch[0]);
class-conditional where the backbone is (labels batch[-1]; cond["class_labels"] when sampling).

Choices, and what is confirmed (C: the DiT code by the first author; P: the paper, as the fact sheet states it) or
ours (O):
- P: forward q(x_{t-1} | x0_hat) for the fake, q(x_{t-1} | x0) for the real; D judges noisy x_{t-1} at t-1;
  generator loss = adversarial + gamma_t ||x0 - x0_hat||^2.
- C: the step t -> t-1 is large: t - T/num_times on the 1000-step training grid, clamped at 0, with num_times = 4;
  t ~ U{1..999}. Ours: the same on the Karras grid in its ramp coordinate u (offset 1/num_levels, clamped at u = 0,
  i.e. sigma_min), default num_levels 4 and levels 1000. The top level t = levels - 1 is sigma_max itself: x_t =
  x0 + 80 n, essentially pure noise for data of scale ~0.5 (SNR 4e-5, about the VP grid's last level), so one-step
  sampling from sigma_max z is on the training distribution; we add no separate pure-noise case (O). The one-step
  sample is judged only through the top levels' x_{t-1} (sigma ~17.5 at num_levels 4), so it learns only as fast as
  D can tell noisy distributions apart there: on the 2-D mixture with the small conv D it barely moves (see the
  test), while num_levels = 1 (x_{t-1} = the grid's bottom for every t: D judges x0_hat itself) trains it well.
- C: sampling with n steps runs the grid u_k = k / n, k = n..1: x0_hat = G(x, sigma_k), then x = x0_hat +
  sigma_{k-1} n' (re-noised by the forward process) down to u = 0, returning the last x0_hat. So generate(z, nfe)
  takes any integer nfe >= 1 (the code samples with 1, 2 and 4); eval_nfe = 1.
- gamma_t (`recon_weighting`): the paper's value is unverified (P). The DiT code adds the teacher's own training
  loss (the noise-prediction MSE ||eps - eps_hat||^2, DiT's variance term aside) with weight 1; in sigma space that
  is ||x0 - x0_hat||^2 / sigma^2, our default "snr" (gamma_t = recon_weight / sigma^2, recon_weight 1). "constant"
  (gamma_t = recon_weight) is the paper's equation read literally; it pulls the high-noise predictions, the one-step
  sampler's among them, to the conditional mean E[x0 | x_t] (2-D mixture, 1000 steps, num_levels 4: one-step
  sliced Wasserstein 0.50 -> 0.49 with "constant", 0.33 with "snr").
- GAN loss: the DiT code uses the non-saturating (BCE) loss with clamped logits (D: fake >= -0.5, real <= 0.5; G:
  fake <= 0.5) and no R1. Ours: GanTerm's non_saturating without clamps (O), r1_weight 0 by default.
- Discriminator inputs (O): for a noise-conditional D we pass clean x0 / x0_hat with sigma_prev and GanTerm.inputs
  adds sigma_prev n (the same in distribution as noising here, and simpler); a D that is not noise-conditional
  (dino) is given x_{t-1} noised here, without sigma, so it still judges UFOGen's noisy samples.
- Phases (O): ["discriminator", "student"] every step, each with its own draw of t, x_t and noise (the DiT code
  updates D every second step, then G, each with its own draws).
- Optimisers (C): Adam betas (0.0, 0.999) for D, (0.9, 0.999) for G, gradient clipping at 1 for both, lr 1e-4 for
  both (lr left to train.*); no EMA of D. The code's G EMA (0.99) is left to the loop's train.ema_*.
"""
import torch

from models.noise import append_dims
from objectives.adversarial import GanTerm, noised
from objectives.base import Objective, choose, renoising_chain, student_denoiser
from objectives.distribution_matching import karras_sigma

RECON_WEIGHTINGS = ("snr", "constant")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UFOGen(Objective):
    """UFOGen (Xu et al. 2023): a one-step generator trained against a discriminator of forward-noised x_{t-1}."""

    method = "ufogen"
    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True
    needs_data = True
    eval_nfe = 1
    learns_teacher_map = False

    def __init__(self, backbone, teacher=None, num_levels=4, levels=1000, recon_weight=1.0, recon_weighting="snr",
                 discriminator="auto", disc_args=None, gan_loss="non_saturating", r1_weight=0.0,
                 r1_kind="exact", sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__()
        if teacher is None:
            raise ValueError("ufogen needs a teacher: pass --teacher RUN (a trained denoiser), or none for an analytic "
                             "teacher fitted to the data")
        if not _number(levels) or int(levels) != levels or levels < 2:
            raise ValueError(f"ufogen: levels (the noise grid's size) must be an integer >= 2; got {levels!r}")
        if not _number(num_levels) or int(num_levels) != num_levels or not 1 <= num_levels <= levels - 1:
            raise ValueError(f"ufogen: num_levels (coarse steps t -> t-1 across the grid) must be an integer in "
                             f"1..levels-1={levels - 1}; got {num_levels!r}")
        if not _number(recon_weight) or not recon_weight >= 0:
            raise ValueError(f"ufogen: recon_weight must be a number >= 0; got {recon_weight!r}")
        if not (_number(sigma_min) and _number(sigma_max) and _number(rho)) or not (0 < sigma_min < sigma_max
                                                                                      and rho > 0):
            raise ValueError(f"ufogen: the noise grid needs 0 < sigma_min < sigma_max and rho > 0; got "
                             f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}, rho={rho!r}")
        self.recon_weighting = choose(recon_weighting, RECON_WEIGHTINGS, "ufogen recon_weighting")
        self.teacher = teacher
        self.levels, self.num_levels, self.recon_weight = int(levels), int(num_levels), float(recon_weight)
        self.grid = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))
        self.gan = GanTerm("ufogen", backbone, teacher, discriminator, disc_args, gan_loss, r1_weight, r1_kind)
        self.networks["student"], self.initialised_from_teacher = student_denoiser(backbone, teacher)
        self.networks["discriminator"] = self.gan.module
        self.conditional = bool(getattr(backbone, "label_dim", 0))

    def phases(self, step):
        return ["discriminator", "student"]

    def optimizer_settings(self):
        return {"student": {"betas": (0.9, 0.999), "grad_clip": 1.0},
                "discriminator": {"betas": (0.0, 0.999), "grad_clip": 1.0, "ema": False}}

    # -- levels

    def sigma_at(self, u):
        return karras_sigma(u, **self.grid)

    def sigma_pair(self, n, device):
        """(sigma_t, sigma_{t-1}) [n]: t uniform in 1..levels-1 of the ascending grid, t-1 one coarse step
        (1/num_levels of the ramp) below, clamped at the grid's bottom (sigma_min)."""
        u = torch.randint(1, self.levels, (n,), device=device).float() / (self.levels - 1)
        return self.sigma_at(u), self.sigma_at((u - 1.0 / self.num_levels).clamp_min(0.0))

    # -- losses

    def previous(self, x, sigma_prev):
        """What the discriminator is given for x_{t-1} ~ q(x_{t-1} | x): x itself when it is noise-conditional
        (GanTerm.inputs adds sigma_prev n), else x + sigma_prev n noised here."""
        return x if self.gan.noise_conditional else noised(x, sigma_prev)

    def loss(self, role, batch, step):
        if role not in self.networks:
            raise ValueError(f"ufogen has roles student and discriminator; got {role!r}")
        x0 = batch[0]
        labels = batch[-1] if self.conditional else None
        sigma, sigma_prev = self.sigma_pair(x0.shape[0], x0.device)
        x_t = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        student, discriminator = self.networks["student"], self.networks["discriminator"]
        if role == "discriminator":
            with torch.no_grad():
                x0_hat = student(x_t, sigma, labels)
            return self.gan.discriminator_loss(discriminator, self.previous(x0, sigma_prev),
                                               self.previous(x0_hat, sigma_prev), labels,
                                               sigma_real=sigma_prev, sigma_fake=sigma_prev)
        x0_hat = student(x_t, sigma, labels)
        adversarial = self.gan.generator_loss(discriminator, self.previous(x0_hat, sigma_prev), labels,
                                              sigma=sigma_prev)
        reconstruction = (self.recon_gamma(sigma) * (x0.float() - x0_hat.float()).square().flatten(1).mean(1)).mean()
        loss = adversarial + reconstruction
        return loss, {"loss": loss.detach(), "adversarial": adversarial.detach(),
                      "reconstruction": reconstruction.detach()}

    def recon_gamma(self, sigma):
        """gamma_t [B]: recon_weight / sigma^2 ("snr", the noise-prediction MSE) or recon_weight ("constant")."""
        return self.recon_weight * (sigma.float().square().reciprocal() if self.recon_weighting == "snr"
                                    else torch.ones_like(sigma, dtype=torch.float32))

    # -- sampling

    def generate(self, z, nfe, cond=None):
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"ufogen: the generator samples with an integer number of steps nfe >= 1 (1: one step "
                             f"from sigma_max); got nfe={nfe!r}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        sigmas = [float(self.sigma_at(k / nfe)) for k in range(nfe, 0, -1)]  # u = k / nfe, from 1 (sigma_max) down
        x, sigma = renoising_chain(self.networks["student"], z, sigmas, labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)
