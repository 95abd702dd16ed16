"""Backbones, the Denoiser wrapper and analytic teachers. BACKBONES is open: BACKBONES["mine"] = MyNet."""
from models.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from models.denoiser import PARAMETERISATIONS, Denoiser, preconditioning
from models.dit import DiT
from models.fno import FNOUNet
from models.mlp import MLP
from models.ppca import PPCAMixtureDenoiser
from models.unet import UNet

BACKBONES = {
    "unet": UNet,
    "mlp": MLP,
    "fno": FNOUNet,
    "dit": DiT,
}
