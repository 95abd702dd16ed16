"""A two-role objective for testing the loop (not a method): a denoiser trained by DSM, and a critic trained on the
denoiser's output with that output NOT detached, so a loop that left the denoiser trainable during the critic's
phase would give it gradients. The critic is updated twice on odd steps (a two time-scale rule), the denoiser once
on even steps. A frozen `teacher` module enters both losses and must never change.

Run as a script, it registers itself as objective "two_roles" and calls runs.train.main (for torchrun tests)."""
import copy
import sys

import torch

from models.denoiser import Denoiser
from models.noise import append_dims
from objectives.base import Objective


class TwoRoles(Objective):
    def __init__(self, backbone, critic_lr=1e-3):
        super().__init__()
        self.networks["denoiser"] = Denoiser(backbone, "edm", 0.5)
        critic = copy.deepcopy(backbone)
        torch.nn.init.normal_(critic.out.weight, std=0.01)
        self.networks["critic"] = Denoiser(critic, "edm", 0.5)
        self.teacher = torch.nn.Linear(backbone.dim, backbone.dim).requires_grad_(False)
        self.critic_lr = critic_lr
        self.phase = None
        self.gradients = []  # (phase being trained, role whose parameter received a gradient), per parameter
        for role, net in self.networks.items():
            for p in net.parameters():
                p.register_post_accumulate_grad_hook(lambda p, role=role: self.gradients.append((self.phase, role)))

    def phases(self, step):
        return ["denoiser"] if step % 2 == 0 else ["critic", "critic"]

    def optimizer_settings(self):
        return {"critic": {"optimizer": "adamw", "lr": self.critic_lr, "weight_decay": 0.01, "ema": False}}

    def loss(self, role, batch, step):
        self.phase = role
        x0, _ = batch
        sigma = torch.full((x0.shape[0],), 0.5)
        noisy = self.teacher(x0) * 0 + x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        x0_hat = self.networks["denoiser"](noisy, sigma)
        if role == "denoiser":
            loss = (x0_hat - x0).square().mean()
        else:  # gradient flows through the (frozen) denoiser to the critic's input, never into its parameters
            loss = (self.networks["critic"](x0_hat, sigma) - x0).square().mean()
        return loss, {"loss": loss.detach()}

    def generate(self, z, nfe, cond=None):
        return self.networks["denoiser"](z, torch.full((z.shape[0],), 1.0))


if __name__ == "__main__":
    from objectives import OBJECTIVES
    from runs import train

    OBJECTIVES["two_roles"] = TwoRoles
    train.main(sys.argv[1:])
