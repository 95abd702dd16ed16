"""Knowledge distillation into a one-step "Denoising Student" (Luhman & Luhman 2021, "Knowledge Distillation in
Iterative Generative Models for Improved Sampling Speed").

The teacher's deterministic sampler defines a map z -> x0 (DDIM eta = 0 in the paper; here any ODE solver, Heun by
default, from x = sigma_max z). The loop stores pairs (z, x0) from that map (the trajectory store, one saved state:
the final x0), and the student regresses on them:

    S(z) = D_theta(sigma_max z, sigma_max)                   the teacher's network, always at the highest noise level
    L(theta) = E_(z, x0) distance(S(z), x0)                  (the paper: L1 on CIFAR-10, L2 on its other data sets)

D_theta is a `Denoiser` over the student backbone, initialised from the teacher (`init_from_teacher`). By default
(parameterisation="teacher", sigma_data=None) it takes a trained teacher's parameterisation and sigma_data, so that at
step 0 S(z) is exactly the teacher's first denoiser output (the teacher's 1-NFE Euler sample); with an analytic teacher
it is `edm` and the backbone starts from its random initialisation.

distance: "mse" by default, as every regression loss in the project; set distance="l1" for the paper's CIFAR-10
recipe (their L1 is summed over pixels and divided by the batch size, i.e. our per-element mean times the number of
pixels: a constant factor that Adam absorbs). solver, nfe, schedule, sigma_min, sigma_max, rho and n say how the loop
makes the pairs (`self.rollouts`, with the names DSNO uses; n pairs). The student is a one-step generator, not a
denoiser: `denoiser()` is None and `generate` takes exactly nfe = 1.
"""
from objectives.base import Objective, one_step_sample, rollout_plan, student_denoiser
from objectives.distances import make_distance


class KD(Objective):
    """Luhman & Luhman 2021: a one-step student D(sigma_max z, sigma_max) regressed on the teacher's (z, x0) pairs."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    needs_teacher = True
    eval_nfe = 1  # the NFE the student samples with (the loop's sample grids and quality report use it)

    def __init__(self, backbone, teacher=None, parameterisation="teacher", sigma_data=None, distance="mse",
                 solver="heun", nfe=35, schedule="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0, n=2000):
        super().__init__()
        if teacher is None:
            raise ValueError("kd needs a teacher: pass --teacher RUN (a trained denoiser) whose ODE map the student "
                             "learns from stored (z, x0) pairs")
        self.networks["student"], self.initialised_from_teacher = student_denoiser(
            backbone, teacher, parameterisation, sigma_data, "edm")
        self.parameterisation = self.networks["student"].parameterisation
        self.sigma_data = self.networks["student"].sigma_data
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.distance = make_distance(distance)
        self.sigma_max = float(sigma_max)
        self.rollouts, self.rollout_sigmas = rollout_plan(solver, nfe, schedule, sigma_min, sigma_max, rho,
                                                          save_sigmas=1, n=n)

    def student(self, z, class_labels=None):
        """S(z) = D(sigma_max z, sigma_max): the student's one-step sample from unit noise z."""
        return one_step_sample(self.networks["student"], z, self.sigma_max, class_labels)

    def loss(self, role, batch, step):
        z, xs, labels = batch
        x0 = xs[:, -1]  # the teacher's sample: the last saved state, at sigma = 0
        x0_hat = self.student(z, labels if self.conditional else None)
        loss = self.distance(x0_hat, x0).mean()
        return loss, {"loss": loss.detach()}

    def generate(self, z, nfe, cond=None):
        if nfe != 1:
            raise ValueError(f"kd: the Denoising Student samples in exactly one step (nfe=1); got nfe={nfe}")
        return self.student(z, **(cond or {}))
