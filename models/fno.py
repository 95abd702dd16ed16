"""DSNO's backbone: a U-Net with temporal Fourier layers that outputs a whole trajectory in one call.

Zheng, Nie, Vahdat, Azizzadenesheli, Anandkumar, "Fast Sampling of Diffusion Models via Operator Learning"
(ICML 2023), its architecture (the U-Net with temporal convolution blocks): the teacher's U-Net becomes a neural
operator from the initial noise to the ODE trajectory at K output times. The noise passes the first convolution
once and is lifted to K copies; copy k gets the time embedding of its own target time and the U-Net runs on all B*K
slices in parallel; after every residual / attention block a temporal Fourier layer mixes the K copies of each
pixel and channel,

    h <- h + LeakyReLU(SpectralConv_time(h)),     SpectralConv_time(h) = irfft_K(W_m * rfft_K(h)_m, m < time_modes),

with a complex channel-mixing matrix W_m per kept frequency m. The output is [B, K, C, H, W], one x-prediction per
output time, in one network evaluation. `noise_labels` [B, K] hold each slice's noise label (EDM's c_noise of its
target sigma); a trained `models.unet.UNet` loads into FNOUNet with only the temporal layers missing.

Compared with DSNO-pytorch (models/tddpmm.py, models/layers.py `TimeConv` / `SpectralConv1d`):
  - the same layer: rFFT along the output times, the first `modes` frequencies kept (DSNO's `num_modes`, 2 for
    CIFAR-10 with 4 times, is our `time_modes`), a complex in x out channel mix, inverse rFFT at length K, in float32
    outside autocast, a residual LeakyReLU (slope 0.01), no bias;
  - placement: DSNO puts a TimeConv after each non-resampling encoder / decoder block (after its attention) and
    after the first middle block only; here one follows EVERY UNet ResBlock (the down / up blocks and the second
    middle block too), so there are a few more of them;
  - initialisation: DSNO draws the real and imaginary weights uniform on [0, 1 / C^2) (time_layer_init="dsno"
    reproduces that); the default here is "zero", so that a teacher-initialised FNOUNet is exactly the teacher on
    every slice (the weights still get gradients: LeakyReLU's slope at 0 is 0.01 and Adam is scale-free);
  - the spectral convolution is neuraloperator's `SpectralConv` (n_modes = 2 * (time_modes - 1), which it turns
    into time_modes rFFT frequencies); when K has fewer rFFT frequencies (K // 2 + 1 < time_modes, e.g. K = 1 with
    2 modes) it keeps the ones that exist, where DSNO's einsum would fail on the shape mismatch. Its complex weight
    is stored here as a real [.., 2] parameter (see `RealSpectralWeight`) and its contraction done by torch.einsum
    (see `contract_channels`), so that EMA, optimisers, `.float()` and torch.compile(fullgraph=True) all work.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import UNet

TIME_LAYER_INITS = ("zero", "dsno")
NEGATIVE_SLOPE = 0.01  # nn.LeakyReLU's default, as in DSNO-pytorch's TimeConv


def spectral_conv_class():
    """neuraloperator's SpectralConv, imported on first use (the import costs most of a second)."""
    try:
        from neuralop.layers.spectral_convolution import SpectralConv
    except ImportError as error:
        raise ImportError(f"the fno backbone needs neuraloperator ({error}): pip install neuraloperator (or: pip install -e \".[fno]\")") from None
    return SpectralConv


class RealSpectralWeight(nn.Module):
    """A complex spectral weight held as a real parameter [..., 2] (real, imaginary), indexed like the tensorly
    `DenseTensor` that neuraloperator's SpectralConv slices in its forward (`self.weight[slices]`).

    Complex parameters break code that assumes real ones: `p.float()` silently drops the imaginary part (our
    EMA update does that, then `_foreach_lerp_` fails on the dtype mix). The complex view is taken in float32.
    """

    def __init__(self, weight):
        super().__init__()
        self.real_imag = nn.Parameter(torch.view_as_real(weight.detach().to(torch.complex64)).clone())

    def complex(self):
        return torch.view_as_complex(self.real_imag.float().contiguous())

    def __getitem__(self, index):
        return self.complex()[index]


def contract_channels(x, weight, separable=False):
    """The complex channel mix of the kept frequencies, [N, C_in, M] x [C_in, C_out, M] -> [N, C_out, M]: what
    neuraloperator's dense contraction computes, with torch.einsum instead of tensorly's (which dynamo cannot trace)."""
    return torch.einsum("nim,iom->nom", x, weight)


class TemporalFourierLayer(nn.Module):
    """h <- h + LeakyReLU(SpectralConv_time(h)) over h [B*K, C, H, W] (slices ordered b-major), acting along the K
    axis of each pixel, mixing channels, keeping the lowest `time_modes` rFFT frequencies."""

    def __init__(self, channels, time_modes=2, init="zero"):
        super().__init__()
        self.spectral = spectral_conv_class()(channels, channels, n_modes=(2 * (time_modes - 1),), bias=False)
        weight = torch.zeros(channels, channels, time_modes, dtype=torch.complex64)
        if init == "dsno":  # DSNO-pytorch: real and imaginary parts uniform on [0, 1 / (C_in C_out))
            weight = torch.complex(torch.rand(weight.shape), torch.rand(weight.shape)) / channels**2
        self.spectral.weight = RealSpectralWeight(weight)
        self.spectral._contract = contract_channels  # tensorly's einsum dispatch breaks torch.compile graphs

    def forward(self, h, num_times):
        BK, C, H, W = h.shape
        B = BK // num_times
        x = h.view(B, num_times, C, H, W).permute(0, 3, 4, 2, 1).reshape(B * H * W, C, num_times)
        with torch.autocast(h.device.type, enabled=False):  # the FFTs and complex mix in float32
            y = F.leaky_relu(self.spectral(x.float()), NEGATIVE_SLOPE)
        y = y.to(h.dtype).view(B, H, W, C, num_times).permute(0, 4, 3, 1, 2).reshape(BK, C, H, W)
        return h + y


class FNOUNet(UNet):
    """forward(x [B, C, H, W], noise_labels [B, K], class_labels=None) -> [B, K, out_channels, H, W].

    Takes all of UNet's arguments (same names, same defaults) plus
      num_times: K, the number of output times the model is meant for (a default for callers; any K >= 1 runs,
        since K is read from noise_labels);
      time_modes: rFFT frequencies kept along the time axis (DSNO: 2);
      time_layer_init: "zero" (spectral weights 0: every slice is exactly the UNet at that slice's noise label,
        so a teacher-initialised student starts as the teacher) or "dsno" (DSNO-pytorch's small positive uniform).
    Every parameter UNet has keeps its name; the temporal layers all live under `time_layers.`.
    """

    TEACHER_FREE_PREFIXES = ("time_layers.",)  # parameters a trained UNet does not have (init_from_teacher)
    outputs_trajectory = True  # output [B, K, ...], one slice per noise label

    def __init__(
        self,
        img_resolution=28,
        in_channels=1,
        out_channels=None,
        label_dim=0,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_blocks=1,
        attn_resolutions=(7,),
        mid_attention=True,
        channels_per_head=64,
        num_heads=None,
        dropout=0.0,
        embedding="positional",
        max_positions=10000,
        fourier_scale=16.0,
        channel_mult_emb=4,
        label_dropout=0.0,
        skip_scale=2**-0.5,
        adaptive_scale=True,
        num_times=4,                # K: output times per call, by default
        time_modes=2,               # rFFT frequencies kept along the time axis
        time_layer_init="zero",     # "zero" (starts as the teacher) or "dsno"
    ):
        spectral_conv_class()  # fail early, in one line, without neuraloperator
        if num_times < 1 or time_modes < 1:
            raise ValueError(f"FNOUNet needs num_times >= 1 and time_modes >= 1; got num_times={num_times}, "
                             f"time_modes={time_modes}")
        if time_layer_init not in TIME_LAYER_INITS:
            raise ValueError(f"unknown time_layer_init {time_layer_init!r}; known: {', '.join(TIME_LAYER_INITS)}")
        super().__init__(
            img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels, label_dim=label_dim,
            model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
            attn_resolutions=attn_resolutions, mid_attention=mid_attention, channels_per_head=channels_per_head,
            num_heads=num_heads, dropout=dropout, embedding=embedding, max_positions=max_positions,
            fourier_scale=fourier_scale, channel_mult_emb=channel_mult_emb, label_dropout=label_dropout,
            skip_scale=skip_scale, adaptive_scale=adaptive_scale)
        self.num_times, self.time_modes = num_times, time_modes

        def after(blocks):  # one temporal layer per block, at the block's output width
            return nn.ModuleList(TemporalFourierLayer(b.conv0.out_channels, time_modes, time_layer_init)
                                 for b in blocks)
        self.time_layers = nn.ModuleDict(dict(enc=after(self.enc), mid=after(self.mid), dec=after(self.dec)))

    def _noise_labels(self, noise_labels, batch):
        """noise_labels as [B, K]; a 1-D [B] (what a Denoiser passes) is refused: it would silently read as K = B."""
        if noise_labels.ndim == 2 and noise_labels.shape[0] == batch and noise_labels.shape[1] >= 1:
            return noise_labels
        raise ValueError(f"FNOUNet noise_labels must be [{batch}, K] (one label per sample and output time); got "
                         f"{list(noise_labels.shape)}. fno returns a trajectory: use it with an objective that "
                         "wraps it as one (dsno), not as a Denoiser")

    def add_target_embedding(self):
        raise ValueError("fno maps one input to a trajectory and has no second time input for a flow map; use a "
                         "unet, dit or mlp network")

    def features(self, x, noise_labels, class_labels=None, **extra):
        raise ValueError("fno maps one input to a trajectory and has no single-level features for a discriminator "
                         "head; use a unet or mlp network")

    def forward(self, x, noise_labels, class_labels=None, **extra):
        self.check_inputs(x, class_labels, extra)
        batch = x.shape[0]
        noise_labels = self._noise_labels(noise_labels, batch)
        K = noise_labels.shape[1]

        # Embeddings of the B*K slices (b-major): each its own noise label, the class label shared by a sample's K.
        emb = self.map_noise(noise_labels.reshape(batch * K))
        if self.map_label is not None:
            labels = self._labels(class_labels, batch, x.device)
            class_emb = self.map_label(labels * math.sqrt(self.label_dim))
            emb = (emb.view(batch, K, -1) + class_emb[:, None, :]).view(batch * K, -1)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = self.enc_in(x)  # once per sample, then lifted to K copies
        h = h[:, None].expand(batch, K, *h.shape[1:]).reshape(batch * K, *h.shape[1:])
        skips = [h]
        for block, time_layer in zip(self.enc, self.time_layers["enc"]):
            h = time_layer(block(h, emb), K)
            skips.append(h)
        for block, time_layer in zip(self.mid, self.time_layers["mid"]):
            h = time_layer(block(h, emb), K)
        for block, time_layer, takes_skip in zip(self.dec, self.time_layers["dec"], self.dec_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = time_layer(block(h, emb), K)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.view(batch, K, *out.shape[1:]).to(x.dtype)
