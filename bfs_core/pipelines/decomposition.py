"""Layer decomposition on images, by either of two methods; both give a `DecompositionResult`.

- `DecompositionPipeline` (Outpaint-and-Remove): resize to the processing size, build both contexts, sample, decode,
  paste back. The model is `models.layer_decomposition.LayerDecomposition` (or its `FluxFillBaseline`).
- `FillThenExtractPipeline` (fill_then_extract, public weights only): FLUX.1-Fill-dev fills the dilated object region
  to estimate the clean background, then BFS Extract Foreground pulls the object (with its shadow) out of the image
  against that background. The Fill step is the BFS model's own Fill base with every BFS adapter bypassed.

The conventions are those of `pipelines.bfs` (images [B, C, H, W] in [0, 1], masks [B, 1, H, W], normalised Flux
latents).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..conditioning import canny_edges
from ..errors import UserInputError
from ..finite import check_finite
from ..image_ops import processing_size, resize_images, resize_mask
from ..layer_math import bounding_box_masks, dilate_mask, resize_rgba
from ..models.dual_flux import BranchLoRALinear, DualBranchFlux, JointAttnProcessor, dual_branch_config
from ..models.layer_decomposition import DEFAULT_SHORT_SIDE, FluxFillBaseline
from ..sampling.flow_match import (
    DualSample,
    InterruptCheck,
    StepCallback,
    fill_condition,
    latent_image_ids,
    pack_latents,
    sample_dual,
    unpack_latents,
)
from .bfs import BFSPipeline


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
            raise UserInputError(
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


# ---------------------------------------------------------------------------------------------------------------------
# fill_then_extract: Flux-Fill removal + BFS extraction

FILL_DILATION = 8  # pixels at the input size the object mask is grown by before the Fill step (rough masks, edges)


class _BaseLinear(nn.Linear):
    """A `BranchLoRALinear` with its adapters bypassed: exactly the frozen Linear (fp8 storage upcast as BFS does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype:
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)


@contextmanager
def bfs_adapters_off(transformer: nn.Module) -> Iterator[nn.Module]:
    """Run a BFS-patched transformer as the Flux-Fill it was built on: every content LoRA and joint module bypassed.

    Nothing is copied and no weight changes: the adapter Linears compute their frozen base projection only and each
    block's attention gets its stock processor back, until the block ends (also on error). Exact because BFS leaves
    the base weights frozen; a BFS file that replaced base weights (`base_override.*`) is refused, since its base is
    no longer Flux-Fill.
    """
    overrides = getattr(transformer, "_bfs_base_overrides", ())
    if overrides:
        raise UserInputError(
            f"This BFS model replaced {len(overrides)} FLUX.1-Fill-dev weights (e.g. {overrides[0]}), so its base is "
            "no longer Flux-Fill: fill_then_extract needs a separate FLUX.1-Fill-dev transformer (`fill_transformer`)."
        )
    linears = [m for m in transformer.modules() if type(m) is BranchLoRALinear]
    attns = [m for m in transformer.modules() if isinstance(getattr(m, "processor", None), JointAttnProcessor)]
    processors = [a.processor for a in attns]
    try:
        for module in linears:
            module.__class__ = _BaseLinear
        for attn, processor in zip(attns, processors):
            attn.set_processor(processor.original)
        yield transformer
    finally:
        for module in linears:
            module.__class__ = BranchLoRALinear
        for attn, processor in zip(attns, processors):
            attn.set_processor(processor)


class FillThenExtractPipeline:
    """Decomposition with weights users can download today: FLUX.1-Fill-dev removal, then BFS Extract Foreground.

    1. Fill: the object mask is grown by `dilation` pixels; Flux-Fill inpaints that region (the masked image with the
       hole at mid-grey, as `FluxFillPipeline` feeds it) and the result is pasted into the input there only: the
       background estimate is the input image, exactly, outside the grown region.
    2. Extract: BFS extraction (composite branch held at t = 0) gets the input image as the composite and that
       estimate as the background, with the grown region's bounding box as the region, and returns the object's RGBA
       layer with the effects it casts inside the region (shadows, reflections).

    Args:
        model: the BFS `DualBranchFlux` (Load BFS). Its Fill base does step 1 with every adapter bypassed
            (`bfs_adapters_off`), so no second copy of Flux-Fill is loaded.
        codec: the Flux VAE as an image codec (`encode_images` / `decode_latents`, normalised latents).
        rgba_decoder: decoder of the foreground latent (`load_rgba_decoder`).
        scheduler_config: FlowMatchEulerDiscreteScheduler config (the shipped Flux-Fill one).
        fill_transformer: optional plain FLUX.1-Fill-dev transformer for step 1 instead of the BFS model's base
            (needed only when the BFS weights replaced base weights).
    """

    def __init__(self, model: DualBranchFlux, codec, rgba_decoder, scheduler_config: dict, fill_transformer=None):
        if not isinstance(model, DualBranchFlux):
            raise UserInputError(
                f"fill_then_extract needs a BFS model (Load BFS / `load_pipeline`) but got {type(model).__name__}. "
                "A decomposition model runs with the `outpaint_and_remove` method."
            )
        if rgba_decoder is None:
            raise UserInputError("`rgba_decoder` is required to decode the foreground layer: load an RGBA VAE.")
        if fill_transformer is not None and dual_branch_config(fill_transformer) is not None:
            raise UserInputError("`fill_transformer` must be plain FLUX.1-Fill-dev, not a BFS-patched transformer.")
        self.model = model
        self.codec = codec
        self.rgba_decoder = rgba_decoder
        self.scheduler_config = scheduler_config
        self.fill_transformer = fill_transformer
        self.bfs = BFSPipeline(model, codec, scheduler_config)

    @contextmanager
    def _fill_model(self) -> Iterator[FluxFillBaseline]:
        if self.fill_transformer is not None:
            yield FluxFillBaseline(self.fill_transformer)
            return
        with bfs_adapters_off(self.model.transformer) as base:
            yield FluxFillBaseline(base)

    def fill(
        self,
        image: torch.Tensor,
        region: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        size: tuple[int, int],
        seed: int,
        steps: int,
        guidance: float,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, DualSample]:
        """Flux-Fill of `region` (binary [N, 1, H, W]) at processing `size`: (the fill decoded at the input size
        [N, 3, H, W], its latent [N, 16, h, w], the sampler's result)."""
        n, _, height, width = image.shape
        img = resize_images(image.float(), size)
        m = (resize_mask(region, size) >= 0.5).float()
        # FluxFillPipeline's masked image: the hole is 0 in [-1, 1], i.e. mid-grey in [0, 1].
        z_masked = self.codec.encode_images(img * (1 - m) + 0.5 * m).float()
        h, w = z_masked.shape[-2:]
        with self._fill_model() as fill:
            dev, dtype = fill.device, fill.dtype
            result = sample_dual(
                fill,
                fill_cond=fill_condition(z_masked, m.to(z_masked.device)).to(dev, dtype),
                prompt_embeds=prompt_embeds.to(dev, dtype).expand(n, -1, -1),
                pooled=pooled.to(dev, dtype).expand(n, -1),
                img_ids=latent_image_ids(h, w, device=dev, dtype=dtype),
                scheduler_config=self.scheduler_config,
                mode="bg2fg",
                steps=steps,
                guidance=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
                callback=callback,
                interrupt=interrupt,
                cache_threshold=cache_threshold,
            )
        latent = unpack_latents(result.comp, h, w).float()
        filled = resize_images(self.codec.decode_latents(latent).float().to(image.device), (width, height))
        return filled, latent, result

    @torch.no_grad()
    def decompose(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        fill_prompt_embeds: torch.Tensor | None = None,
        fill_pooled: torch.Tensor | None = None,
        dilation: int = FILL_DILATION,
        seed: int = 0,
        steps: int = 28,
        guidance: float = 30.0,
        short_side: int = 512,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> DecompositionResult:
        """Split `image` into the object under `mask` (RGBA, with its effects) and the background without it.

        Args:
            image: [N, 3, H, W] in [0, 1]; mask: [N or 1, 1, H, W], 1 = the object (binarised at 0.5; rough is fine).
            prompt_embeds [N or 1, T, J], pooled [N or 1, P]: the extraction's text conditioning (the object).
            fill_prompt_embeds / fill_pooled: what the Fill step paints in the object's place (an empty prompt, or
                the background's description); default: the extraction's conditioning.
            dilation: pixels (at the input size) the mask grows by before the Fill; the background keeps the input's
                pixels exactly outside the grown mask. Grow it over the object's shadow to remove the shadow too.
            seed / steps / guidance: both steps use them (`steps` Euler steps each; `callback` counts 2 · steps).
            short_side: processing size (see `image_ops.processing_size`); results are mapped back to H × W.
            cache_threshold: step caching (bfs_core/sampling/step_cache.py) in both steps; 0 = exact.
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise UserInputError(f"`image` must be [N, 3, H, W] (an RGB image) but got {list(image.shape)}.")
        check_finite("image", image)
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise UserInputError(
                f"`image` values must be in [0, 1] but range over [{image.min():.3f}, {image.max():.3f}]."
            )
        n, _, height, width = image.shape
        DecompositionPipeline._check("mask", mask, n, (width, height), 1)
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
            raise UserInputError(f"`dilation` must be a whole number of pixels >= 0 but got {dilation!r}.")
        if (fill_prompt_embeds is None) != (fill_pooled is None):
            raise UserInputError(
                "Pass both `fill_prompt_embeds` and `fill_pooled` (one Fill conditioning), or neither."
            )
        for name, x in (("prompt_embeds", prompt_embeds), ("fill_prompt_embeds", fill_prompt_embeds)):
            if x is not None and x.shape[0] not in (1, n):
                raise UserInputError(f"`{name}` has batch {x.shape[0]} but must be 1 or match the {n} images.")
        binary = (mask >= 0.5).float().expand(n, -1, -1, -1)
        if not binary.flatten(1).any(dim=1).all():
            raise UserInputError("`mask` is empty for at least one image: paint the object to decompose (white).")
        fill_embeds = prompt_embeds if fill_prompt_embeds is None else fill_prompt_embeds
        fill_pooled = pooled if fill_pooled is None else fill_pooled
        self.model.check_conditioning(fill_embeds, fill_pooled)
        size = processing_size(width, height, short_side)
        region = dilate_mask(binary, dilation).to(image.device)

        def fill_progress(i, total, latents):
            if callback is not None:
                callback(i, 2 * total, latents)

        def extract_progress(i, total, latents):
            if callback is not None:
                callback(total + i, 2 * total, latents)

        filled, bg_latent, fill_sample = self.fill(
            image,
            region,
            fill_embeds,
            fill_pooled,
            size=size,
            seed=seed,
            steps=steps,
            guidance=guidance,
            callback=fill_progress,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        # The input's own pixels wherever the object was not: only the grown region is replaced.
        background = torch.where(region > 0, filled, image.float())
        extracted = self.bfs.extract(
            image.float(),
            background,
            bounding_box_masks(region),
            prompt_embeds,
            pooled,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=extract_progress,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        decoder = self.rgba_decoder
        fg_latent = extracted.fg_latent.float()
        rgb = self.codec.decode_latents(fg_latent).float() if getattr(decoder, "needs_rgb", False) else None
        rgba = decoder.decode(fg_latent, rgb=rgb).float().to(image.device)
        return DecompositionResult(
            foreground=resize_rgba(rgba, (height, width)),
            background=background,
            fg_latent=fg_latent,
            bg_latent=bg_latent,
            processing_size=size,
            original_size=(width, height),
            transformer_calls=fill_sample.transformer_calls + extracted.transformer_calls,
            full_evaluations=fill_sample.full_evaluations + extracted.full_evaluations,
        )
