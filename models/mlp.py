"""A residual MLP backbone for vector data (toy 2-D sets, the analytic mixtures in d dimensions).

Same backbone contract as the U-Net: forward(x [B, D], noise_labels [B], class_labels=None) -> [B, D]; it knows
nothing of sigma. The noise label is embedded as in DDPM++ (sinusoidal, then a 2-layer MLP) and added to each block.
Class labels are handled as in the U-Net: int64 indices [B] or float one-hot / soft rows [B, label_dim]; None is the
null label (the all-zero row, so an all-zero row and None give the same output), and `label_dropout` replaces a
label by the null label with that probability in training only, which classifier-free guidance needs (Ho &
Salimans 2022; solvers/guidance.py).
"""
import torch
from torch import nn
from torch.nn import functional as F

from models.unet import FourierEmbedding, PositionalEmbedding


class MLP(nn.Module):
    """Residual MLP for vector data [B, D], with noise and optional class embedding."""

    def __init__(self, dim=2, hidden=256, num_blocks=4, emb_channels=128, label_dim=0, dropout=0.0,
                 embedding="fourier", label_dropout=0.0):
        super().__init__()
        if embedding not in ("fourier", "positional"):
            raise ValueError(f"unknown embedding {embedding!r}; known: fourier, positional")
        if not (0 <= label_dropout <= 1 and label_dim >= 0):
            raise ValueError(f"need 0 <= label_dropout <= 1 and label_dim >= 0; got label_dropout={label_dropout}, "
                             f"label_dim={label_dim}")
        self.dim, self.label_dim, self.label_dropout = dim, label_dim, label_dropout
        self.noise_embed = FourierEmbedding(emb_channels) if embedding == "fourier" else PositionalEmbedding(emb_channels)
        self.emb = nn.Sequential(nn.Linear(emb_channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=nn.LayerNorm(hidden), fc1=nn.Linear(hidden, 2 * hidden),
                               fc2=nn.Linear(2 * hidden, hidden), emb=nn.Linear(hidden, 4 * hidden)))
            for _ in range(num_blocks))
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _labels(self, class_labels, batch, device):
        """Class labels as float [B, label_dim] (None = the null label, zeros), with label dropout in training."""
        if class_labels is None:
            labels = torch.zeros(batch, self.label_dim, device=device)
        elif class_labels.dtype in (torch.int64, torch.int32) and class_labels.shape == (batch,):
            labels = F.one_hot(class_labels.long(), self.label_dim).float()
        elif class_labels.is_floating_point() and class_labels.shape == (batch, self.label_dim):
            labels = class_labels.float()
        else:
            raise ValueError(f"class_labels must be int indices [{batch}] or float [{batch}, {self.label_dim}]; "
                             f"got {class_labels.dtype} {list(class_labels.shape)}")
        if self.training and self.label_dropout > 0:
            keep = torch.rand(batch, 1, device=device) >= self.label_dropout
            labels = labels * keep
        return labels

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.emb(self.noise_embed(noise_labels))
        if self.label_embed is not None:
            emb = emb + self.label_embed(self._labels(class_labels, x.shape[0], x.device))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional MLP (label_dim=0); pass None or set label_dim")
        h = self.inp(x)
        for block in self.blocks:
            scale, shift = block["emb"](F.silu(emb)).chunk(2, dim=1)
            y = F.silu(block["fc1"](block["norm"](h)))
            h = h + block["fc2"](self.dropout(y * (1 + scale) + shift))
        return self.out(F.silu(self.out_norm(h)))
