"""DMD2: distribution matching distillation without the regression loss, with two time-scale updates and an optional
multi-step generator trained by backward simulation.

Yin, Gharbi, Park, Zhang, Shechtman, Durand & Freeman 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis", checked against tianweiy/DMD2 (main/edm/edm_guidance.py, train_edm.py; the fact sheet's section
10). What it keeps from DMD (dmd.py) and what it changes:

  distribution matching   as DMD: g = (D_fake - D_teacher)(x_t) / mean|x - D_teacher(x_t)| per sample under no-grad,
                          applied as 0.5 ||x - sg(x - g)||^2; levels 20..980 of the ascending 1000-level Karras grid
  fake score              EDM-weighted DSM on detached generator samples, any of the 1000 levels
  no regression loss      no stored teacher pairs
  two time-scale updates  the fake score every step, the generator every `generator_every` (5) steps, so that the
                          fake score tracks the generator (on this project's 2-D mixture test, seed 0, 400 steps:
                          sliced Wasserstein 0.50 -> 0.23 with 5, no progress with generator_every=1)
  GAN term                a hook only, `gan_loss` (see there). Without it DMD2 is the paper's TTUR-only ablation:
                          stable, about DMD's quality; the GAN term on real data is what surpasses the teacher
  multi-step generator    `student_sigmas` [s_0 > s_1 > ... > s_{K-1}]; sampling: x0 = G(s_0 z, s_0),
                          then x0 = G(x0 + s_k n_k, s_k) for k = 1..K-1 with fresh noise n_k (predict, re-noise)
  backward simulation     the generator's training inputs at step k come from running the current
                          generator, without grad, from pure noise for k steps, then re-noising its x0 to s_k; at
                          k = 0 the input is pure noise s_0 z

Choices where the paper is silent or ours differ:
- Phases: on a generator step (step % generator_every == 0) the student first, then the fake score, as the code's
  training loop; the fake score trains on fresh samples of the updated generator, where the code reuses the
  student step's samples.
- Backward simulation draws one step k uniformly in 0..K-1 per batch (as the code), in each phase separately. The
  student_sigmas are noise levels in sigma space (the SDXL recipe's timesteps 999/749/499/249 are a VP-grid
  equivalent; the EDM recipe is one step at 80). With K = 1 nothing is simulated.
- `generate(z, nfe)` takes 1 <= nfe <= K: the first nfe levels (fewer steps stop at the chain's current x0).
- Optimisers: AdamW betas (0.9, 0.999), weight decay 0.01, gradient clipping at 10 for both roles (the ImageNet-64
  scripts; their 500-step warm-up and lr 2e-6 at batch 280 are scale settings left to train.* / optim.*); no EMA of
  the fake score. The paper's bf16 (fp16 diverged) is the loop's train.amp=auto on GPU.
"""
import torch

from objectives.distribution_matching import DistributionMatching, KarrasGridLevels


class DMD2(KarrasGridLevels, DistributionMatching):
    """DMD2 (Yin et al. 2024): distribution matching with two time-scale updates and backward simulation (no GAN)."""

    method = "dmd2"

    def __init__(self, backbone, teacher=None, student_sigmas=(80.0,), generator_every=5, sigma_min=0.002,
                 sigma_max=80.0, rho=7.0, levels=1000, dm_min_fraction=0.02, dm_max_fraction=0.98):
        sigmas = list(student_sigmas) if isinstance(student_sigmas, (list, tuple)) else None
        if (not sigmas or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigmas)
                or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
            raise ValueError(f"dmd2: student_sigmas must be a non-empty list of strictly decreasing noise levels > 0 "
                             f"(e.g. [80] or [80, 1.5]); got {student_sigmas!r}")
        if int(generator_every) != generator_every or generator_every < 1:
            raise ValueError(f"dmd2: generator_every must be an integer >= 1; got {generator_every!r}")
        super().__init__(backbone, teacher, sigmas[0])
        self.use_grid(levels, sigma_min, sigma_max, rho, dm_min_fraction, dm_max_fraction)
        self.student_sigmas = [float(s) for s in sigmas]
        self.generator_every = int(generator_every)
        self.eval_nfe = len(self.student_sigmas)

    def phases(self, step):
        return ["student", "fake_score"] if step % self.generator_every == 0 else ["fake_score"]

    def denoising_chain(self, z, steps, labels):
        """(x, sigma) after `steps` steps of the multi-step sampler: x the input at student_sigmas[steps], x0 of each
        step re-noised with fresh noise; steps = 0 gives pure noise s_0 z. Called under no_grad by the caller."""
        student, sigmas = self.networks["student"], self.student_sigmas
        x = sigmas[0] * z
        for k in range(steps):
            x0_hat = student(x, z.new_full((z.shape[0],), sigmas[k]), labels)
            x = x0_hat + sigmas[k + 1] * torch.randn_like(x0_hat)
        return x, sigmas[steps]

    def generator_samples(self, like, labels):
        """Backward simulation: the generator's output at a step k drawn uniformly in 0..K-1, from an input made by
        running the current generator without grad from noise for k steps."""
        z = torch.randn_like(like)
        steps = int(torch.randint(len(self.student_sigmas), ())) if len(self.student_sigmas) > 1 else 0
        with torch.no_grad():
            x, sigma = self.denoising_chain(z, steps, labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)

    def gan_loss(self, role, x_g, labels, batch, step):
        """The GAN term of DMD2, added to `role`'s loss; None here. The discriminator issue fills it in:
        a classifier head on the fake score's bottleneck features of noised inputs (the code: a random level of the
        grid), trained in the fake_score phase with the non-saturating loss softplus(D(fake)) + softplus(-D(real))
        (weight 1e-2; real images from the batch, so needs_data becomes True), and in the student phase
        softplus(-D(G(z))) (weight 3e-3) through the frozen fake score. Returns a scalar tensor or None."""
        return None

    def with_gan_term(self, role, loss, logs, x_g, labels, batch, step):
        gan = self.gan_loss(role, x_g, labels, batch, step)
        if gan is not None:
            loss = loss + gan
            logs = {**logs, "gan": gan.detach(), "loss": loss.detach()}
        return loss, logs

    def student_loss(self, x_g, labels, batch, step):
        loss = self.distribution_matching_loss(x_g, labels)
        return self.with_gan_term("student", loss, {"loss": loss.detach()}, x_g, labels, batch, step)

    def fake_score_loss(self, x_g, labels, batch, step):
        loss, logs = super().fake_score_loss(x_g, labels, batch, step)
        return self.with_gan_term("fake_score", loss, logs, x_g, labels, batch, step)

    def generate(self, z, nfe, cond=None):
        if not 1 <= nfe <= len(self.student_sigmas):
            raise ValueError(f"dmd2: the generator samples with 1 to {len(self.student_sigmas)} steps (its "
                             f"student_sigmas {self.student_sigmas}); got nfe={nfe}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        x, sigma = self.denoising_chain(z, nfe - 1, labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)

    def optimizer_settings(self):
        adamw = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.01, "grad_clip": 10.0}
        return {"student": dict(adamw), "fake_score": {**adamw, "ema": False}}
