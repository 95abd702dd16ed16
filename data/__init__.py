"""Datasets yielding (x, label): images float32 [C, H, W] in [-1, 1], toy vectors float32 [D]; label int64.

Every dataset has `shape`, `num_classes` (0 = unlabelled) and keyword-only configuration with defaults.
`DATASETS` is the registry the command line picks from (`--data NAME`); add your own with DATASETS["mine"] = Mine.
"""

from .cifar import CIFAR10
from .imagefolder import ImageFolder
from .mixtures import GaussianMixtureData
from .mnist import MNIST
from .toy import Checkerboard, EightGaussians, Moons, SwissRoll

DATASETS = {
    "mnist": MNIST,
    "cifar10": CIFAR10,
    "imagefolder": ImageFolder,
    "moons": Moons,
    "8gaussians": EightGaussians,
    "checkerboard": Checkerboard,
    "swissroll": SwissRoll,
    "gmm": GaussianMixtureData,
}

__all__ = ["DATASETS", "MNIST", "CIFAR10", "ImageFolder", "Moons", "EightGaussians", "Checkerboard", "SwissRoll",
           "GaussianMixtureData"]
