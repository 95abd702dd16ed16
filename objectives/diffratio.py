"""DiffRatio: a one-step generator trained from data through a learned log density ratio, with no teacher score.

Chen, Zhang, He, Ou, Hernandez-Lobato, Schoelkopf & Barber, arXiv 2502.08005 (v1-v3 "Towards Training One-Step
Diffusion Models Without Distillation", v4 "DiffRatio: Training One-Step Diffusion Models Without Teacher
Supervision"). What the abstracts state: score distillation needs the difference of two scores, the generator's and
the data's, s_q - s_p, at every noise level; DiffRatio estimates that difference directly as the input gradient of a
learned log density ratio between noisy generator samples and noisy data, so neither a teacher score nor a fake
score network is needed; and starting from the teacher's weights is what makes it work (its features across noise
levels, not its input-output map). The teacher is used for its weights only; this objective never calls it.

The algorithm (our derivation where the paper's text was not available; every choice is listed below):

    G(z) = D_theta(sigma_init z, sigma_init)            the student, a one-step generator (the teacher's one-step map
                                                        at step 0, as kd's Denoising Student and DMD's generator)
    x_t  = x + sigma n,   n ~ N(0, I)                   noisy samples: q_sigma (x = G(z)) and p_sigma (x = data)

  Classifier step (logistic regression, label 1 = generated, 0 = real; the same sigma for the i-th pair):

    L(phi) = 1/2 E[ softplus(-d_phi(G(z).detach() + sigma n, sigma)) ] + 1/2 E[ softplus(d_phi(x0 + sigma n', sigma)) ]

    With as many generated as real samples at each sigma, the minimiser is d* = log q_sigma(x) - log p_sigma(x),
    so grad_x d* = s_q(x, sigma) - s_p(x, sigma): the score difference of distribution matching (DMD, Diff-Instruct).

  Student step (the reverse-KL gradient of Diff-Instruct / DMD with grad_x d in place of s_q - s_p; phi frozen):

    g       = w(sigma) grad_x d_phi(x_t, sigma)          evaluated at a detached copy of x_t, a constant
    L(theta)= mean over the batch and elements of 0.5 ||x_t - sg(x_t - g)||^2,   x_t = G_theta(z) + sigma n

    d L / d x_t = g / (B * elements per sample), so a gradient step moves each x_t (hence G(z)) down the log ratio,
    where the data are denser than the generator's samples.

The loop's contract: in the student phase the classifier's parameters are frozen, but gradients through its input
are needed; `log_ratio_gradient` takes them with torch.autograd.grad on a leaf copy of x_t (create_graph=False), so
no parameter gradient is ever accumulated and no graph through phi is kept, whether or not phi is frozen.

Choices where the paper (as far as we could read it) is silent:

- Classifier network (`RatioClassifier`): the teacher's denoiser backbone with EDM's input preconditioning (c_in x,
  c_noise(sigma), the teacher's parameterisation and sigma_data, so teacher features mean what they meant), and a
  scalar read-out from its output F [B, C, ...]: logit = mean over pixels of (sum_c w_c F_c) + b, a learned 1x1
  projection. For vectors [B, D] the "pixel" mean is over nothing and the logit is w . F + b. w starts at 0.01/C and
  b at 0: the first logits are nearly 0 (q = p), so an untrained read-out of the teacher's output does not push the
  student; but w is not 0, or a random backbone whose output layer is zero-initialised (mlp) would leave both w and
  that layer without gradient. Every backbone parameter is trained: the paper's "lightweight ratio network" is not
  specified.
- The generator's level: sigma_init = 2.5 (SiD's EDM choice; DMD2 uses 80, Diff-Instruct 1.0). At 80 a randomly
  initialised mlp student sat collapsed near one point of the toy mixture for ~800 steps.
- Noise levels: ln sigma ~ N(P_mean, P_std^2), EDM's (-1.2, 1.2) as in Diff-Instruct, clamped to [sigma_min,
  sigma_max]; the same distribution for both steps, the generated and real halves of a classifier batch sharing
  their sigmas (lower variance; the class balance holds at every sigma, which the ratio identity above needs).
- Weighting (`weighting`):
    "sigma2"      w = sigma^2 (default). By Tweedie, sigma^2 (s_q - s_p) = D_q(x_t) - D_p(x_t), the difference of the
                  generator's and the data's denoisers: Diff-Instruct's update, and DMD's without its normaliser; it
                  stays bounded as sigma -> infinity (the difference of the two means).
    "normalised"  the sigma^2-weighted update divided per sample by its own mean absolute value (plus 1e-8). DMD
                  divides by mean |x - D_real(x_t)|, which needs the teacher's denoiser; without one we keep only
                  the direction of each sample's update, every sample taking a step of the same size. On the toy
                  mixture it trained as well as "sigma2" at 2:1 updates; at 1:1 a teacher-initialised pair first
                  scattered its samples far beyond the data's scale.
- Updates: the classifier every step, the student after it every `classifier_steps` steps (default 2; 1 is
  Diff-Instruct's 1:1 alternation, DMD2 uses 5). The classifier must keep ahead of the student: on the toy mixture
  a teacher-initialised pair at 1:1 and equal learning rates oscillated, while 2:1 (better still with
  optim.classifier.lr at twice the student's) converged. Both roles default to Adam betas (0, 0.999) (Diff-Instruct,
  SiD; with beta1 = 0.9 the toy runs oscillated); no EMA is kept of the classifier (it never samples).
- Initialisation (`init`, `classifier_init`): "teacher" copies the teacher's backbone weights into both roles (the
  classifier's head is new); "random" keeps the backbone's own initialisation, the two roles starting from the same
  random weights. `classifier_init` (None: as `init`) lets the two roles be ablated separately. With an analytic
  teacher (no `.backbone`) there are no weights to copy: both roles start random whatever `init` says
  (`initialised_from_teacher` records what happened); the teacher's parameterisation and sigma_data still choose
  the preconditioning (edm and 0.5 for an analytic teacher).
- Class labels: with a conditional backbone the student generates for the batch's labels and the classifier sees
  them, so it learns the class-conditional ratio log q(x | c) - log p(x | c).

Measured on the 8-mode 2-D mixture (mlp hidden 64 x 2 blocks, batch 256, Adam lr 2e-4, 2:1 updates; sliced W2 of
2000 samples, 0.05 between two data halves): from a DSM-trained mlp teacher (1000 steps), teacher-initialised runs
fell below 0.1 by step 200-300, random ones by step 500-600 or later (3 seeds each: 0.06-0.11 against 0.06-0.16 at
step 600; about 2/3 of the samples lie within 3 std of a mode, against 98% of the data). A small-scale echo of the
paper's finding that teacher initialisation matters.
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F

from models.denoiser import Denoiser
from models.generator import outputs_trajectory
from models.noise import append_dims
from objectives.base import Objective, choose, init_from_teacher, one_step_sample, teacher_preconditioning
from objectives.distribution_matching import matching_surrogate

INITS = ("teacher", "random")
WEIGHTINGS = ("sigma2", "normalised")


class RatioClassifier(nn.Module):
    """d(x, sigma, class_labels) -> [B]: a noise-conditioned logit for log q_sigma(x) - log p_sigma(x), read from a
    preconditioned denoiser backbone's output by a learned 1x1 projection averaged over pixels."""

    def __init__(self, backbone, channels, parameterisation="edm", sigma_data=0.5):
        super().__init__()
        self.denoiser = Denoiser(backbone, parameterisation, sigma_data)  # for c_in, c_noise; its output is unused
        self.head_weight = nn.Parameter(torch.full((channels,), 0.01 / channels))
        self.head_bias = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        features = self.denoiser.raw(x, sigma, class_labels)[0]            # [B, C, ...] or [B, D]
        weight = self.head_weight.reshape((1, -1) + (1,) * (features.ndim - 2))
        per_pixel = (features * weight).sum(1)                             # [B, ...] or [B]
        return per_pixel.reshape(x.shape[0], -1).mean(1) + self.head_bias


def log_ratio_gradient(classifier, x_t, sigma, class_labels=None):
    """grad_x d(x, sigma) at x_t, a constant [B, ...] (float32): autograd through the classifier's input only, on a
    detached leaf copy, so its parameters (frozen or not) receive no gradient and no graph is kept. Samples must be
    independent in the classifier (no batch statistics), since the gradient of the summed logits is taken."""
    x_leaf = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        logit = classifier(x_leaf, sigma, class_labels)
        (gradient,) = torch.autograd.grad(logit.sum(), x_leaf)
    return gradient.float(), logit.detach()


def output_channels(backbone):
    """C of the backbone's output [B, C, ...] (`out_channels`, images) or D of [B, D] (`dim`, vectors)."""
    for name in ("out_channels", "dim"):
        value = getattr(backbone, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"diffratio's classifier reads a logit from the backbone's output channels, but "
                     f"{type(backbone).__name__} declares none: give it an `out_channels` (images) or `dim` (vectors) "
                     "attribute")


class DiffRatio(Objective):
    """DiffRatio (arXiv 2502.08005): a one-step generator trained with the input gradient of a noise-conditioned
    classifier's log density ratio between its samples and real data; the teacher gives weights, never scores."""

    learns_teacher_map = False

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True   # for its weights (initialisation) and preconditioning only
    needs_data = True      # the classifier compares generated samples with real data
    eval_nfe = 1

    def __init__(self, backbone, teacher=None, init="teacher", classifier_init=None, sigma_init=2.5,
                 weighting="sigma2", P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0, classifier_steps=2,
                 parameterisation="teacher", sigma_data=None):
        super().__init__()
        if teacher is None:
            raise ValueError("diffratio needs a teacher for its weights (the student and the classifier start from "
                             "them; its score is never used): pass --teacher RUN, or none for an analytic teacher "
                             "(random initialisation)")
        self.init = choose(init, INITS, "diffratio init")
        self.classifier_init = choose(init if classifier_init is None else classifier_init, INITS,
                                      "diffratio classifier_init")
        self.weighting = choose(weighting, WEIGHTINGS, "diffratio weighting")
        if outputs_trajectory(backbone):
            raise ValueError(f"diffratio needs a plain denoiser backbone (one output per input); "
                             f"{type(backbone).__name__} outputs a trajectory")
        if not 0 < sigma_min < sigma_max or not sigma_init > 0:
            raise ValueError(f"diffratio needs 0 < sigma_min < sigma_max and sigma_init > 0; got sigma_min={sigma_min}"
                             f", sigma_max={sigma_max}, sigma_init={sigma_init}")
        if int(classifier_steps) != classifier_steps or classifier_steps < 1:
            raise ValueError(f"diffratio classifier_steps must be an integer >= 1; got {classifier_steps!r}")
        self.sigma_init, self.sigma_min, self.sigma_max = float(sigma_init), float(sigma_min), float(sigma_max)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.classifier_steps = int(classifier_steps)
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.parameterisation, self.sigma_data = teacher_preconditioning(teacher, parameterisation, sigma_data)

        classifier_backbone = copy.deepcopy(backbone)  # the same random weights as the student's, before any copy
        self.initialised_from_teacher = {
            "student": self.init == "teacher" and init_from_teacher(backbone, teacher),
            "classifier": self.classifier_init == "teacher" and init_from_teacher(classifier_backbone, teacher),
        }
        self.networks["student"] = Denoiser(backbone, self.parameterisation, self.sigma_data)
        self.networks["classifier"] = RatioClassifier(classifier_backbone, output_channels(backbone),
                                                      self.parameterisation, self.sigma_data)
        # The teacher is not kept: nothing after construction can call it.

    def optimizer_settings(self):
        return {"student": {"betas": (0.0, 0.999)}, "classifier": {"betas": (0.0, 0.999), "ema": False}}

    def phases(self, step):
        return ["classifier"] + (["student"] if step % self.classifier_steps == 0 else [])

    # -- the pieces of the algorithm box

    def sample_sigma(self, n, device):
        """ln sigma ~ N(P_mean, P_std^2), clamped to [sigma_min, sigma_max]: [n]."""
        sigma = (self.P_mean + self.P_std * torch.randn(n, device=device)).exp()
        return sigma.clamp(self.sigma_min, self.sigma_max)

    def student(self, z, class_labels=None):
        """G(z) = D(sigma_init z, sigma_init): the one-step sample from unit noise z."""
        return one_step_sample(self.networks["student"], z, self.sigma_init, class_labels)

    def weighted_update(self, sigma, gradient):
        """The student's update w(sigma) grad_x d, per the `weighting` choice (module docstring)."""
        update = append_dims(sigma, gradient.ndim).square() * gradient
        if self.weighting == "normalised":
            scale = update.abs().reshape(update.shape[0], -1).mean(1)
            update = update / append_dims(scale + 1e-8, update.ndim)
        return update

    def classifier_loss(self, x_fake, x_real, labels, sigma):
        """Logistic loss: label 1 for x_fake + sigma n, 0 for x_real + sigma n' (x_fake carries no graph)."""
        classifier = self.networks["classifier"]
        sigma_x = append_dims(sigma, x_real.ndim)
        logit_fake = classifier(x_fake + sigma_x * torch.randn_like(x_fake), sigma, labels)
        logit_real = classifier(x_real + sigma_x * torch.randn_like(x_real), sigma, labels)
        loss = 0.5 * (F.softplus(-logit_fake).mean() + F.softplus(logit_real).mean())
        accuracy = 0.5 * ((logit_fake > 0).float().mean() + (logit_real < 0).float().mean())
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "logit_fake": logit_fake.detach().mean(),
                      "logit_real": logit_real.detach().mean()}

    def student_loss(self, x_fake, labels, sigma, noise):
        """The ratio-matching surrogate at x_t = x_fake + sigma noise (x_fake carries the student's graph), averaged
        over the batch and elements; its gradient w.r.t. x_fake is w(sigma) grad_x d(x_t) / (B * elements)."""
        x_t = x_fake + append_dims(sigma, x_fake.ndim) * noise
        gradient, logit = log_ratio_gradient(self.networks["classifier"], x_t, sigma, labels)
        update = self.weighted_update(sigma, gradient)
        loss = matching_surrogate(x_t, update)  # 0.5 mean ||x_t - sg(x_t - update)||^2
        return loss, {"loss": loss.detach(), "update_rms": update.square().mean().sqrt(),
                      "log_ratio": logit.mean()}  # log_ratio: E_q[log q/p], a KL(q_sigma || p_sigma) estimate

    # -- the objective contract

    def loss(self, role, batch, step):
        if role not in self.networks:
            raise ValueError(f"diffratio has roles student and classifier; got {role!r}")
        x_real, labels = batch
        labels = labels if self.conditional else None
        z = torch.randn_like(x_real)
        sigma = self.sample_sigma(x_real.shape[0], x_real.device)
        if role == "classifier":
            with torch.no_grad():
                x_fake = self.student(z, labels)
            return self.classifier_loss(x_fake, x_real, labels, sigma)
        return self.student_loss(self.student(z, labels), labels, sigma, torch.randn_like(x_real))

    def generate(self, z, nfe, cond=None):
        if nfe != 1:
            raise ValueError(f"diffratio: the generator samples in exactly one step (nfe=1); got nfe={nfe}")
        labels = (cond or {}).get("class_labels") if self.conditional else None
        return self.student(z, labels)
