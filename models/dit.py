"""DiT backbone: a Vision Transformer over image patches with adaLN-Zero conditioning.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023). What is implemented, by the paper's parts:

  Patchify (Sec. 3.2, Fig. 4). x [B, C, I, I] is cut into p x p patches, each linearly embedded to the hidden width
    d (a stride-p convolution, timm's `PatchEmbed`): T = (I / p)^2 tokens. A position embedding is added: the fixed
    2-D sine-cosine table of the paper ("sincos": half of the d channels encode the patch row, half the column, each
    as [sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-i / (d/4)), i < d/4) or a learned table ("learned").
  Conditioning (Sec. 3.2). c = t_emb + y_emb. t_emb = MLP(sinusoid(noise_label)): a 256-wide sinusoidal embedding
    [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / 128), then Linear-SiLU-Linear to d (DiT's TimestepEmbedder);
    here t is the backbone's noise label (EDM's c_noise = ln(sigma) / 4 under models.Denoiser), not a DDPM step.
    y_emb is a table of label_dim + 1 rows, the last row the null class used for classifier-free guidance.
  adaLN-Zero block (Sec. 3.2, Fig. 3, right). With (beta1, gamma1, alpha1, beta2, gamma2, alpha2) = Linear(SiLU(c)):
        x <- x + alpha1 * Attention(LN(x) * (1 + gamma1) + beta1)
        x <- x + alpha2 * MLP(LN(x) * (1 + gamma2) + beta2)
    LN without its own affine parameters (eps 1e-6), MLP = Linear(d, 4d)-GELU(tanh)-Linear(4d, d) (timm's `Mlp`),
    attention = multi-head self-attention over the T tokens (qkv Linear with bias, output projection). The
    modulation Linear is zero-initialised, so every alpha is 0 and every block starts as the identity ("-Zero").
  Decoder (Sec. 3.2, "Transformer decoder"). LN, an adaptive shift and scale from c (zero-initialised Linear), a
    Linear to p * p * out_channels per token (zero-initialised), rearranged back to [B, out_channels, I, I]. So a
    fresh DiT outputs exactly 0 (a Denoiser over it starts as D = c_skip x).
  Model sizes (Table 1): S 12 / 384 / 6, B 12 / 768 / 12, L 24 / 1024 / 16, XL 28 / 1152 / 16 (depth, hidden width,
    heads), by `size`; `depth`, `hidden_size`, `num_heads` override the size's values one by one.
  Initialisation as the reference code: Xavier-uniform Linear weights with zero bias, the patch convolution Xavier-
    uniform over its flattened weight, embedding MLP weights and the label table N(0, 0.02^2), the zeros above.
  Not implemented: the learned-sigma output (2 x channels for DDPM's variance; out_channels = in_channels here) and
    the in-context / cross-attention conditioning variants of Fig. 3 (only adaLN-Zero, the paper's best).

Parameter counts (in_channels=4, img_resolution=32, label_dim=1000, patch 2: the paper's 256 x 256 ImageNet latents;
measured with this code, on the meta device). The trainable count, then the reference implementation's, which is
exactly this plus the fixed sincos table (T * d, a buffer here) plus the learned-sigma half of the output Linear:
    DiT-S/2   32,858,896   (paper 33M;  reference  32,963,360)
    DiT-B/2  130,303,504   (paper 130M; reference 130,512,416)
    DiT-L/2  457,824,272   (paper 458M; reference 458,102,816)
    DiT-XL/2 674,816,272   (paper 675M; reference 675,129,632)

Class labels, as the U-Net takes them: int indices [B] (a row of the table), float one-hot / soft labels
[B, label_dim] (y_emb = y @ table[:label_dim] + (1 - sum(y)) * table[null]: one-hot gives exactly its row, the zero
vector, which is the U-Net's null label, gives the null row, soft labels mix), or None (the null class).
`label_dropout` replaces labels by the null class with that probability in training.

Attention paths (`attention=`), decided per call:
  "auto" (default): xformers' memory_efficient_attention when xformers is importable AND the tensors are on CUDA
    AND no forward-mode tangent is present; else torch's scaled_dot_product_attention (SDPA); but when q, k or v
    carry a forward-mode tangent (torch.func.jvp, torch.autograd.forward_ad) the explicit "math" path.
  "sdpa": always SDPA. Forward-mode AD through it FAILS on CPU in torch 2.14 (NotImplementedError: forward AD is not
    implemented for _scaled_dot_product_flash_attention_for_cpu; tested). Its CUDA kernels were not checked here (no
    GPU); "auto" does not depend on them, since any tangent sends it to the math path.
  "math": softmax(q k^T / sqrt(d_head)) v written out: supports forward-mode AD (jvp), double backward, any dtype.
  "xformers": always xformers (it must be importable; the tensors must be on CUDA). No forward-mode AD.
  So a jvp through the model works with "auto" and "math" (tested: jvp equals finite differences, float64).
  The tangent test is `torch.autograd.forward_ad.unpack_dual(t).tangent is not None`, which sees both
  torch.func.jvp's and forward_ad's dual tensors; it is skipped while torch.compile traces (no forward AD there).
  The path each call takes is logged once per process and path (logger "models.dit", level INFO).

Defaults (the project's rule: a default run finishes in minutes on a 2-core CPU). The paper's smallest model,
DiT-S, costs ~10x the default U-Net, so the default `size="tiny"` is depth 6, hidden 192, 3 heads (ViT-Ti's width,
half its depth) with patch 4: on MNIST (28 x 28, 49 tokens) 4,165,456 parameters (4,167,568 with 10 classes).
Forward + backward of a batch of 16 at 28 x 28, one thread, median (min) of 8 interleaved rounds on the shared
2-core machine (load ~4, so absolute times are inflated; the ratios are the point):
    default UNet (344,161 parameters)          141 ms (106)
    default DiT (tiny, patch 4, 49 tokens)     190 ms (146)   ~1.35x the U-Net
    DiT tiny, patch 7 (16 tokens)               79 ms  (64)
    DiT tiny, patch 2 (196 tokens)             891 ms (686)
    DiT-S, patch 4                            1367 ms (940)
A 3-step default run (`python -m runs.train --backbone dit train.steps=3`) takes ~7 s including start-up.

Trajectory (fno-style) outputs: not supported. DSNO's temporal Fourier layers are built into the U-Net (`fno`);
a DiT variant would need its own placement of temporal mixing between transformer blocks and is left for when a
method needs it. A DiT is a plain backbone: forward(x, noise_labels [B], class_labels) -> [B, out_channels, I, I].
"""
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from models.noise import noise_label_batch
from models.unet import GUIDANCE_MAX_POSITIONS, check_guidance_dim, guidance_weights, target_labels

try:
    import xformers.ops as xformers_ops
except Exception:  # not installed, or built for another torch / CUDA
    xformers_ops = None

logger = logging.getLogger(__name__)

# (depth, hidden_size, num_heads): Table 1 of the paper, plus the CPU-sized default.
SIZES = {
    "tiny": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
POS_EMBEDS = ("sincos", "learned")
ATTENTION_PATHS = ("auto", "sdpa", "math", "xformers")
FREQUENCY_DIM = 256  # width of DiT's sinusoidal noise-label embedding before its MLP


def timm_layers():
    """timm.layers, imported on first use (with torchvision it costs ~2 s, which `import models` should not pay)."""
    try:
        import timm.layers
    except ImportError as error:
        raise ImportError(f"the dit backbone needs timm ({error}): pip install \"timm>=0.9\" "
                          "(or: pip install -e .)") from None
    return timm.layers


# -- attention


_reported = set()


def report_path(path, why):
    """Log, once per process and path, which attention path a DiT uses."""
    if path not in _reported:
        _reported.add(path)
        logger.info("dit attention: %s (%s)", path, why)


def has_tangent(*tensors):
    """Whether any tensor carries a forward-mode AD tangent (torch.func.jvp or torch.autograd.forward_ad)."""
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over [B, heads, T, d], in plain ops (forward-mode AD works through it)."""
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
    return weights @ v


def xformers_attention(q, k, v):
    """xformers' memory_efficient_attention over [B, heads, T, d] (it takes [B, T, heads, d])."""
    out = xformers_ops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    return out.transpose(1, 2)


def attention(q, k, v, mode="auto"):
    """Multi-head softmax attention over [B, heads, T, d] by the path `mode` picks (see the module docstring)."""
    if mode == "math":
        return math_attention(q, k, v)
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "xformers":
        if xformers_ops is None or not q.is_cuda:
            raise ValueError("dit attention='xformers' needs xformers installed and CUDA tensors; use 'auto'")
        return xformers_attention(q, k, v)
    if torch.compiler.is_compiling():  # traced: no forward AD, no logging
        if xformers_ops is not None and q.is_cuda:
            return xformers_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)
    if has_tangent(q, k, v):
        report_path("math", "forward-mode AD is active; SDPA and xformers have no JVP")
        return math_attention(q, k, v)
    if xformers_ops is not None and q.is_cuda:
        try:
            out = xformers_attention(q, k, v)
            report_path("xformers", "xformers importable, tensors on CUDA")
            return out
        except (NotImplementedError, RuntimeError, ValueError):  # no kernel for this dtype / shape
            report_path("sdpa", "xformers has no kernel for these inputs")
            return F.scaled_dot_product_attention(q, k, v)
    report_path("sdpa", "xformers not importable" if xformers_ops is None else "tensors not on CUDA")
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, T, d]: one qkv Linear, the attention, an output projection."""

    def __init__(self, dim, num_heads, mode="auto"):
        super().__init__()
        self.num_heads, self.mode = num_heads, mode
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = attention(q, k, v, self.mode)  # [B, heads, T, d_head]
        return self.proj(h.transpose(1, 2).reshape(B, T, D))


# -- embeddings


def sincos_1d(dim, positions):
    """[len(positions), dim]: [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i / (dim/2)), i < dim/2."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid):
    """The paper's fixed 2-D position table [grid * grid, dim], row-major tokens: the first dim/2 channels encode
    the token's row, the last dim/2 its column."""
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1).float()


class NoiseEmbedding(nn.Module):
    """DiT's TimestepEmbedder: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (n/2)), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_dim=FREQUENCY_DIM, max_period=10000):
        super().__init__()
        half = frequency_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class LabelEmbedding(nn.Module):
    """A table of label_dim + 1 rows (the last: the null class) with label dropout; see the module docstring."""

    def __init__(self, label_dim, hidden_size, dropout=0.0):
        super().__init__()
        self.label_dim, self.dropout = label_dim, dropout
        self.table = nn.Embedding(label_dim + 1, hidden_size)

    def forward(self, labels, batch, device):
        L = self.label_dim
        if labels is None:
            return self.table.weight[L].expand(batch, -1)
        drop = None
        if self.training and self.dropout > 0:
            drop = torch.rand(batch, device=device) < self.dropout
        if labels.dtype in (torch.int64, torch.int32) and labels.shape == (batch,):
            labels = labels.long()
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, L), labels)
            return self.table(labels)
        if labels.is_floating_point() and labels.shape == (batch, L):
            weight = self.table.weight
            y = labels.to(weight.dtype)
            if drop is not None:
                y = y * (~drop)[:, None]
            return y @ weight[:L] + (1 - y.sum(1, keepdim=True)) * weight[L]
        raise ValueError(f"class_labels must be int indices [{batch}] or float [{batch}, {L}]; "
                         f"got {labels.dtype} {list(labels.shape)}")


# -- blocks


def modulate(x, shift, scale):
    """x * (1 + scale) + shift with per-sample [B, d] shift and scale broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Fig. 3): attention and MLP, each modulated and gated by the conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = timm_layers().Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """LN, adaptive shift and scale from the conditioning, Linear to p * p * out_channels per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# -- the backbone


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class DiT(nn.Module):
    """DiT (Peebles & Xie 2023): adaLN-Zero transformer on image patches, forward(x, noise_labels, class_labels=None).

    Sizes: size="tiny" (default, CPU: depth 6, hidden 192, 3 heads), "S", "B", "L", "XL" (the paper's Table 1);
    depth / hidden_size / num_heads override the size's values. patch_size must divide img_resolution (MNIST 28:
    1, 2, 4, 7, 14, 28). Class labels: int [B], float one-hot / soft [B, label_dim], or None (the null class).
    See the module docstring for the equations, the attention paths (which support jvp) and the measured costs.
    """

    outputs_trajectory = False  # a plain backbone: one output per noise label (models.generator)
    GUIDANCE_PREFIXES = ("guidance_embed",)  # what add_guidance_embedding adds (a teacher lacks them)
    TARGET_PREFIXES = ("target_embed",)      # what add_target_embedding adds

    def __init__(
        self,
        img_resolution=28,          # height = width of the images
        in_channels=1,              # channels of x
        out_channels=None,          # channels of the output; None = in_channels
        label_dim=0,                # number of classes; 0 = unconditional
        size="tiny",                # "tiny" (CPU default), "S", "B", "L", "XL": depth, hidden width and heads
        depth=None,                 # transformer blocks; None = the size's
        hidden_size=None,           # token width d; None = the size's
        num_heads=None,             # attention heads (must divide hidden_size); None = the size's
        patch_size=4,               # p: tokens are p x p patches, (img_resolution / p)^2 of them
        mlp_ratio=4.0,              # MLP hidden width = mlp_ratio * hidden_size
        pos_embed="sincos",         # "sincos" (fixed 2-D, the paper's) or "learned"
        label_dropout=0.0,          # training only: probability of replacing a label by the null class
        max_period=10000,           # noise-label embedding: lowest frequency is 1 / max_period
        attention="auto",           # "auto", "sdpa", "math" (jvp-safe) or "xformers"
    ):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown DiT size {size!r}; known: {', '.join(SIZES)}")
        sized = dict(zip(("depth", "hidden_size", "num_heads"), SIZES[size]))
        given = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)
        for key, value in given.items():
            if value is not None and not _positive_int(value):
                raise ValueError(f"DiT {key} must be a positive integer or None (the size's); got {value!r}")
        depth, hidden_size, num_heads = (sized[k] if v is None else v for k, v in given.items())
        if hidden_size % num_heads:
            raise ValueError(f"DiT num_heads {num_heads} does not divide hidden_size {hidden_size}")
        for key, value in dict(img_resolution=img_resolution, in_channels=in_channels, patch_size=patch_size).items():
            if not _positive_int(value):
                raise ValueError(f"DiT {key} must be a positive integer; got {value!r}")
        if img_resolution % patch_size:
            fits = [p for p in range(1, img_resolution + 1) if img_resolution % p == 0]
            raise ValueError(f"patch_size {patch_size} does not divide img_resolution {img_resolution}; "
                             f"choose one of {', '.join(map(str, fits))}")
        out_channels = in_channels if out_channels is None else out_channels
        if not _positive_int(out_channels):
            raise ValueError(f"DiT out_channels must be a positive integer or None; got {out_channels!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; known: {', '.join(POS_EMBEDS)}")
        if pos_embed == "sincos" and hidden_size % 4:
            raise ValueError(f"pos_embed='sincos' needs hidden_size divisible by 4; got {hidden_size}")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention {attention!r}; known: {', '.join(ATTENTION_PATHS)}")
        if attention == "xformers" and xformers_ops is None:
            raise ValueError("attention='xformers' but xformers is not importable; pip install xformers, or use 'auto'")
        if not (isinstance(label_dim, int) and label_dim >= 0 and 0 <= label_dropout <= 1 and mlp_ratio > 0
                and max_period > 0):
            raise ValueError(f"DiT needs label_dim >= 0, 0 <= label_dropout <= 1, mlp_ratio > 0, max_period > 0; got "
                             f"label_dim={label_dim}, label_dropout={label_dropout}, mlp_ratio={mlp_ratio}, "
                             f"max_period={max_period}")
        layers = timm_layers()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.depth, self.hidden_size, self.num_heads, self.patch_size = depth, hidden_size, num_heads, patch_size
        self.grid = img_resolution // patch_size

        self.patch_embed = layers.PatchEmbed(img_size=img_resolution, patch_size=patch_size, in_chans=in_channels,
                                             embed_dim=hidden_size, bias=True)
        tokens = self.grid ** 2
        if pos_embed == "sincos":  # fixed: a buffer (not trained, not saved; rebuilt from the config)
            self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size))
        self.noise_embed = NoiseEmbedding(hidden_size, max_period=max_period)
        self.label_embed = LabelEmbedding(label_dim, hidden_size, label_dropout) if label_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, out_channels)
        self.guidance_dim = 0  # add_guidance_embedding sets it
        self.two_time = False  # add_target_embedding sets it
        self.max_period = max_period
        self.initialize()

    def add_guidance_embedding(self, dim):
        """A guidance-weight input for guidance distillation (Meng et al. 2023; objectives/guidance_distill.py), as
        the U-Net's: forward(..., guidance=w), w [B], embedded like the noise level (`dim` sinusoidal channels, lowest
        frequency 1/GUIDANCE_MAX_POSITIONS, then Linear-SiLU-Linear) and added to the conditioning c. Its last layer
        starts at zero, so a net started from a teacher's weights computes exactly the teacher for every w. Such a
        net requires `guidance`; others refuse it. Returns self."""
        self.guidance_dim = check_guidance_dim(dim, self.guidance_dim)
        like = self.patch_embed.proj.weight
        self.guidance_embed = NoiseEmbedding(self.hidden_size, frequency_dim=self.guidance_dim,
                                             max_period=GUIDANCE_MAX_POSITIONS).to(like.device, like.dtype)
        nn.init.zeros_(self.guidance_embed.mlp[-1].weight)
        nn.init.zeros_(self.guidance_embed.mlp[-1].bias)
        return self

    def add_target_embedding(self):
        """A second time input for two-time students (flow maps, models/flow_map.py), as the U-Net's:
        forward(..., target_noise_labels=c), c [B], embedded as the noise label is (its own NoiseEmbedding) and added
        to the conditioning c. Its last layer starts at zero, so a teacher-initialised net computes the teacher for
        every target. Such a net requires the input. Returns self."""
        if self.two_time:
            raise ValueError("this net has a second time input already")
        like = self.patch_embed.proj.weight
        self.target_embed = NoiseEmbedding(self.hidden_size, max_period=self.max_period).to(like.device, like.dtype)
        nn.init.normal_(self.target_embed.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.target_embed.mlp[-1].weight)
        nn.init.zeros_(self.target_embed.mlp[-1].bias)
        self.two_time = True
        return self

    def initialize(self):
        """The reference initialisation (module docstring): Xavier Linear layers, N(0, 0.02^2) embeddings, and the
        adaLN-Zero zeros: every modulation Linear and the output Linear."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.noise_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for block in [*self.blocks, self.final]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def num_params(self):
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def check_inputs(self, x, class_labels, extra):
        """The input checks every forward makes (x's shape, labels only when conditional), as the U-Net's."""
        if extra:
            raise ValueError(f"DiT got unexpected inputs {sorted(extra)}; it takes x, noise_labels, class_labels")
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f"DiT expects x of shape [B, {self.in_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}]; got {list(x.shape)}")
        if self.label_embed is None and class_labels is not None:
            raise ValueError("class_labels given to an unconditional DiT (label_dim=0); pass None or set label_dim")

    def unpatchify(self, tokens):
        """[B, T, p * p * C] -> [B, C, I, I], token (i, j) filling pixels [i p : (i + 1) p, j p : (j + 1) p]."""
        B, g, p, C = tokens.shape[0], self.grid, self.patch_size, self.out_channels
        return tokens.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def forward(self, x, noise_labels, class_labels=None, **extra):
        guidance, target = extra.pop("guidance", None), extra.pop("target_noise_labels", None)
        self.check_inputs(x, class_labels, extra)
        batch = x.shape[0]
        noise_labels = noise_label_batch(noise_labels, batch)
        h = self.patch_embed(x) + self.pos_embed                 # [B, T, d]
        c = self.noise_embed(noise_labels)                       # [B, d]
        if self.label_embed is not None:
            c = c + self.label_embed(class_labels, batch, x.device)
        if self.guidance_dim or guidance is not None:
            guidance = guidance_weights(guidance, batch, x.device, "DiT", self.guidance_dim)
            c = c + self.guidance_embed(guidance)
        if self.two_time or target is not None:
            target = target_labels(target, batch, x.device, "DiT", self.two_time)
            c = c + self.target_embed(target)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c)).to(x.dtype)
