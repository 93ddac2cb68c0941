"""Image resizing for the model runs: the processing size, and image / mask resizes to it and back.

Image convention in `bfs_core`: float tensors [B, C, H, W] in [0, 1]. Masks: [B, 1, H, W]. Sizes are (W, H).
A leaf module: models, pipelines and the toy guard all import it; it imports nothing of the pack.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# The RGBA decoders need sizes that are multiples of 64; Flux itself needs 16.
SIZE_MULTIPLE = 64


def processing_size(width: int, height: int, short_side: int = 512, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(W, H) the model runs at: short side -> `short_side` (never upscaled), each side rounded up to `multiple`.

    Follows the release's `resize_by_short_side`: the long side is scaled by the same factor and truncated, then both
    sides are rounded up independently (a slight non-uniform stretch that the final resize undoes). `short_side=0`
    keeps the input size (only rounding).
    """
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be positive but got {width}×{height}.")
    if short_side < 0 or (short_side and short_side % multiple):
        raise ValueError(f"`short_side` must be 0 or a multiple of {multiple} but got {short_side}.")
    short = min(width, height)
    if short_side and short > short_side:
        if width <= height:
            width, height = short_side, int(height * short_side / width)
        else:
            width, height = int(width * short_side / height), short_side
    return math.ceil(width / multiple) * multiple, math.ceil(height / multiple) * multiple


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of [B, C, H, W] to (W, H), clamped to [0, 1]."""
    width, height = size
    if images.shape[-2:] == (height, width):
        return images
    out = F.interpolate(images.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1).to(images.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    if mask.shape[-2:] == (height, width):
        return mask
    return F.interpolate(mask.float(), size=(height, width), mode="nearest-exact").to(mask.dtype)
