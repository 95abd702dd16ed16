"""Distances for regression losses: `make_distance(name, **kwargs)(pred, target) -> [B]`, one value per sample.

  mse           mean squared error over the sample's elements
  l1            mean absolute error (Luhman & Luhman 2021 use L1 for CIFAR-10)
  pseudo_huber  sqrt(||pred - target||^2 + c^2) - c (Song & Dhariwal 2023, iCT, Sec. 3.3), c = 0.00054 sqrt(d) by
                default, d the number of elements of a sample
"""
import math

import torch
from torch import nn


class MSE(nn.Module):
    """Mean squared error per sample."""

    def forward(self, pred, target):
        return (pred - target).float().square().flatten(1).mean(1)


class L1(nn.Module):
    """Mean absolute error per sample."""

    def forward(self, pred, target):
        return (pred - target).float().abs().flatten(1).mean(1)


class PseudoHuber(nn.Module):
    """sqrt(||pred - target||^2 + c^2) - c; c defaults to iCT's 0.00054 sqrt(d)."""

    def __init__(self, c=None):
        super().__init__()
        self.c = c

    def forward(self, pred, target):
        diff = (pred - target).float().flatten(1)
        c = 0.00054 * math.sqrt(diff.shape[1]) if self.c is None else self.c
        return (diff.square().sum(1) + c**2).sqrt() - c


DISTANCES = {
    "mse": MSE,
    "l1": L1,
    "pseudo_huber": PseudoHuber,
}


def make_distance(name, **kwargs):
    """The distance `name` built with `kwargs`; a one-line ValueError lists the known names."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; known: {', '.join(sorted(DISTANCES))}")
    distance = DISTANCES[name](**kwargs)
    return distance.requires_grad_(False).eval()
