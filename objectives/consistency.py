"""What consistency distillation and training share (Song et al. 2023, "Consistency Models", Algorithms 2-3; Song &
Dhariwal 2024, "Improved Techniques for Training Consistency Models"): the loss over adjacent noise levels,

    sigma_hi = sigma_i > sigma_lo = sigma_{i+1} on a Karras grid of N levels (descending, sigma_max ... sigma_min)
    x_hi = x0 + sigma_hi z                          z ~ N(0, I), x0 from the data
    x_lo = a point at sigma_lo on x_hi's ODE path   (CD: one teacher solver step; CT/iCT: x0 + sigma_lo z)
    L    = lambda(sigma_hi, sigma_lo) d(f_theta(x_hi, sigma_hi), SG f_theta-(x_lo, sigma_lo))

with f a models.consistency.ConsistencyFunction (f(x, sigma_min) = x by construction) and f_theta- the target:
an EMA of the student, theta- <- mu theta- + (1 - mu) theta after every optimiser step (`after_step`), or the
student itself under stop-gradient when mu = 0 (iCT always; CD on CIFAR-10). Both evaluations share one dropout
mask (the RNG is replayed for the target, as the official code does). A subclass chooses the grid size N(step), the
target rate mu(step), how intervals are drawn (ect: continuous levels instead of a grid), the weight lambda and
x_lo; this class does the rest, and samples with solvers.consistency (Algorithm 1): one step f(sigma_max z,
sigma_max), or several with re-noising at `sample_sigmas`.
"""
import contextlib

import torch

from models.consistency import ConsistencyFunction
from models.ema import update_ema
from models.noise import append_dims
from objectives.base import Objective, frozen_copy, init_from_teacher, teacher_preconditioning
from objectives.distances import make_distance
from solvers import karras, sample_consistency


def random_state(device):
    """The RNG state that the next random draws (dropout masks) on `device` start from."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_random_draws(state, device):
    """Inside: the RNG as `state` left it (a forward pass draws the same dropout masks again); after: as before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class ConsistencyObjective(Objective):
    """Base of cd / ct / ict / ect: student, target, the loss above, multistep sampling (module docstring)."""

    few_step = True         # a one- or few-step generator: python -m runs.bench leaderboard ranks it
    eval_nfe = 1

    def __init__(self, backbone, teacher=None, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
                 distance="mse", sample_sigmas=()):
        super().__init__()
        if not 0 < sigma_min < sigma_max or not rho > 0:
            raise ValueError(f"consistency models need 0 < sigma_min < sigma_max and rho > 0; got sigma_min="
                             f"{sigma_min}, sigma_max={sigma_max}, rho={rho}")
        if teacher is not None and hasattr(teacher, "backbone"):  # CD: the student starts as the teacher
            if getattr(teacher, "parameterisation", "edm") != "edm":
                raise ValueError(f"a consistency student starts from the teacher's backbone under EDM-like "
                                 f"coefficients: the teacher must be edm-parameterised, got "
                                 f"{teacher.parameterisation!r}")
            init_from_teacher(backbone, teacher)
            sigma_data = teacher_preconditioning(teacher, "edm", None)[1]
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_data = float(sigma_data)
        self.networks["student"] = self.make_student(backbone, self.sigma_data)
        self.conditional = bool(getattr(backbone, "label_dim", 0))
        self.distance = make_distance(distance)
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        if any(not self.sigma_min < s < self.sigma_max for s in self.sample_sigmas) or \
                self.sample_sigmas != sorted(self.sample_sigmas, reverse=True):
            raise ValueError(f"sample_sigmas (the re-noising levels of multistep sampling) must decrease strictly "
                             f"inside ({sigma_min}, {sigma_max}); got {list(sample_sigmas)}")
        self.target = None  # the EMA target network, made at the first step with mu > 0
        self._grids = {}

    # -- what a method chooses

    def make_student(self, backbone, sigma_data):
        return ConsistencyFunction(backbone, sigma_data, self.sigma_min)

    def grid_size(self, step):
        """N(step), the number of levels (a method without a grid overrides levels() instead)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither grid_size() nor levels()")

    def target_decay(self, step):
        return 0.0

    def draw_intervals(self, n, grid, device):
        """n indices i of intervals grid[i] > grid[i + 1]; uniform by default (CD, CT)."""
        return torch.randint(0, len(grid) - 1, (n,), device=device)

    def weight(self, sigma_hi, sigma_lo):
        return torch.ones_like(sigma_hi)

    def lower_point(self, x0, z, x_hi, sigma_hi, sigma_lo, labels):
        """x_lo; by default consistency training's: the same noise at the lower level (CD takes a teacher step)."""
        return x0 + append_dims(sigma_lo, x0.ndim) * z

    # -- the shared algorithm

    def grid(self, n_levels, device):
        """The N Karras levels sigma_max ... sigma_min (float32, on `device`), made once per N."""
        key = (n_levels, str(device))
        if key not in self._grids:
            levels = karras(n_levels, self.sigma_min, self.sigma_max, self.rho)[:-1]
            self._grids[key] = levels.to(device=device, dtype=torch.float32)
        return self._grids[key]

    def target_network(self, step):
        """f_theta-: the student itself (mu = 0, used under no_grad) or the EMA copy."""
        student = self.networks["student"]
        if self.target is None:
            return student
        return self.target.train(student.training)  # train mode: the same dropout as the student's pass

    def levels(self, n, device, step):
        """(sigma_hi, sigma_lo) [n]: adjacent levels of the Karras grid of grid_size(step), drawn by draw_intervals."""
        grid = self.grid(self.grid_size(step), device)
        index = self.draw_intervals(n, grid, device)
        return grid[index], grid[index + 1]

    def target_values(self, x_lo, sigma_lo, x0, labels, step):
        """SG f_theta-(x_lo, sigma_lo), evaluated under no_grad with the online pass's dropout mask."""
        return self.target_network(step)(x_lo, sigma_lo, labels)

    def loss(self, role, batch, step):
        x0, labels = batch[0], batch[-1]
        labels = labels if self.conditional else None
        sigma_hi, sigma_lo = self.levels(x0.shape[0], x0.device, step)
        z = torch.randn_like(x0)
        x_hi = x0 + append_dims(sigma_hi, x0.ndim) * z
        with torch.no_grad():
            x_lo = self.lower_point(x0, z, x_hi, sigma_hi, sigma_lo, labels)
        draws = random_state(x0.device)
        online = self.networks["student"](x_hi, sigma_hi, labels)
        with torch.no_grad(), replayed_random_draws(draws, x0.device):  # one dropout mask for both passes
            target = self.target_values(x_lo, sigma_lo, x0, labels, step)
        loss = (self.weight(sigma_hi, sigma_lo) * self.distance(online, target)).mean()
        return loss, {"loss": loss.detach()}

    def after_step(self, role, step):
        """theta- <- mu theta- + (1 - mu) theta after the optimiser step (mu = target_decay(step))."""
        mu = self.target_decay(step)
        if mu == 0 and self.target is None:
            return
        student = self.networks["student"]
        if self.target is None:
            self.target = frozen_copy(student)
        update_ema(self.target, student, mu)

    def consistency_function(self):
        """The f(x, sigma) that samples: the student itself (ect: its boundary-shifted evaluation)."""
        return self.networks["student"]

    def state_dict(self):
        return {} if self.target is None else {"target": {k: v.detach().clone()
                                                          for k, v in self.target.state_dict().items()}}

    def load_state_dict(self, state):
        if "target" in state:
            self.target = frozen_copy(self.networks["student"], state["target"])

    def generate(self, z, nfe, cond=None):
        """Algorithm 1: one step f(sigma_max z, sigma_max), or nfe steps re-noised at sample_sigmas[:nfe - 1]; without
        enough sample_sigmas, at the nfe - 1 inner levels of the (nfe + 1)-level Karras grid (2.52 for nfe = 2)."""
        levels = self.sample_sigmas[:nfe - 1] if len(self.sample_sigmas) >= nfe - 1 else \
            karras(nfe + 1, self.sigma_min, self.sigma_max, self.rho)[1:-2].tolist()
        sigmas = torch.tensor([self.sigma_max, *levels, 0.0], dtype=torch.float64)
        labels = (cond or {}).get("class_labels") if self.conditional else None
        return sample_consistency(self.consistency_function(), self.sigma_max * z, sigmas,
                                  cond=None if labels is None else {"class_labels": labels}, sigma_min=self.sigma_min)
