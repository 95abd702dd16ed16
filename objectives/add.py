"""ADD: adversarial diffusion distillation into a one- (or few-) step student.

Sauer, Lorenz, Blattmann & Rombach 2023, "Adversarial Diffusion Distillation" (no training code was released; the
fact sheet's section 12). Networks, by role:

    student        x0_hat = D_theta(x_s, sigma_s): a Denoiser over the objective's backbone, started from the
                   teacher's weights with its preconditioning (objectives.base.student_denoiser); with an analytic
                   teacher (no weights) it starts from the backbone's random initialisation
    discriminator  objectives.adversarial.GanTerm's network (models/discriminators.py: "teacher_features", "conv"
                   or "dino", the paper's frozen-DINOv2 one)
    teacher        D_psi, frozen (not a role)

Student input, from real data x0 (batch[0]): x_s = x0 + sigma_s n, sigma_s drawn uniformly per sample from
`student_sigmas` [s_0 > s_1 > ... > s_{K-1}]; at the first level the input is pure noise x_s = s_0 n (no data term:
the paper's zero-terminal-SNR start, the input the sampler gives the student at its first step).

    L_adv^D  = E relu(1 - D(x0)) + E relu(1 + D(sg x0_hat)) + (gamma / 2) E ||grad_x D(x0)||^2     (hinge, R1)
    L_adv^G  = -E D(x0_hat)
    L_distill = E_b c(t) mean_elements ||x0_hat - D_psi(sg(x0_hat) + sigma_t eps', sigma_t)||^2,
                c(t) = alpha_t = 1 / sqrt(1 + sigma_t^2)                 (the paper's exponential weighting, VE form)
    L_student = L_adv^G + distill_weight L_distill,  distill_weight = 2.5 (paper)

The teacher's target is computed under no_grad (sg); the student's gradient comes through x0_hat only. Sampling
(`generate(z, nfe)`, 1 <= nfe <= K): x0_hat = D_theta(s_0 z, s_0), then for k = 1..nfe-1 re-noise
x0_hat + s_k n_k with fresh noise and denoise at s_k (as dmd2.py's chain).

Choices where the paper is silent, unverified or ours differ:
- student_sigmas default (80, 10, 2, 0.5): four levels, the first EDM's sigma_max (pure noise); the paper's four
  timesteps "ending at 1000" are not given exactly. The level is drawn per sample.
- sigma_t: uniform over a 1000-level Karras grid from sigma_min 0.002 to sigma_max 80 (rho 7), the VE counterpart of
  the paper's t uniform over the teacher's 1000 steps (distribution_matching.grid_sigma, all levels).
- Discriminator inputs: clean x0 and x0_hat (the paper); a noise-conditional discriminator ("teacher_features",
  "conv") sees both noised at GanTerm's lognormal levels. Default "auto": "teacher_features" with a network teacher
  (no download), "conv" with an analytic one; the paper's DINOv2 one is discriminator="dino". Projection
  conditioning on the class where the backbone is class-conditional (the paper conditions on text and an image
  embedding instead).
- R1: gamma = r1_weight = 1e-5 by default (the paper's gamma is unverified; a small value), exact, w.r.t. the
  discriminator's input (the paper: each head's input features), on real samples only; hinge loss by default.
- Phases: ["discriminator", "student"] every step (one update each): the discriminator first, on detached samples of
  the current student, then the student against the updated discriminator. Each phase draws its own x_s and noise.
- Optimisers: Adam betas (0, 0.99) for both roles (StyleGAN-T's GAN setting; the paper gives none), no EMA of the
  discriminator; learning rates, warm-up and clipping are the loop's train.* values. On the 2-D mixture
  (tests/test_add.py) the GAN was reliable only with the student's lr below the discriminator's (3e-4 vs 1e-3) and a
  clean-input discriminator: set optim.student.lr there.
- learns_teacher_map = False (the student matches the data through the discriminator, the teacher only guides it);
  eval_nfe = 1.
"""
import torch

from models.noise import append_dims
from objectives.adversarial import GanTerm
from objectives.base import Objective, renoising_chain, student_denoiser
from objectives.distribution_matching import grid_sigma

TEACHER_LEVELS = 1000  # the teacher's discrete timesteps, as a Karras grid in sigma


class ADD(Objective):
    """ADD (Sauer et al. 2023): adversarial loss on real data plus the teacher's score distillation."""

    method = "add"
    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True
    needs_data = True
    eval_nfe = 1
    learns_teacher_map = False

    def __init__(self, backbone, teacher=None, student_sigmas=(80.0, 10.0, 2.0, 0.5), distill_weight=2.5,
                 discriminator="auto", disc_args=None, gan_loss="hinge", r1_weight=1e-5,
                 r1_kind="exact", sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__()
        if teacher is None:
            raise ValueError("add needs a teacher: pass --teacher RUN (a trained denoiser), or none for an analytic "
                             "teacher fitted to the data")
        sigmas = list(student_sigmas) if isinstance(student_sigmas, (list, tuple)) else None
        if (not sigmas or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigmas)
                or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
            raise ValueError(f"add: student_sigmas must be a non-empty list of strictly decreasing noise levels > 0, "
                             f"the first pure noise (e.g. [80, 10, 2, 0.5]); got {student_sigmas!r}")
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or not distill_weight >= 0:
            raise ValueError(f"add: distill_weight must be a number >= 0; got {distill_weight!r}")
        if not 0 < sigma_min < sigma_max or not rho > 0:
            raise ValueError(f"add: the teacher's noise grid needs 0 < sigma_min < sigma_max and rho > 0; got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}")
        self.teacher = teacher
        self.student_sigmas = [float(s) for s in sigmas]
        self.distill_weight = float(distill_weight)
        self.grid = dict(levels=TEACHER_LEVELS, sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                         rho=float(rho))
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.gan = GanTerm("add", backbone, teacher, discriminator, disc_args, gan_loss, r1_weight, r1_kind)
        self.networks["student"], self.initialised_from_teacher = student_denoiser(backbone, teacher)
        self.networks["discriminator"] = self.gan.module

    def phases(self, step):
        return ["discriminator", "student"]

    def optimizer_settings(self):
        gan = {"optimizer": "adam", "betas": (0.0, 0.99)}
        return {"student": dict(gan), "discriminator": {**gan, "ema": False}}

    def labels_of(self, batch):
        return batch[-1] if self.conditional else None

    # -- the student's samples

    def student_inputs(self, x0):
        """(x_s, sigma_s): x0 + sigma_s n at a level drawn uniformly per sample from student_sigmas, pure noise
        s_0 n at the first level."""
        index = torch.randint(len(self.student_sigmas), (x0.shape[0],), device=x0.device)
        sigma = torch.tensor(self.student_sigmas, device=x0.device)[index]
        keep = append_dims((index > 0).to(x0.dtype), x0.ndim)
        return keep * x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0), sigma

    def student_samples(self, x0, labels):
        x_s, sigma = self.student_inputs(x0)
        return self.networks["student"](x_s, sigma, labels)

    # -- the losses

    def teacher_sigma(self, n, device):
        """sigma_t of the distillation loss: a level drawn uniformly from the teacher's 1000-level Karras grid."""
        return grid_sigma(n, device, 0, TEACHER_LEVELS - 1, **self.grid)

    def distillation_loss(self, x0_hat, labels):
        """E_b alpha_t mean ||x0_hat - D_teacher(sg(x0_hat) + sigma_t eps', sigma_t)||^2, target under no_grad."""
        sigma = self.teacher_sigma(x0_hat.shape[0], x0_hat.device)
        with torch.no_grad():
            x_t = x0_hat.detach() + append_dims(sigma, x0_hat.ndim).to(x0_hat.dtype) * torch.randn_like(x0_hat)
            target = self.teacher(x_t, sigma, labels)
        alpha = (1 + sigma.float().square()).rsqrt()
        error = (x0_hat.float() - target.float()).square().flatten(1).mean(1)
        return (alpha * error).mean()

    def loss(self, role, batch, step):
        x0, labels = batch[0], self.labels_of(batch)
        discriminator = self.networks["discriminator"]
        if role == "discriminator":
            with torch.no_grad():
                x0_hat = self.student_samples(x0, labels)
            return self.gan.discriminator_loss(discriminator, x0, x0_hat, labels)
        if role == "student":
            x0_hat = self.student_samples(x0, labels)
            adversarial = self.gan.generator_loss(discriminator, x0_hat, labels)
            distill = self.distillation_loss(x0_hat, labels)
            loss = adversarial + self.distill_weight * distill
            return loss, {"loss": loss.detach(), "adversarial": adversarial.detach(), "distill": distill.detach()}
        raise ValueError(f"add has roles discriminator and student; got {role!r}")

    # -- sampling

    def generate(self, z, nfe, cond=None):
        if not 1 <= nfe <= len(self.student_sigmas):
            raise ValueError(f"add: the student samples with 1 to {len(self.student_sigmas)} steps (its "
                             f"student_sigmas {self.student_sigmas}); got nfe={nfe}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        x, sigma = renoising_chain(self.networks["student"], z, self.student_sigmas[:nfe], labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)
