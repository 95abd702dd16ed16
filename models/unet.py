"""U-Net backbone of the DDPM++ / ADM family (Song et al. 2021; Dhariwal & Nichol 2021; EDM, Karras et al. 2022).

The layout follows EDM's DDPM++ network (`SongUNet`, its "ddpmpp" configuration): a noise embedding (sinusoidal,
or random Fourier features) plus an optional class embedding feed a two-layer MLP; the encoder has `num_blocks`
residual blocks per resolution and halves the resolution between levels; a middle pair of blocks; the decoder has
`num_blocks + 1` blocks per level, each taking the matching encoder activation concatenated on the channels.
Residual blocks apply the embedding as an adaptive scale and shift after the second GroupNorm,
h = silu(norm(h) * (1 + scale) + shift) (ADM; adaptive_scale=False gives DDPM++'s shift-only
h = silu(norm(h + shift))), and scale the residual sum by skip_scale = 1/sqrt(2). The last conv of
every block, of every attention projection and of the output is initialised near zero (weights * 1e-5), so an
untrained net outputs ~0 and every block starts close to the identity.

Resampling is by a 2x2 box filter: average pooling down, nearest-neighbour up. This is what EDM's DDPM++ default
resample_filter=[1, 1] computes, written plainly.

A backbone knows nothing of sigma: it maps (x, noise_labels [B], class_labels) to a tensor shaped like x.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.labels import label_rows
from models.noise import noise_label_batch

try:
    import xformers.ops as xformers_ops
except Exception:  # not installed, or built for another torch / CUDA: fall back to SDPA
    xformers_ops = None

EMBEDDINGS = ("positional", "fourier")


def use_xformers(q):
    """Whether `attention` will try xformers for this tensor: only when it is importable and q is on CUDA."""
    return xformers_ops is not None and q.is_cuda


def attention(q, k, v):
    """Softmax attention softmax(q k^T / sqrt(d)) v over [B, heads, L, d] tensors, via xformers or PyTorch SDPA."""
    if use_xformers(q):
        try:  # xformers wants [B, L, heads, d]
            out = xformers_ops.memory_efficient_attention(
                q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
            return out.transpose(1, 2)
        except (NotImplementedError, RuntimeError, ValueError):  # no kernel for this dtype / shape / device
            pass
    return F.scaled_dot_product_attention(q, k, v)


def group_count(channels):
    """GroupNorm groups: the largest divisor of `channels` not above min(32, channels // 4) (EDM's rule)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's dtype, so that bf16 autocast stays sane."""

    def __init__(self, channels, eps=1e-6):
        super().__init__(group_count(channels), channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def init_layer(layer, scale=1.0):
    """Xavier-uniform weights times `scale` (EDM's init for DDPM++), zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    nn.init.zeros_(layer.bias)
    return layer


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a [B] float: [cos(t f_i), sin(t f_i)], f_i = max_positions^(-i/(n-1))."""

    def __init__(self, channels, max_positions=10000):
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi t f_i), sin(2 pi t f_i)], f_i ~ N(0, scale^2), fixed (NCSN++)."""

    def __init__(self, channels, scale=16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, t):
        angles = t.float()[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([angles.cos(), angles.sin()], dim=1)


GUIDANCE_MAX_POSITIONS = 1000  # the guidance embedding's lowest frequency is 1/1000: smooth over w in [0, ~10]


def scalar_input(value, batch, device, name, what, enabled, how):
    """An extra per-sample scalar input of a backbone (the guidance weight, a flow map's target noise label) as float32
    [B]; a one-line ValueError when it is missing (`enabled`) or not wanted (`how` says how to add it)."""
    if not enabled:
        raise ValueError(f"{what} given to a {name} without that input ({how})")
    if value is None:
        raise ValueError(f"this {name} has a {what} input ({how}) and needs {what} (a [B] tensor) at every call")
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    value = value.expand(batch) if value.ndim == 0 else value
    if value.shape != (batch,):
        raise ValueError(f"{what} must be a scalar or have shape [{batch}]; got {list(value.shape)}")
    return value


def guidance_weights(guidance, batch, device, name, guidance_dim):
    """A backbone's `guidance` input as float32 [B]; a one-line ValueError when it is missing or not wanted."""
    return scalar_input(guidance, batch, device, name, "guidance", guidance_dim,
                        f"guidance_dim={guidance_dim}, see add_guidance_embedding")


def target_labels(target, batch, device, name, two_time):
    """A two-time backbone's `target_noise_labels` (the noise label of the level a flow map jumps to, see
    models/flow_map.py) as float32 [B]; a one-line ValueError when it is missing or not wanted."""
    return scalar_input(target, batch, device, name, "target_noise_labels", two_time,
                        "a second time input, see add_target_embedding")


def check_guidance_dim(dim, current):
    """`dim` as an int when it is a positive even number and the net has no guidance embedding yet."""
    if current:
        raise ValueError(f"this net has a guidance embedding already (guidance_dim={current})")
    if isinstance(dim, bool) or int(dim) != dim or dim < 2 or dim % 2:
        raise ValueError(f"guidance_dim must be a positive even number; got {dim!r}")
    return int(dim)


class ResBlock(nn.Module):
    """Pre-activation residual block with adaptive scale/shift from the embedding, optional resampling by 2 and
    optional multi-head self-attention after it."""

    def __init__(self, in_channels, out_channels, emb_channels, resample=None, attention=False,
                 channels_per_head=64, num_heads=None, dropout=0.0, skip_scale=2**-0.5, adaptive_scale=True):
        super().__init__()
        self.resample = resample
        self.adaptive_scale = adaptive_scale
        self.skip_scale = skip_scale
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = init_layer(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = init_layer(nn.Linear(emb_channels, (2 if adaptive_scale else 1) * out_channels))
        self.norm1 = GroupNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = init_layer(nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=1e-5)
        self.skip = None
        if in_channels != out_channels or resample is not None:
            self.skip = init_layer(nn.Conv2d(in_channels, out_channels, 1))
        self.num_heads = 0
        if attention:
            self.num_heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
            if out_channels % self.num_heads:
                raise ValueError(f"attention at {out_channels} channels cannot be split into {self.num_heads} "
                                 f"heads; choose num_heads / channels_per_head that divide it")
            self.norm2 = GroupNorm(out_channels)
            self.qkv = init_layer(nn.Conv2d(out_channels, 3 * out_channels, 1), scale=math.sqrt(0.2))
            self.proj = init_layer(nn.Conv2d(out_channels, out_channels, 1), scale=1e-5)

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        h = self._resample(F.silu(self.norm0(x)))
        h = self.conv0(h)
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:  # ADM: h = norm(h) * (1 + scale) + shift
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (1 + scale) + shift)
        else:  # DDPM++: the embedding is a bias added before the norm
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
            h = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # [B, heads, HW, d]
            h = h.transpose(-1, -2).reshape(B, C, H, W)
            x = (self.proj(h) + x) * self.skip_scale
        return x


class UNet(nn.Module):
    """DDPM++ / ADM-style U-Net: forward(x [B,C,H,W], noise_labels [B], class_labels=None) -> tensor shaped like x.

    Configs (parameter counts measured with this code):
      The defaults, sized so that every default run trains in minutes on a 2-core CPU: img_resolution=28,
        in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7,).
      MNIST at the earlier default: model_channels=32, num_blocks=2: 1,901,601 parameters (1,901,953 with
        label_dim=10); the shipped MNIST teacher (runs/configs/mnist_teacher.yaml) uses 16 channels and 2 blocks.
      CIFAR-10 DDPM++ as in EDM: img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
        num_blocks=4, attn_resolutions=(16,), dropout=0.13, adaptive_scale=False, num_heads=1:
        55,732,739 parameters (55,734,147 with label_dim=10), EDM's SongUNet count (55.73 M).
        With the default adaptive_scale=True (ADM-style scale and shift): 60,066,563.

    Class labels are int64 indices [B] or float one-hot / soft labels [B, label_dim]; None means the null label
    (the zero vector), which `label_dropout` trains for classifier-free guidance.

    Guidance-weight input (guidance distillation, Meng et al. 2023; objectives/guidance_distill.py): after
    `add_guidance_embedding(dim)` forward takes guidance=w, a [B] tensor (or a scalar), embedded sinusoidally
    (GUIDANCE_MAX_POSITIONS) and, through a zero-initialised linear layer, added to the noise embedding like the class
    embedding. The zero init makes a net started from a teacher's weights (init_from_teacher with allow_missing=
    GUIDANCE_PREFIXES) compute exactly the teacher for every w. Such a net requires `guidance`; others refuse it.
    It is a method, not a constructor argument, so that FNOUNet keeps taking exactly UNet's arguments.

    Second time input (two-time students, flow maps: models/flow_map.py): after `add_target_embedding()` forward takes
    target_noise_labels=c, a [B] tensor, the noise label of the level the output jumps to, embedded as the noise label
    is (a second embedding module of the same kind) and, through a zero-initialised linear layer, added to the noise
    embedding. Zero-initialised, so a student started from a teacher's weights (allow_missing=TARGET_PREFIXES)
    computes exactly the teacher for every target until it trains (CTM's initialisation). Such a net requires it.
    """

    GUIDANCE_PREFIXES = ("map_guidance",)  # what add_guidance_embedding adds (a teacher lacks them)
    TARGET_PREFIXES = ("map_target",)      # what add_target_embedding adds

    def __init__(
        self,
        img_resolution=28,          # height = width of the images
        in_channels=1,              # channels of x
        out_channels=None,          # channels of the output; None = in_channels
        label_dim=0,                # number of classes; 0 = unconditional
        model_channels=16,          # base channel count; level i has model_channels * channel_mult[i]
        channel_mult=(1, 2, 2),     # channel multiplier per resolution level (resolution halves per level)
        num_blocks=1,               # residual blocks per level in the encoder (decoder: num_blocks + 1)
        attn_resolutions=(7,),      # resolutions whose encoder/decoder blocks get self-attention
        mid_attention=True,         # self-attention in the middle (lowest-resolution) block, as DDPM++ / ADM
        channels_per_head=64,       # attention heads = channels // channels_per_head (at least 1) ...
        num_heads=None,             # ... unless a fixed head count is given here
        dropout=0.0,                # dropout probability inside residual blocks
        embedding="positional",     # noise embedding: "positional" (sinusoidal) or "fourier" (random features)
        max_positions=10000,        # positional embedding: lowest frequency is 1 / max_positions
        fourier_scale=16.0,         # fourier embedding: std of the random frequencies
        channel_mult_emb=4,         # embedding width = model_channels * channel_mult_emb
        label_dropout=0.0,          # training only: probability of replacing a label by the null label
        skip_scale=2**-0.5,         # scale of every residual sum (1/sqrt(2) as in DDPM++)
        adaptive_scale=True,        # embedding as scale and shift after the norm (ADM); False: shift only (DDPM++)
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        levels = len(channel_mult)
        if levels < 1 or min(channel_mult) < 1 or model_channels < 1 or num_blocks < 1:
            raise ValueError(f"UNet needs channel_mult of positive ints, model_channels >= 1, num_blocks >= 1; "
                             f"got channel_mult={tuple(channel_mult)}, model_channels={model_channels}, "
                             f"num_blocks={num_blocks}")
        if img_resolution < 1 or img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2**(len(channel_mult)-1)="
                             f"{2 ** (levels - 1)}; choose a resolution or fewer levels that fit")
        resolutions = [img_resolution // 2**level for level in range(levels)]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} do not occur in this UNet; the resolutions are {resolutions}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; known: {', '.join(EMBEDDINGS)}")
        if not (0 <= dropout < 1 and 0 <= label_dropout <= 1 and label_dim >= 0):
            raise ValueError(f"need 0 <= dropout < 1, 0 <= label_dropout <= 1, label_dim >= 0; got dropout={dropout}"
                             f", label_dropout={label_dropout}, label_dim={label_dim}")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout

        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, num_heads=num_heads,
                     dropout=dropout, skip_scale=skip_scale, adaptive_scale=adaptive_scale)
        if embedding == "positional":
            self.map_noise = PositionalEmbedding(model_channels, max_positions)
        else:
            self.map_noise = FourierEmbedding(model_channels, fourier_scale)
        self.map_label = init_layer(nn.Linear(label_dim, model_channels)) if label_dim else None
        self.guidance_dim = 0  # add_guidance_embedding sets it
        self.two_time = False  # add_target_embedding sets it
        self.map_layer0 = init_layer(nn.Linear(model_channels, emb_channels))
        self.map_layer1 = init_layer(nn.Linear(emb_channels, emb_channels))

        # Encoder: a conv, then per level (a down block if not the first) and num_blocks blocks.
        self.enc = nn.ModuleList()
        self.enc_in = init_layer(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        channels, skips = model_channels, [model_channels]
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.enc.append(ResBlock(channels, channels, resample="down", **block))
                skips.append(channels)
            for _ in range(num_blocks):
                attn = resolutions[level] in attn_resolutions
                self.enc.append(ResBlock(channels, model_channels * mult, attention=attn, **block))
                channels = model_channels * mult
                skips.append(channels)

        self.mid = nn.ModuleList([ResBlock(channels, channels, attention=mid_attention, **block),
                                  ResBlock(channels, channels, **block)])

        # Decoder: per level from the bottom, (an up block if not the lowest level) and num_blocks + 1 blocks that
        # each consume one encoder activation; attention on the last block of a level in attn_resolutions.
        self.dec = nn.ModuleList()
        self.dec_skip = []  # whether dec[i] concatenates an encoder activation (static, compile-friendly)
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level < levels - 1:
                self.dec.append(ResBlock(channels, channels, resample="up", **block))
                self.dec_skip.append(False)
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and resolutions[level] in attn_resolutions
                self.dec.append(ResBlock(channels + skips.pop(), model_channels * mult, attention=attn, **block))
                self.dec_skip.append(True)
                channels = model_channels * mult
        self.out_norm = GroupNorm(channels)
        self.out_conv = init_layer(nn.Conv2d(channels, out_channels, 3, padding=1), scale=1e-5)

    def add_guidance_embedding(self, dim):
        """Give the net a guidance-weight input (see the class docstring): `dim` sinusoidal channels of w, then a
        zero-initialised linear map into the noise embedding. Parameters under GUIDANCE_PREFIXES. Returns self."""
        self.guidance_dim = check_guidance_dim(dim, self.guidance_dim)
        like = self.map_layer0.weight
        self.map_guidance = PositionalEmbedding(self.guidance_dim, GUIDANCE_MAX_POSITIONS).to(like.device)
        self.map_guidance_proj = nn.Linear(self.guidance_dim, self.map_layer0.in_features,
                                           device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.map_guidance_proj.weight)
        nn.init.zeros_(self.map_guidance_proj.bias)
        return self

    def add_target_embedding(self):
        """Give the net a second time input (see the class docstring): a copy of the noise embedding's kind, then a
        zero-initialised linear map into the noise embedding. Parameters under TARGET_PREFIXES. Returns self."""
        if self.two_time:
            raise ValueError("this net has a second time input already")
        like = self.map_layer0.weight
        self.map_target = copy.deepcopy(self.map_noise)  # a fourier embedding keeps its frequencies
        self.map_target_proj = nn.Linear(like.shape[1], like.shape[1], device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.map_target_proj.weight)
        nn.init.zeros_(self.map_target_proj.bias)
        self.two_time = True
        return self

    def num_params(self):
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _labels(self, class_labels, batch, device):
        return label_rows(class_labels, batch, self.label_dim, device, self.label_dropout, self.training)

    def check_inputs(self, x, class_labels, extra):
        """The input checks every forward of this family makes (x's shape, labels only when conditional)."""
        name = type(self).__name__
        if extra:
            raise ValueError(f"{name} got unexpected inputs {sorted(extra)}; it takes x, noise_labels, class_labels")
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f"{name} expects x of shape [B, {self.in_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}]; got {list(x.shape)}")
        if self.map_label is None and class_labels is not None:
            raise ValueError(f"class_labels given to an unconditional {name} (label_dim=0); pass None or set label_dim")

    def forward(self, x, noise_labels, class_labels=None, **extra):
        h, skips, emb = self.encode(x, noise_labels, class_labels, **extra)
        for block, takes_skip in zip(self.dec, self.dec_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.to(x.dtype)

    def features(self, x, noise_labels, class_labels=None, **extra):
        """The encoder's activations a discriminator head reads (LADD, DMD2's GAN head): the output of each
        resolution level (its last block), then of the middle blocks (the bottleneck), shallow to deep, each
        [B, C_l, H_l, W_l]."""
        h, skips, _ = self.encode(x, noise_labels, class_labels, **extra)
        level_ends = [i for i in range(1, len(self.enc) + 1)
                      if i == len(self.enc) or self.enc[i].resample == "down"]
        return [skips[i] for i in level_ends] + [h]

    def encode(self, x, noise_labels, class_labels=None, **extra):
        """(h after the middle blocks, the encoder activations the decoder consumes, the embedding)."""
        guidance, target = extra.pop("guidance", None), extra.pop("target_noise_labels", None)
        self.check_inputs(x, class_labels, extra)
        batch = x.shape[0]
        noise_labels = noise_label_batch(noise_labels, batch)

        emb = self.map_noise(noise_labels)
        if self.two_time or target is not None:
            target = target_labels(target, batch, x.device, type(self).__name__, self.two_time)
            emb = emb + self.map_target_proj(self.map_target(target))
        if self.map_label is not None:
            labels = self._labels(class_labels, batch, x.device)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.guidance_dim or guidance is not None:
            w = guidance_weights(guidance, batch, x.device, type(self).__name__, self.guidance_dim)
            emb = emb + self.map_guidance_proj(self.map_guidance(w))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = self.enc_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        return h, skips, emb
