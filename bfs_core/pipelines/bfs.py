"""BFS inference on images: resize to the processing size, encode, sample both branches, decode, map back.

Image convention in `bfs_core`: float tensors [B, C, H, W] in [0, 1] (ComfyUI's [B, H, W, C] IMAGE is converted by the
nodes). Masks: [B, 1, H, W], 1 = the region where the foreground goes; binarised at 0.5.
Latent convention: *normalised* Flux latents [B, 16, H/8, W/8] = (raw − shift_factor) · scaling_factor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..finite import check_finite
from ..image_ops import processing_size, resize_images, resize_mask
from ..models.dual_flux import DualBranchFlux
from ..sampling.flow_match import (
    InterruptCheck,
    StepCallback,
    fill_condition,
    latent_image_ids,
    pack_latents,
    sample_dual,
    unpack_latents,
)


logger = logging.getLogger(__name__)


def _check_images(name: str, images: torch.Tensor, channels: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"`{name}` must be a [B, {channels}, H, W] tensor but got shape {list(images.shape)}.")
    check_finite(name, images)
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"`{name}` values must be in [0, 1] but range over [{images.min():.3f}, {images.max():.3f}].")


@dataclass
class LayerResult:
    """What one BG2FG or extraction call gives back.

    fg_latent / comp_latent: normalised Flux latents at the processing size, [N, 16, h, w].
    composite: the composite branch decoded with the Flux VAE and resized back to the input size, [N, 3, H0, W0].
    processing_size / original_size: (W, H) of the model run and of the inputs.
    transformer_calls / full_evaluations: transformer calls made, and how many ran every block (step caching).
    """

    fg_latent: torch.Tensor
    comp_latent: torch.Tensor
    composite: torch.Tensor
    processing_size: tuple[int, int]
    original_size: tuple[int, int]
    transformer_calls: int = 0
    full_evaluations: int = 0


class BFSPipeline:
    """BFS BG2FG synthesis and foreground extraction around a `DualBranchFlux` and the Flux VAE.

    Args:
        model: the dual-branch transformer.
        codec: the Flux VAE as an image codec (`DiffusersFluxVAE`, or the nodes' wrapper of ComfyUI's VAE).
        scheduler_config: FlowMatchEulerDiscreteScheduler config (the shipped Flux-Fill one).
        text_encoders: optional `FluxTextEncoders` for `encode_prompt`.
    """

    def __init__(self, model: DualBranchFlux, codec, scheduler_config: dict, text_encoders=None):
        self.model = model
        self.codec = codec
        self.scheduler_config = scheduler_config
        self.text_encoders = text_encoders

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised Flux latents [B, 16, H/8, W/8]."""
        return self.codec.encode_images(images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised Flux latents -> RGB [B, 3, H, W] in [0, 1]."""
        return self.codec.decode_latents(latents)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoders is None:
            raise ValueError("No text encoders were loaded; pass prompt embeddings, or load the pipeline with them.")
        return self.text_encoders.encode(prompts)

    # -- BFS ----------------------------------------------------------------------------------------------------------
    def _prepare(self, background, mask, prompt_embeds, pooled, short_side):
        _check_images("background", background, 3)
        _check_images("mask", mask, 1)
        n, _, height, width = background.shape
        if mask.shape[0] not in (1, n) or mask.shape[-2:] != background.shape[-2:]:
            raise ValueError(
                f"`mask` {list(mask.shape)} must match the background's size {height}×{width} (batch 1 or {n})."
            )
        if prompt_embeds.shape[0] not in (1, n) or pooled.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"Text conditioning batch {prompt_embeds.shape[0]} must be 1 or match the {n} images.")
        check_finite("prompt_embeds", prompt_embeds, "the text conditioning's tokens")
        check_finite("pooled", pooled, "the text conditioning's pooled vector")
        self.model.check_conditioning(prompt_embeds, pooled)
        size = processing_size(width, height, short_side)
        mask = (resize_mask(mask, size) >= 0.5).to(torch.float32).expand(n, -1, -1, -1)
        dev, dtype = self.model.device, self.model.dtype
        prompt_embeds = prompt_embeds.to(dev, dtype).expand(n, -1, -1)
        pooled = pooled.to(dev, dtype).expand(n, -1)
        return size, (width, height), mask, prompt_embeds, pooled

    def _run(
        self,
        mode,
        background,
        mask,
        prompt_embeds,
        pooled,
        composite,
        *,
        seed,
        steps,
        guidance,
        short_side,
        callback,
        interrupt,
        cache_threshold=0.0,
    ) -> LayerResult:
        size, original, mask, prompt_embeds, pooled = self._prepare(
            background, mask, prompt_embeds, pooled, short_side
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        dev, dtype = self.model.device, self.model.dtype
        bg_latents = self.encode_images(resize_images(background, size))
        h, w = bg_latents.shape[-2:]
        # The background is encoded unmasked, as the BFS release feeds it: it is the layer the object is added to.
        cond = fill_condition(bg_latents, mask.to(bg_latents.device)).to(dev, dtype)
        comp_clean = None
        if composite is not None:
            comp_clean = pack_latents(self.encode_images(resize_images(composite, size))).to(dev, dtype)
        result = sample_dual(
            self.model,
            fill_cond=cond,
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            img_ids=latent_image_ids(h, w, device=dev, dtype=dtype),
            scheduler_config=self.scheduler_config,
            mode=mode,
            comp_clean=comp_clean,
            steps=steps,
            guidance=guidance,
            generator=generator,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        comp_latent, fg_latent = unpack_latents(result.comp, h, w), unpack_latents(result.fg, h, w)
        composite_out = resize_images(self.decode_latents(comp_latent), original)
        return LayerResult(
            fg_latent=fg_latent,
            comp_latent=comp_latent,
            composite=composite_out,
            processing_size=size,
            original_size=original,
            transformer_calls=result.transformer_calls,
            full_evaluations=result.full_evaluations,
        )

    def generate(
        self,
        background: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance: float = 30.0,
        short_side: int = 512,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> LayerResult:
        """BG2FG: a foreground layer (latent) for the masked region of `background`, and the composite."""
        return self._run(
            "bg2fg",
            background,
            mask,
            prompt_embeds,
            pooled,
            None,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )

    def extract(
        self,
        composite: torch.Tensor,
        background: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance: float = 30.0,
        short_side: int = 512,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> LayerResult:
        """Extract Foreground: the foreground layer (with its effects) of `composite` over `background`."""
        _check_images("composite", composite, 3)
        if composite.shape != background.shape:
            raise ValueError(
                f"`composite` {list(composite.shape)} and `background` {list(background.shape)} must "
                f"have the same shape: the composite is the background with the object added."
            )
        return self._run(
            "extract_fg",
            background,
            mask,
            prompt_embeds,
            pooled,
            composite,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
