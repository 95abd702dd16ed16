"""DMD: one-step distribution matching distillation with a regression loss on stored teacher pairs.

Yin, Gharbi, Zhang, Shechtman, Durand, Freeman & Park 2023, "One-step Diffusion with Distribution Matching
Distillation". The generator G(z) = D_theta(sigma_max z, sigma_max) (the base model at its highest noise level, a
single step) minimises

    L = D_KL(p_fake || p_real) + lambda_reg L_reg                                  (the paper's objective)

  distribution matching: grad = E[ w_t alpha_t (s_fake - s_real)(x_t) dG/dtheta ], with
    w_t = sigma_t^2 / alpha_t * CS / ||mu_real(x_t, t) - x||_1. In VE form (alpha = 1, sigma^2 (s_fake - s_real) =
    mu_fake - mu_real) the per-sample gradient is
        g = (D_fake(x_t) - D_teacher(x_t)) / mean|x - D_teacher(x_t)|,    x = G(z), x_t = x + sigma n,
    both denoisers under no-grad, applied as 0.5 ||x - sg(x - g)||^2 (distribution_matching.py);
  regression: L_reg = E_(z, y) distance(G(z), y) on pairs (z, y) of the teacher's deterministic ODE
    sampler from sigma_max z; lambda_reg = 0.25, distance LPIPS in the paper;
  fake score: the teacher's denoising loss on sg(G(z)).

The pairs are the loop's teacher rollouts (`rollouts`, as kd declares them: solver, nfe, schedule, n; the final state
only), so batches are (z, xs, labels) with xs[:, -1] the teacher's x0. The distribution-matching term uses fresh
noise (the paper computes L_reg on a separate paired batch), so it is not limited to the n stored noises.

Choices where the paper is silent or the fact sheet says unverified:
- Noise levels (the paper: t ~ U[0.02 T, 0.98 T]): levels 20..980 of the ascending 1000-level Karras grid over
  [sigma_min, sigma_max] for the matching term, all 1000 levels for the fake score, EDM's weight
  (sigma^2 + sd^2)/(sigma sd)^2 for its DSM: the values of DMD2's EDM code (dmd2.py), DMD's successor.
- The normaliser mean|x - D_teacher| is floored at 1e-5 (as SiD's), and non-finite entries of g become 0 (as DMD2).
- distance="mse" by default, as every regression loss in the project (any name of objectives.distances; "lpips" is
  the paper's); the pair count n (10000) and the teacher's sampler (Heun, 35 NFE, Karras) are ours: the paper's pair
  count and solver settings are unverified here.
- Order: student, then fake score, each step (1:1 as the paper; the order within a step is DMD2's code's, not
  re-checked against DMD's own algorithm box). The fake score trains on fresh samples of the updated generator
  rather than on the student step's samples.
- Optimisers (both roles): AdamW betas (0.9, 0.999), weight decay 0.01, gradient clipping at 10, as DMD2's code;
  no EMA of the fake score. The learning rate is train.lr (DMD2's ImageNet-64 recipe: 2e-6 at batch 280).
- Sampling: one step, nfe = 1.
"""
from objectives.base import rollout_plan
from objectives.distances import make_distance
from objectives.distribution_matching import DistributionMatching, KarrasGridLevels


class DMD(KarrasGridLevels, DistributionMatching):
    """DMD (Yin et al. 2023): a one-step generator trained by distribution matching plus regression on teacher pairs."""

    method = "dmd"

    def __init__(self, backbone, teacher=None, lambda_reg=0.25, distance="mse", sigma_min=0.002, sigma_max=80.0,
                 rho=7.0, levels=1000, dm_min_fraction=0.02, dm_max_fraction=0.98, solver="heun", nfe=35,
                 schedule="karras", n=2000):
        super().__init__(backbone, teacher, sigma_max)
        self.use_grid(levels, sigma_min, sigma_max, rho, dm_min_fraction, dm_max_fraction)
        if not lambda_reg >= 0:
            raise ValueError(f"dmd: lambda_reg must be >= 0; got {lambda_reg!r}")
        self.lambda_reg = float(lambda_reg)
        self.distance = make_distance(distance)
        self.rollouts, self.rollout_sigmas = rollout_plan(solver, nfe, schedule, sigma_min, sigma_max, rho,
                                                          save_sigmas=1, n=n)

    def phases(self, step):
        return ["student", "fake_score"]

    def student_loss(self, x_g, labels, batch, step):
        z, xs = batch[0], batch[1]
        matching = self.distribution_matching_loss(x_g, labels)
        logs = {"matching": matching.detach()}
        loss = matching
        if self.lambda_reg > 0:
            regression = self.distance(self.generator(z, labels), xs[:, -1]).mean()
            loss = loss + self.lambda_reg * regression
            logs["regression"] = regression.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def optimizer_settings(self):
        adamw = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.01, "grad_clip": 10.0}
        return {"student": dict(adamw), "fake_score": {**adamw, "ema": False}}
