"""A residual MLP backbone for vector data (toy 2-D sets, the analytic mixtures in d dimensions).

Same backbone contract as the U-Net: forward(x [B, D], noise_labels [B], class_labels=None) -> [B, D]; it knows
nothing of sigma. The noise label is embedded as in DDPM++ (sinusoidal, then a 2-layer MLP) and added to each block.
Class labels are handled as in the U-Net: int64 indices [B] or float one-hot / soft rows [B, label_dim]; None is the
null label (the all-zero row, so an all-zero row and None give the same output), and `label_dropout` replaces a
label by the null label with that probability in training only, which classifier-free guidance needs (Ho &
Salimans 2022; solvers/guidance.py).

`add_guidance_embedding(dim)` gives the net a guidance-weight input for guidance distillation (Meng et al. 2023;
objectives/guidance_distill.py), as in the U-Net: forward(..., guidance=w), w [B], is embedded sinusoidally, passed
through a 2-layer MLP whose last layer starts at zero, and added to the noise embedding; a net started from a
teacher's weights thus computes exactly the teacher for every w until it trains. Such a net requires `guidance`;
others refuse it.
"""
import copy

from torch import nn
from torch.nn import functional as F

from models.labels import label_rows
from models.unet import (GUIDANCE_MAX_POSITIONS, FourierEmbedding, PositionalEmbedding, check_guidance_dim,
                         guidance_weights, target_labels)


class MLP(nn.Module):
    """Residual MLP for vector data [B, D], with noise and optional class (and guidance-weight) embedding."""

    GUIDANCE_PREFIXES = ("guidance_embed",)  # what add_guidance_embedding adds (a teacher lacks them)
    TARGET_PREFIXES = ("target_embed",)      # what add_target_embedding adds

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
        self.guidance_dim = 0  # add_guidance_embedding sets it
        self.two_time = False  # add_target_embedding sets it
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

    def add_guidance_embedding(self, dim):
        """Give the net a guidance-weight input (module docstring): `dim` sinusoidal channels of w, then
        Linear-SiLU-Linear into the noise embedding, the last layer zero-initialised. Returns self."""
        self.guidance_dim = check_guidance_dim(dim, self.guidance_dim)
        hidden, like = self.inp.out_features, self.inp.weight
        self.guidance_embed = nn.Sequential(PositionalEmbedding(self.guidance_dim, GUIDANCE_MAX_POSITIONS),
                                            nn.Linear(self.guidance_dim, hidden), nn.SiLU(),
                                            nn.Linear(hidden, hidden)).to(like.device, like.dtype)
        nn.init.zeros_(self.guidance_embed[-1].weight)
        nn.init.zeros_(self.guidance_embed[-1].bias)
        return self

    def add_target_embedding(self):
        """Give the net a second time input, target_noise_labels [B] (models/flow_map.py; as the U-Net's): a copy
        of the noise embedding's kind, then Linear-SiLU-Linear into the noise embedding, the last layer
        zero-initialised, so a teacher-initialised net computes the teacher for every target. Returns self."""
        if self.two_time:
            raise ValueError("this net has a second time input already")
        hidden, like = self.inp.out_features, self.inp.weight
        width = self.emb[0].in_features
        self.target_embed = nn.Sequential(copy.deepcopy(self.noise_embed), nn.Linear(width, hidden), nn.SiLU(),
                                          nn.Linear(hidden, hidden)).to(like.device, like.dtype)
        nn.init.zeros_(self.target_embed[-1].weight)
        nn.init.zeros_(self.target_embed[-1].bias)
        self.two_time = True
        return self

    def _labels(self, class_labels, batch, device):
        return label_rows(class_labels, batch, self.label_dim, device, self.label_dropout, self.training)

    def forward(self, x, noise_labels, class_labels=None, **extra):
        return self.out(F.silu(self.out_norm(self.features(x, noise_labels, class_labels, **extra)[-1])))

    def features(self, x, noise_labels, class_labels=None, **extra):
        """The hidden state [B, hidden] after each block, shallow to deep (what a discriminator head reads)."""
        guidance, target = extra.pop("guidance", None), extra.pop("target_noise_labels", None)
        if extra:
            raise ValueError(f"MLP got unexpected inputs {sorted(extra)}; it takes x, noise_labels, class_labels"
                             + (", guidance" if self.guidance_dim else "")
                             + (", target_noise_labels" if self.two_time else ""))
        emb = self.emb(self.noise_embed(noise_labels))
        if self.two_time or target is not None:
            target = target_labels(target, x.shape[0], x.device, "MLP", self.two_time)
            emb = emb + self.target_embed(target)
        if self.guidance_dim or guidance is not None:
            w = guidance_weights(guidance, x.shape[0], x.device, type(self).__name__, self.guidance_dim)
            emb = emb + self.guidance_embed(w)
        if self.label_embed is not None:
            emb = emb + self.label_embed(self._labels(class_labels, x.shape[0], x.device))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional MLP (label_dim=0); pass None or set label_dim")
        h, hidden = self.inp(x), []
        for block in self.blocks:
            scale, shift = block["emb"](F.silu(emb)).chunk(2, dim=1)
            y = F.silu(block["fc1"](block["norm"](h)))
            h = h + block["fc2"](self.dropout(y * (1 + scale) + shift))
            hidden.append(h)
        return hidden or [h]
