"""The Flux VAE as the pipelines' image codec (images in [0, 1] <-> normalised Flux latents)."""

from __future__ import annotations

import torch


class DiffusersFluxVAE:
    """The Flux VAE (a diffusers `AutoencoderKL`) as the pipeline's image codec.

    Any object with these two methods can stand in (the ComfyUI nodes wrap ComfyUI's own VAE this way):
    `encode_images([B, 3, H, W] in [0, 1]) -> normalised latents [B, 16, H/8, W/8]` and the inverse `decode_latents`.
    """

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Uses the posterior mean (the release draws a posterior sample from the global RNG instead): deterministic,
        so the seed drives only the sampling noise, and the best clean-latent estimate for extraction."""
        vae = self.vae
        x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
        raw = vae.encode(x).latent_dist.mode()
        return (raw - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        raw = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(raw).sample.float() / 2 + 0.5).clamp(0, 1)
