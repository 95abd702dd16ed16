"""Exponential moving average of network weights, with EDM's half-life parameterisation.

EDM (Karras et al. 2022, training/training_loop.py) sets the EMA decay per step from a half-life in thousands of
images, ramped up early in training: beta = 0.5 ** (batch / max(halflife_nimg, 1e-8)), with
halflife_nimg = min(halflife_kimg * 1000, nimg * rampup_ratio) when a ramp-up ratio is given.
EMA weights are kept in float32 (bf16 updates round to zero).
"""
import copy

import torch


def ema_beta(nimg, batch_size, halflife_kimg, rampup_ratio=0.05):
    """Decay for one update after `nimg` training images have been seen."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def make_ema(net):
    """A frozen float32 copy of `net` to hold its running average."""
    ema = copy.deepcopy(net).float().eval().requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, net, beta):
    """ema <- beta * ema + (1 - beta) * net, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    net_params = [p.detach().float() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)
