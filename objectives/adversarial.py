"""The adversarial losses, written once for every objective with a discriminator (add.py, ufogen.py, dmd2.py's GAN
term, ctm's): hinge and non-saturating GAN losses, the R1 penalty and FastGen's approximate R1, and `GanTerm`, the
discriminator role an objective owns (models/discriminators.py builds the network).

    hinge           D: E relu(1 - D(real)) + E relu(1 + D(fake))        G: -E D(fake)
                    (Lim & Ye 2017; StyleGAN-T and ADD)
    non_saturating  D: E softplus(-D(real)) + E softplus(D(fake))       G: E softplus(-D(fake))
                    (Goodfellow et al. 2014; DMD2's GAN term)
    R1              (gamma / 2) E ||grad_x D(x_real)||^2 (Mescheder et al. 2018), taken w.r.t. the discriminator's
                    input x. ADD takes it w.r.t. each head's input features; ours is the standard input R1, one
                    choice for every discriminator.
                    Double backward needs PyTorch's math attention (used for that forward); xformers kernels
                    (a CUDA U-Net with xformers installed) have none: use r1_kind="approximate" there.
    approximate R1  gamma E (D(x_real + 0.1 n) - D(x_real))^2 (FastGen's dmd2: no double backward, so it works
                    with any attention kernel and under torch.compile).

Every expectation is a mean over the batch and over each sample's logits ([B, N]: a patch or token discriminator
scores N places). Discriminator inputs are detached generator samples in its phase; in the generator's phase the
discriminator is frozen (the loop's phases) and the gradient reaches the generator through its input.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.discriminators import build_discriminator
from models.noise import append_dims
from objectives.base import choose

GAN_LOSSES = ("hinge", "non_saturating")
R1_KINDS = ("exact", "approximate")


def discriminator_loss(kind, real_logits, fake_logits):
    """The discriminator's loss on logits of real and of (detached) generated samples."""
    if kind == "hinge":
        return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()
    if kind == "non_saturating":
        return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; known: {', '.join(GAN_LOSSES)}")


def generator_loss(kind, fake_logits):
    """The generator's adversarial loss on the logits of its samples (on the graph)."""
    if kind == "hinge":
        return -fake_logits.float().mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits.float()).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; known: {', '.join(GAN_LOSSES)}")


def r1_penalty(logits, x):
    """E_batch ||d sum(logits_i) / d x_i||^2 for logits [B, N] computed from x [B, ...] (x.requires_grad), with the
    graph kept so that the penalty trains the discriminator. Multiply by gamma / 2."""
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def approximate_r1(discriminator, x, real_logits, sigma=None, class_labels=None, noise_std=0.1):
    """E (D(x + noise_std n) - D(x))^2 over the logits (FastGen's approximate R1); `real_logits` = D(x) on the graph."""
    perturbed = discriminator(x + noise_std * torch.randn_like(x), sigma, class_labels)
    return (perturbed.float() - real_logits.float()).square().mean()


def noised(x, sigma):
    """x + sigma n, fresh n: clean samples made inputs of a noise-conditional discriminator."""
    return x + append_dims(sigma, x.ndim) * torch.randn_like(x)


def gan_sigma(n, device, P_mean=-1.2, P_std=1.2):
    """Noise levels [n] at which clean real and generated samples are shown to a noise-conditional discriminator:
    EDM's lognormal(P_mean, P_std) (LADD noises both alike; DMD2 draws its own grid levels instead)."""
    return (P_mean + P_std * torch.randn(n, device=device)).exp()


class GanTerm:
    """What an objective with a discriminator holds: the network to register as its "discriminator" role (`module`)
    and the two losses. The discriminator is always called as the objective's `networks["discriminator"]`, passed in
    at call time, so the loop's wrappers and phases apply.

    discriminator  a models.discriminators name: "teacher_features" (the offline default), "conv", "dino"; "auto"
                   (teacher_features with a network teacher, conv with an analytic one); or a module the objective
                   built (it must follow the discriminator contract)
    disc_args      that discriminator's own settings (dict), e.g. {"channels": 64} or {"weights": "/path/dino.pth"}
    gan_loss       "hinge" or "non_saturating"
    r1_weight      gamma >= 0 of the R1 penalty (0: none); r1_kind "exact" or "approximate"
    """

    def __init__(self, method, backbone, teacher, discriminator, disc_args=None, gan_loss="hinge", r1_weight=0.0,
                 r1_kind="exact"):
        self.method = method
        self.kind = choose(gan_loss, GAN_LOSSES, f"{method} gan_loss")
        self.r1_kind = choose(r1_kind, R1_KINDS, f"{method} r1_kind")
        if isinstance(r1_weight, bool) or not isinstance(r1_weight, (int, float)) or not r1_weight >= 0:
            raise ValueError(f"{method}: r1_weight must be a number >= 0; got {r1_weight!r}")
        if disc_args is not None and not isinstance(disc_args, dict):
            raise ValueError(f"{method}: disc_args must be a mapping of the discriminator's settings, e.g. "
                             f"{{channels: 64}}; got {disc_args!r}")
        self.r1_weight = float(r1_weight)
        if discriminator == "auto":  # the offline default: the teacher's features where it has a network
            discriminator = "teacher_features" if hasattr(teacher, "features") else "conv"
        if isinstance(discriminator, torch.nn.Module):  # built by the objective (dmd2's head on its fake score)
            self.module = discriminator
        else:
            try:
                self.module = build_discriminator(discriminator, backbone, teacher, disc_args)
            except ValueError as error:
                raise ValueError(f"{method}: {error}") from None
        self.noise_conditional = bool(self.module.noise_conditional)

    def inputs(self, x, sigma=None):
        """(x, sigma) as the discriminator takes them: clean x as it is for one that judges clean images; for a
        noise-conditional one, x noised at `sigma` (drawn by gan_sigma when None)."""
        if not self.noise_conditional:
            return x, None
        sigma = gan_sigma(x.shape[0], x.device) if sigma is None else sigma
        return noised(x, sigma), sigma

    def discriminator_loss(self, discriminator, real, fake, labels=None, sigma_real=None, sigma_fake=None):
        """(loss, logs) of the discriminator on real samples and detached generated ones (clean or already noised:
        see `inputs`), with the R1 penalty on the real ones."""
        x_real, s_real = self.inputs(real.detach(), sigma_real)
        x_fake, s_fake = self.inputs(fake.detach(), sigma_fake)
        exact_r1 = self.r1_weight > 0 and self.r1_kind == "exact"
        if exact_r1:
            x_real = x_real.detach().requires_grad_(True)
        with (sdpa_kernel(SDPBackend.MATH) if exact_r1 else contextlib.nullcontext()):
            real_logits = discriminator(x_real, s_real, labels)  # math SDPA: the fused kernels lack double backward
        fake_logits = discriminator(x_fake, s_fake, labels)
        loss = discriminator_loss(self.kind, real_logits, fake_logits)
        logs = {"d_real": real_logits.detach().float().mean(), "d_fake": fake_logits.detach().float().mean()}
        if self.r1_weight > 0:
            if exact_r1:
                r1 = 0.5 * self.r1_weight * r1_penalty(real_logits, x_real)
            else:
                r1 = self.r1_weight * approximate_r1(discriminator, x_real, real_logits, s_real, labels)
            loss = loss + r1
            logs["r1"] = r1.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def generator_loss(self, discriminator, fake, labels=None, sigma=None):
        """The generator's adversarial loss on its samples `fake` (on the graph; clean or noised, see `inputs`)."""
        x, s = self.inputs(fake, sigma)
        return generator_loss(self.kind, discriminator(x, s, labels))
