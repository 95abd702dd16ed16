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
  GAN term                (gan_g_weight > 0, the default) a classifier head on the fake score's bottleneck
                          features ("fake_score", models.discriminators.FeatureHeads), trained with the fake score
                          in its phase on real data and detached generator samples, each noised at a level of the
                          grid: D loss softplus(D(fake)) + softplus(-D(real)) weighted gan_d_weight = 1e-2 and added
                          to the fake score's DSM loss (the head's gradient reaches the fake score's encoder, as the
                          paper's one optimiser over both); G loss softplus(-D(G(z) noised)) weighted gan_g_weight =
                          3e-3 and added to the DM loss, through the frozen fake score (objectives/adversarial.py).
                          gan_g_weight = 0 is the paper's TTUR-only ablation (no real data needed). Any registered
                          discriminator may replace the head (discriminator=teacher_features: FastGen's variant, heads
                          on the frozen teacher; conv; dino): it is then its own role, updated with the fake score
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
from torch import nn

from models.discriminators import FeatureHeads, data_shape, feature_levels, probe_features
from objectives.adversarial import GanTerm
from objectives.base import renoising_chain
from objectives.distribution_matching import DistributionMatching, KarrasGridLevels


class FakeScoreWithHead(nn.Module):
    """DMD2's fake score D_phi with its GAN classifier head on D_phi's bottleneck features: one module, so that both
    train together in the fake score's phase. forward(x, sigma, labels) is the denoiser; logits=True gives the head's
    logits [B, N] (the discriminator contract)."""

    noise_conditional = True

    def __init__(self, denoiser, shape, label_dim, width=64, cmap_dim=32):
        super().__init__()
        self.denoiser = denoiser
        self.head = FeatureHeads(probe_features(denoiser, shape, "bottleneck"), label_dim, width, cmap_dim)

    def forward(self, x, sigma, class_labels=None, logits=False):
        if not logits:
            return self.denoiser(x, sigma, class_labels)
        return self.head(feature_levels(self.denoiser.features(x, sigma, class_labels), "bottleneck"), class_labels)


class DMD2(KarrasGridLevels, DistributionMatching):
    """DMD2 (Yin et al. 2024): distribution matching with two time-scale updates and backward simulation (no GAN)."""

    method = "dmd2"

    def __init__(self, backbone, teacher=None, student_sigmas=(80.0,), generator_every=5, sigma_min=0.002,
                 sigma_max=80.0, rho=7.0, levels=1000, dm_min_fraction=0.02, dm_max_fraction=0.98,
                 gan_g_weight=3e-3, gan_d_weight=1e-2, discriminator="fake_score", disc_args=None,
                 gan_loss="non_saturating", r1_weight=0.0, r1_kind="approximate"):
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
        self.gan = None
        if not (isinstance(gan_g_weight, (int, float)) and isinstance(gan_d_weight, (int, float))
                and gan_g_weight >= 0 and gan_d_weight >= 0):
            raise ValueError(f"dmd2: gan_g_weight and gan_d_weight must be numbers >= 0; got {gan_g_weight!r}, "
                             f"{gan_d_weight!r}")
        if gan_g_weight > 0:
            if discriminator in (None, "none", ""):
                raise ValueError("dmd2: a GAN term (gan_g_weight > 0) needs a discriminator: discriminator=fake_score "
                                 "(the paper's head), teacher_features, conv or dino; gan_g_weight=0 turns it off")
            if discriminator == "fake_score":
                if disc_args:
                    raise ValueError("dmd2: the fake_score head takes no disc_args")
                discriminator = self.networks["fake_score"] = FakeScoreWithHead(
                    self.networks["fake_score"], data_shape(backbone), self.networks["student"].label_dim)
                self.gan = GanTerm("dmd2", backbone, teacher, discriminator, None, gan_loss, r1_weight, r1_kind)
                self.discriminate = lambda x, sigma, labels: self.networks["fake_score"](x, sigma, labels, logits=True)
            else:
                self.gan = GanTerm("dmd2", backbone, teacher, discriminator, disc_args, gan_loss, r1_weight, r1_kind)
                self.networks["discriminator"] = self.gan.module
                self.discriminate = lambda x, sigma, labels: self.networks["discriminator"](x, sigma, labels)
            self.needs_data = True  # the discriminator sees real images
        self.gan_g_weight, self.gan_d_weight = float(gan_g_weight), float(gan_d_weight)

    def phases(self, step):
        critics = ["fake_score", "discriminator"] if "discriminator" in self.networks else ["fake_score"]
        return ["student", *critics] if step % self.generator_every == 0 else critics

    def denoising_chain(self, z, steps, labels):
        """(x, sigma) after `steps` steps of the multi-step sampler: x the input at student_sigmas[steps], x0 of each
        step re-noised with fresh noise; steps = 0 gives pure noise s_0 z. Called under no_grad by the caller."""
        return renoising_chain(self.networks["student"], z, self.student_sigmas[:steps + 1], labels)

    def generator_samples(self, like, labels):
        """Backward simulation: the generator's output at a step k drawn uniformly in 0..K-1, from an input made by
        running the current generator without grad from noise for k steps."""
        z = torch.randn_like(like)
        steps = int(torch.randint(len(self.student_sigmas), ())) if len(self.student_sigmas) > 1 else 0
        with torch.no_grad():
            x, sigma = self.denoising_chain(z, steps, labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)

    def gan_sigma(self, x):
        """The noise level of each discriminator input: a level of the whole grid (as the fake score's)."""
        return self.fake_sigma(x.shape[0], x.device)

    def student_loss(self, x_g, labels, batch, step):
        loss = self.distribution_matching_loss(x_g, labels)
        logs = {"dm": loss.detach()}
        if self.gan is not None:
            gan = self.gan.generator_loss(self.discriminate, x_g, labels, self.gan_sigma(x_g))
            loss = loss + self.gan_g_weight * gan
            logs["gan"] = gan.detach()
        return loss, {**logs, "loss": loss.detach()}

    def discriminator_loss(self, x_g, labels, batch):
        real = batch[0]
        return self.gan.discriminator_loss(self.discriminate, real, x_g.detach(), labels, self.gan_sigma(real),
                                           self.gan_sigma(x_g))

    def fake_score_loss(self, x_g, labels, batch, step):
        loss, logs = super().fake_score_loss(x_g, labels, batch, step)
        if self.gan is None or "discriminator" in self.networks:  # a separate discriminator trains in its own phase
            return loss, logs
        gan, gan_logs = self.discriminator_loss(x_g, labels, batch)
        loss = loss + self.gan_d_weight * gan
        return loss, {"dsm": logs["loss"], **{f"gan_{k}": v for k, v in gan_logs.items()}, "loss": loss.detach()}

    def loss(self, role, batch, step):
        if role != "discriminator":
            return super().loss(role, batch, step)
        labels = self.labels_of(batch)
        with torch.no_grad():
            x_g = self.generator_samples(batch[0], labels)
        gan, logs = self.discriminator_loss(x_g, labels, batch)
        return self.gan_d_weight * gan, logs

    def generate(self, z, nfe, cond=None):
        if not 1 <= nfe <= len(self.student_sigmas):
            raise ValueError(f"dmd2: the generator samples with 1 to {len(self.student_sigmas)} steps (its "
                             f"student_sigmas {self.student_sigmas}); got nfe={nfe}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        x, sigma = self.denoising_chain(z, nfe - 1, labels)
        return self.networks["student"](x, z.new_full((z.shape[0],), sigma), labels)

    def optimizer_settings(self):
        adamw = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.01, "grad_clip": 10.0}
        critics = {role: {**adamw, "ema": False} for role in ("fake_score", "discriminator") if role in self.networks}
        return {"student": dict(adamw), **critics}
