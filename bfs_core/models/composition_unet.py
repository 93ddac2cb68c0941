"""Φ, the latent composition network of BFS (appendix A.5): (z_F, z_B) -> ẑ_C in the Flux latent space.

Φ is a diffusers `UNet2DModel` with exactly the appendix's arguments (91.33 M parameters). Its input is the channel
concatenation [z_F, z_B] (foreground first, as the appendix's text says) of *normalised*, unpacked Flux latents
([B, 16, H/8, W/8] each; normalised = (raw − shift) · scale); its output is the composite latent in the same space.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel


# The appendix's code, argument for argument; everything else is diffusers' default.
PHI_CONFIG = {
    "sample_size": 128,
    "in_channels": 32,
    "out_channels": 16,
    "layers_per_block": 2,
    "block_out_channels": (320, 640),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
}


def build_composition_unet(**overrides) -> UNet2DModel:
    """Φ with the paper's config; `overrides` shrink it for tests and toy models (e.g. block_out_channels)."""
    return UNet2DModel(**{**PHI_CONFIG, **overrides})


def compose_latents(phi: UNet2DModel, z_fg: torch.Tensor, z_bg: torch.Tensor) -> torch.Tensor:
    """ẑ_C = Φ(z_F, z_B). z_fg, z_bg: [B, 16, h, w] normalised Flux latents -> [B, 16, h, w].

    h and w must be divisible by 2 ** (number of Φ down blocks − 1) (2 for the paper's Φ).
    """
    if z_fg.shape != z_bg.shape or z_fg.ndim != 4:
        raise ValueError(
            f"Φ needs z_fg and z_bg of the same [B, C, h, w] shape but got {list(z_fg.shape)} and {list(z_bg.shape)}."
        )
    expected = phi.config.in_channels // 2
    if z_fg.shape[1] != expected:
        raise ValueError(f"Φ expects {expected}-channel latents but got {z_fg.shape[1]} channels.")
    factor = 2 ** (len(phi.config.block_out_channels) - 1)
    if z_fg.shape[-1] % factor or z_fg.shape[-2] % factor:
        raise ValueError(f"Φ needs latent height/width divisible by {factor} but got {list(z_fg.shape[-2:])}.")
    timestep = torch.zeros(z_fg.shape[0], device=z_fg.device)
    x = torch.cat([z_fg, z_bg], dim=1).to(phi.dtype)  # [B, 32, h, w]: foreground channels first
    return phi(x, timestep).sample
