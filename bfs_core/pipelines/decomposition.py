"""Outpaint-and-Remove on images: resize to the processing size, build both contexts, sample, decode, paste back.

The model is `models.layer_decomposition.LayerDecomposition` (or its `FluxFillBaseline`); the conventions are those
of `pipelines.bfs` (images [B, C, H, W] in [0, 1], masks [B, 1, H, W], normalised Flux latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import canny_edges
from ..finite import check_finite
from ..image_ops import processing_size, resize_images, resize_mask
from ..layer_math import dilate_mask, resize_rgba
from ..models.layer_decomposition import DEFAULT_SHORT_SIDE
from ..sampling.flow_match import (
    InterruptCheck,
    StepCallback,
    fill_condition,
    latent_image_ids,
    pack_latents,
    sample_dual,
    unpack_latents,
)


@dataclass
class DecompositionResult:
    """What `DecompositionPipeline.decompose` gives back.

    foreground: straight RGBA [N, 4, H0, W0] at the input size (None for the Flux-Fill baseline).
    background: RGB [N, 3, H0, W0]: the input outside the (slightly grown) mask, the generated layer inside.
    fg_latent / bg_latent: [N, 16, h, w] at the processing size. processing_size / original_size: (W, H).
    """

    foreground: torch.Tensor | None
    background: torch.Tensor
    fg_latent: torch.Tensor
    bg_latent: torch.Tensor
    processing_size: tuple[int, int]
    original_size: tuple[int, int]
    transformer_calls: int = 0  # transformer calls made, and how many ran every block (step caching)
    full_evaluations: int = 0


class DecompositionPipeline:
    """Outpaint-and-Remove on images around a `LayerDecomposition` (or `FluxFillBaseline`).

    Args:
        model: the decomposition model (or the Flux-Fill baseline for comparisons).
        codec: the Flux VAE as an image codec (`encode_images` / `decode_latents`, normalised latents).
        rgba_decoder: decoder of the foreground latents (`load_rgba_decoder`); may be None for the baseline.
        scheduler_config: FlowMatchEulerDiscreteScheduler config (the shipped Flux-Fill one).
    """

    def __init__(self, model, codec, rgba_decoder, scheduler_config: dict):
        if model.has_foreground and rgba_decoder is None:
            raise ValueError("`rgba_decoder` is required to decode the foreground: load an RGBA VAE.")
        self.model = model
        self.codec = codec
        self.rgba_decoder = rgba_decoder
        self.scheduler_config = scheduler_config

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return pack_latents(self.codec.encode_images(images).float())

    @staticmethod
    def _check(name: str, x: torch.Tensor | None, n: int, size: tuple[int, int], channels: int) -> None:
        if x is None:
            return
        check_finite(name, x)
        if x.ndim != 4 or x.shape[1] != channels or x.shape[0] not in (1, n) or tuple(x.shape[-2:]) != size[::-1]:
            raise ValueError(
                f"`{name}` must be [{n} or 1, {channels}, {size[1]}, {size[0]}] (the image's size) but got "
                f"{list(x.shape)}. Resize it to the image."
            )

    @torch.no_grad()
    def decompose(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        edge: torch.Tensor | None = None,
        segmentation: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        compute_edges: bool = True,
        seed: int = 0,
        steps: int = 28,
        guidance: float = 30.0,
        short_side: int = DEFAULT_SHORT_SIDE,
        paste_margin: int = 2,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> DecompositionResult:
        """Split `image` into the object under `mask` (RGBA, occlusions completed) and the background without it.

        Args:
            image: [N, 3, H, W] in [0, 1]; mask: [N or 1, 1, H, W], 1 = the object (binarised at 0.5).
            prompt_embeds [N or 1, T, J], pooled [N or 1, P]: text conditioning (an empty prompt works).
            edge / segmentation / depth: optional [N or 1, 3, H, W] maps in [0, 1]. Without `edge`, a Canny map is
                computed when `compute_edges`; absent maps are left out of the fusion (never an error).
            short_side: processing size (see `image_ops.processing_size`); results are mapped back to H × W.
            paste_margin: the background keeps the input's pixels outside the mask grown by this many pixels (at
                the input size); only the region under the object is replaced by the generated layer.
            cache_threshold: step caching (bfs_core/sampling/step_cache.py); 0 = exact.
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"`image` must be [N, 3, H, W] but got {list(image.shape)}.")
        check_finite("image", image)
        check_finite("prompt_embeds", prompt_embeds, "the text conditioning's tokens")
        check_finite("pooled", pooled, "the text conditioning's pooled vector")
        n, _, height, width = image.shape
        original = (width, height)
        for name, x, c in (
            ("mask", mask, 1),
            ("edge", edge, 3),
            ("segmentation", segmentation, 3),
            ("depth", depth, 3),
        ):
            self._check(name, x, n, original, c)
        binary = (mask >= 0.5).float().expand(n, -1, -1, -1)
        if not binary.flatten(1).any(dim=1).all():
            raise ValueError("`mask` is empty for at least one image: paint the object to decompose (white).")
        if prompt_embeds.shape[0] not in (1, n) or pooled.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"Text conditioning batch {prompt_embeds.shape[0]} must be 1 or match the {n} images.")
        size = processing_size(width, height, short_side)
        img = resize_images(image.float(), size)
        m = (resize_mask(binary, size) >= 0.5).float()
        maps = {"edge": edge, "segmentation": segmentation, "depth": depth}
        if maps["edge"] is None and compute_edges:
            maps["edge"] = canny_edges(img)
        known = getattr(self.model.config, "modalities", ())
        dev, dtype = self.model.device, self.model.dtype

        # Contexts: background = Flux-Fill's (image outside the mask + mask), foreground = image inside + mask.
        z_bg_ctx = self.codec.encode_images(img * (1 - m)).float()
        z_fg_ctx = self.codec.encode_images(img * m).float()
        h, w = z_bg_ctx.shape[-2:]
        img_ids = latent_image_ids(h, w, device=dev, dtype=dtype)
        tokens = {
            k: self._encode(resize_images(v.float(), size).expand(n, -1, -1, -1)).to(dev)
            for k, v in maps.items()
            if v is not None and k in known
        }
        fused = self.model.fuse(tokens, self._encode(img).to(dev), img_ids).float()
        condition = torch.cat(
            [fill_condition(z_bg_ctx, m.to(z_bg_ctx.device)), fill_condition(z_fg_ctx, m.to(z_fg_ctx.device))], -1
        ).to(dev)
        condition = torch.cat([condition, fused.to(dev)], -1).to(dtype)
        result = sample_dual(
            self.model,
            fill_cond=condition,
            prompt_embeds=prompt_embeds.to(dev, dtype).expand(n, -1, -1),
            pooled=pooled.to(dev, dtype).expand(n, -1),
            img_ids=img_ids,
            scheduler_config=self.scheduler_config,
            mode="bg2fg",
            steps=steps,
            guidance=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        bg_latent, fg_latent = unpack_latents(result.comp, h, w).float(), unpack_latents(result.fg, h, w).float()

        # Paste-back at the native size: the input's own pixels wherever the object was not.
        region = dilate_mask(binary, paste_margin).to(image.device)
        generated = resize_images(self.codec.decode_latents(bg_latent).float().to(image.device), original)
        background = image.float() * (1 - region) + generated * region
        foreground = None
        if self.model.has_foreground:
            decoder = self.rgba_decoder
            rgb = self.codec.decode_latents(fg_latent).float() if getattr(decoder, "needs_rgb", False) else None
            rgba = decoder.decode(fg_latent, rgb=rgb).float().to(image.device)
            foreground = resize_rgba(rgba, (height, width))
        return DecompositionResult(
            foreground=foreground,
            background=background,
            fg_latent=fg_latent,
            bg_latent=bg_latent,
            processing_size=size,
            original_size=original,
            transformer_calls=result.transformer_calls,
            full_evaluations=result.full_evaluations,
        )
