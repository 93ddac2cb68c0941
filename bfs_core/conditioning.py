"""Conditioning maps for decomposition: Canny edges (in torch), depth and semantic segmentation (transformers models
in local folders, loaded once per folder). Images in and maps out are [B, 3, H, W] in [0, 1].

And reference tokens (Flux Redux, or the toy reference encoder) with the caption: `ReferenceMode` says whether they
replace the caption's tokens (the paper, §5) or follow them (ComfyUI's StyleModelApply).
"""

from __future__ import annotations

import logging
import math
import os
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Edge maps (Canny, in torch: no OpenCV dependency)


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


@torch.no_grad()
def canny_edges(images: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.4) -> torch.Tensor:
    """Canny edge map of [B, 3, H, W] images in [0, 1] -> [B, 3, H, W] binary map (white edges, replicated to RGB).

    Gaussian blur, Sobel gradients, non-maximum suppression along 4 quantised directions, double threshold
    (`low`/`high` on the gradient magnitude of a [0, 1] image) and hysteresis by iterated 8-neighbour growth.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [B, 3, H, W] but got {list(images.shape)}.")
    x = images.float()
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # [B, 1, H, W]
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    r = k.numel() // 2
    gray = F.conv2d(F.pad(gray, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    gray = F.conv2d(F.pad(gray, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel_x.t().contiguous().view(1, 1, 3, 3))
    mag = torch.sqrt(gx**2 + gy**2)
    # Quantise the gradient direction to 0°, 45°, 90°, 135° and keep only local maxima across the edge.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = ((angle + 22.5) // 45).long() % 4
    neighbours = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}  # (dy, dx) across the edge, image rows go down
    padded_mag = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape[-2:]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dy, dx) in neighbours.items():
        a = padded_mag[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        b = padded_mag[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (sector == s) & (mag >= a) & (mag >= b)
    thin = mag * keep
    strong, weak = thin >= high, thin >= low
    for _ in range(h + w):  # hysteresis: grow strong edges through weak ones until nothing changes
        grown = weak & (F.max_pool2d(strong.float(), 3, 1, 1) > 0)
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong.to(images.dtype).expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation / depth maps from transformers models in local folders (headless; ComfyUI users wire preprocessors)


_PALETTE_SEED = 1234


def _label_colors(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[B, H, W] integer labels -> [B, 3, H, W] fixed pseudo-random colours (same label, same colour).

    The palette has one row per class the model knows (no data-dependent size, so nothing syncs with the device);
    its rows do not depend on `num_labels` (one seeded stream)."""
    gen = torch.Generator().manual_seed(_PALETTE_SEED)
    palette = torch.rand(num_labels, 3, generator=gen).to(labels.device)
    return palette[labels].permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]


# Auxiliary estimators (depth, segmentation), loaded once per (kind, resolved folder): the decomposition trainer calls
# them every batch, and reading a few hundred MB from disk each time dominated its step time.
_AUXILIARY_MODELS: dict[tuple[str, str], tuple[object, nn.Module]] = {}


def _auxiliary_model(kind: str, model_dir: str | os.PathLike) -> tuple[object, nn.Module]:
    folder = Path(model_dir).expanduser().resolve()
    key = (kind, str(folder))
    if key not in _AUXILIARY_MODELS:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

        if not folder.is_dir():
            raise ValueError(
                f"The {kind} model must be a local transformers folder (config.json, weights, preprocessor config) "
                f"but got {str(model_dir)!r}. Download it once, e.g. with `huggingface-cli download`."
            )
        auto = {"depth": AutoModelForDepthEstimation, "segmentation": AutoModelForSemanticSegmentation}[kind]
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = auto.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        logger.info("Loaded the %s model from %s", kind, folder)
        _AUXILIARY_MODELS[key] = (processor, model)
    return _AUXILIARY_MODELS[key]


def clear_auxiliary_models() -> None:
    """Drop the cached depth / segmentation models (they stay loaded after the first call)."""
    _AUXILIARY_MODELS.clear()


def _run_auxiliary(kind: str, images: torch.Tensor, model_dir, device):
    """The estimator's raw output for `images` [B, 3, H, W] in [0, 1], computed on `device` (default: the images')."""
    processor, model = _auxiliary_model(kind, model_dir)
    device = images.device if device is None else torch.device(device)
    model.to(device)  # a no-op after the first call on this device
    # The processor resizes and normalises on the CPU (PIL / numpy); only its small output moves to the device.
    inputs = processor(images=list(images.float().cpu()), return_tensors="pt", do_rescale=False)
    return model(**{k: v.to(device) for k, v in inputs.items()})


@torch.no_grad()
def estimate_depth(
    images: torch.Tensor, model_dir: str | os.PathLike, device: str | torch.device | None = None
) -> torch.Tensor:
    """Depth map (Depth-Anything-V2 or any `AutoModelForDepthEstimation` folder) -> [B, 3, H, W] in [0, 1].

    The model is loaded once per folder and run on `device` (default: the images' device); the map is on it too.
    """
    out = _run_auxiliary("depth", images, model_dir, device)
    depth = out.predicted_depth  # [B, h, w]
    depth = F.interpolate(depth[:, None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    lo = depth.amin(dim=(1, 2, 3), keepdim=True)
    hi = depth.amax(dim=(1, 2, 3), keepdim=True)
    return ((depth - lo) / (hi - lo).clamp_min(1e-6)).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def estimate_segmentation(
    images: torch.Tensor, model_dir: str | os.PathLike, device: str | torch.device | None = None
) -> torch.Tensor:
    """Semantic segmentation (SegFormer or any `AutoModelForSemanticSegmentation` folder) -> colour map [B,3,H,W].

    The model is loaded once per folder and run on `device` (default: the images' device); the map is on it too.
    """
    out = _run_auxiliary("segmentation", images, model_dir, device)
    logits = F.interpolate(out.logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return _label_colors(logits.argmax(dim=1), logits.shape[1])  # [B, classes, H, W] -> labels [B, H, W]


# ---------------------------------------------------------------------------------------------------------------------
# Reference tokens (Redux) with the caption


class ReferenceMode(str, Enum):
    """How reference tokens meet the caption's tokens; the pooled vector is always the caption's (Redux leaves it)."""

    REPLACE = "replace"  # the paper (§5, Fig. 6a): the caption's tokens are substituted by the reference's
    APPEND = "append"  # ComfyUI's StyleModelApply: caption tokens, then reference tokens


def join_reference(
    caption_embeds: torch.Tensor, reference_tokens: torch.Tensor, mode: ReferenceMode | str, strength: float = 1.0
) -> torch.Tensor:
    """Text tokens for the transformer: `caption_embeds` [B, T, W] and `reference_tokens` [B or 1, N, W] ->
    [B, N, W] (replace) or [B, T + N, W] (append). `strength` scales the reference tokens (StyleModelApply's
    'multiply')."""
    mode = ReferenceMode(mode)
    caption, reference = list(caption_embeds.shape), list(reference_tokens.shape)
    if len(caption) != 3 or len(reference) != 3 or caption[-1] != reference[-1]:
        raise ValueError(
            f"The caption's tokens {caption} and the reference tokens {reference} "
            "must both be [batch, tokens, width] of the same width: encode the reference with the style model that "
            "belongs to this text encoder (Flux Redux for Flux, the toy reference encoder for the toy model)."
        )
    reference = reference_tokens.to(caption_embeds.dtype) * strength
    if reference.shape[0] != caption_embeds.shape[0]:
        reference = reference.expand(caption_embeds.shape[0], -1, -1)
    if mode is ReferenceMode.REPLACE:
        return reference
    return torch.cat([caption_embeds, reference], dim=1)


def apply_reference_mode(
    conditioned: torch.Tensor, caption_embeds: torch.Tensor, mode: ReferenceMode | str
) -> torch.Tensor:
    """StyleModelApply's output tokens (`conditioned` = caption tokens then reference tokens) in `mode`: append keeps
    them; replace drops the caption's tokens, after checking that `conditioned` does begin with exactly them."""
    mode = ReferenceMode(mode)
    t = caption_embeds.shape[1]
    same_prefix = (
        conditioned.ndim == 3
        and conditioned.shape[0] == caption_embeds.shape[0]
        and conditioned.shape[1] > t
        and torch.equal(conditioned[:, :t].to(caption_embeds.dtype), caption_embeds)
    )
    if not same_prefix:
        raise ValueError(
            f"`conditioning` {list(conditioned.shape)} must be the output of StyleModelApply on `caption` "
            f"{list(caption_embeds.shape)} (the caption's tokens followed by reference tokens). Connect the same "
            "text CONDITIONING to StyleModelApply's `conditioning` and to `caption`."
        )
    return conditioned if mode is ReferenceMode.APPEND else conditioned[:, t:]


__all__ = [
    "ReferenceMode",
    "apply_reference_mode",
    "canny_edges",
    "clear_auxiliary_models",
    "estimate_depth",
    "estimate_segmentation",
    "join_reference",
]
