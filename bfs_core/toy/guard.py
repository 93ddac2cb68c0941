"""The toy model guards its world: any image is mapped into the 64×64 toy world and back, and boxes it never saw warn.

The toy model was trained on 64×64 scenes only (`world.py`): a horizon at 22–29 px, objects whose box is 8–20 px wide
and 12–26 px tall, standing with their foot (the box's bottom edge) on the ground at 32–59 px. Fed a 600×400 photo, a
whole-image box or a 2×2 box it returns garbage. So `run_toy`:

- resizes the background (and composite) to 64×64 and the region's bounding box into the same world, runs there,
  and maps the composite back to the input size (the foreground latent says the input size, so RGBA Decode pastes
  the layer back there too);
- returns warnings (also logged) when a box is too small, too large or off the ground for what the model learnt,
  so a UI can show them next to the result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from ..image_ops import resize_images
from ..layer_math import box_from_mask, mask_from_box
from ..pipelines.bfs import LayerResult
from .world import (
    BOX_SIDE_RANGE,
    FOOT_ABOVE_HORIZON,
    FOOT_MARGIN,
    HORIZON_RANGE,
    PILLAR_HEIGHT_RANGE,
    PILLAR_WIDTH_RANGE,
    SIZE,
)


logger = logging.getLogger(__name__)

WIDTH_RANGE = (PILLAR_WIDTH_RANGE[0], BOX_SIDE_RANGE[1])  # 8–20 px
HEIGHT_RANGE = (BOX_SIDE_RANGE[0], PILLAR_HEIGHT_RANGE[1])  # 12–26 px
FOOT_RANGE = (HORIZON_RANGE[0] + FOOT_ABOVE_HORIZON, SIZE - FOOT_MARGIN - 1)  # 32–59 px: a box's y1
MAX_STRETCH = 2.0  # aspect ratios beyond this come back visibly distorted


@dataclass
class ToyRun:
    """`result`: the pipeline's LayerResult, composite at the input size and `original_size` the input's (W, H)
    (the latents stay in the 64×64 world). `boxes`: each item's region box in world pixels [x0, y0, x1, y1).
    `warnings`: what the model was not trained for, one line each. `notes`: what was done (the resize)."""

    result: LayerResult
    boxes: list[tuple[int, int, int, int]]
    warnings: list[str]
    notes: list[str]


def world_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """A box [x0, y0, x1, y1) on a width × height image -> the box covering it in the 64×64 world (at least 1 px)."""
    x0, y0, x1, y1 = box
    sx, sy = SIZE / width, SIZE / height
    wx0, wy0 = min(SIZE - 1, math.floor(x0 * sx)), min(SIZE - 1, math.floor(y0 * sy))
    wx1, wy1 = max(wx0 + 1, min(SIZE, math.ceil(x1 * sx))), max(wy0 + 1, min(SIZE, math.ceil(y1 * sy)))
    return wx0, wy0, wx1, wy1


def box_warnings(box: tuple[int, int, int, int]) -> list[str]:
    """Warnings for a world box [x0, y0, x1, y1) the toy model was not trained on (empty when it is in range)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    trained = (
        f"it was trained on boxes {WIDTH_RANGE[0]}–{WIDTH_RANGE[1]} px wide and "
        f"{HEIGHT_RANGE[0]}–{HEIGHT_RANGE[1]} px tall"
    )
    out = []
    if w < WIDTH_RANGE[0] or h < HEIGHT_RANGE[0]:
        out.append(
            f"The box is too small: {w}×{h} px in the toy's {SIZE}×{SIZE} world, and {trained}; expect a "
            f"blob or nothing. Draw a larger box."
        )
    if w > WIDTH_RANGE[1] or h > HEIGHT_RANGE[1]:
        out.append(
            f"The box is too large: {w}×{h} px in the toy's {SIZE}×{SIZE} world, and {trained}; expect "
            f"garbage. Draw a box about a quarter of the image wide."
        )
    if not FOOT_RANGE[0] <= y1 <= FOOT_RANGE[1]:
        where = "above the ground (in the sky)" if y1 < FOOT_RANGE[0] else "below the ground the model saw"
        out.append(
            f"The box is off the ground: its bottom edge (the object's foot) is at y = {y1} px of {SIZE}, "
            f"{where}; toy objects stand on the ground with their foot at y = {FOOT_RANGE[0]}–{FOOT_RANGE[1]} "
            f"px (the horizon is at {HORIZON_RANGE[0]}–{HORIZON_RANGE[1]}). Move the box down onto the "
            f"ground."
        )
    return out


def _world_masks(mask: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """[B, 1, H, W] region masks -> [B, 1, 64, 64] world box masks and the world boxes."""
    height, width = mask.shape[-2:]
    boxes, masks = [], []
    for m in mask[:, 0]:
        if not (m > 0.5).any():
            raise ValueError("The region `mask` is empty: paint or box the area where the foreground should go.")
        box = world_box(tuple(int(v) for v in box_from_mask(m)), width, height)
        boxes.append(box)
        masks.append(mask_from_box(box, SIZE, SIZE))
    return torch.stack(masks)[:, None].float(), boxes


def run_toy(
    pipe,
    background: torch.Tensor,
    mask: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    composite: torch.Tensor | None = None,
    **options,
) -> ToyRun:
    """BG2FG (or extraction when `composite` is given) with the toy `pipe` on images of any size.

    Args:
        pipe: a `BFSPipeline` holding the toy model (`load_toy()[0]`, or the nodes' pipeline around it).
        background / composite: [B, 3, H, W] in [0, 1], any size; mask: [B or 1, 1, H, W] region (its bounding box is
            used, as in the paper).
        options: `seed`, `steps`, `guidance`, `callback`, `interrupt` of `BFSPipeline.generate`; `short_side` is
            ignored (the toy world is always 64×64).
    """
    height, width = background.shape[-2:]
    options.pop("short_side", None)
    if mask.shape[-2:] != background.shape[-2:]:
        raise ValueError(f"`mask` {list(mask.shape)} must match the background's size {height}×{width}.")
    if composite is not None and composite.shape != background.shape:
        raise ValueError(
            f"`composite` {list(composite.shape)} and `background` {list(background.shape)} must have "
            f"the same shape: the composite is the background with the object added."
        )
    world = (SIZE, SIZE)
    world_mask, boxes = _world_masks(mask)
    notes, warnings = [], []
    if (width, height) != world:
        notes.append(
            f"The toy model works in a {SIZE}×{SIZE} world: the {width}×{height} input was resized to "
            f"{SIZE}×{SIZE} and the results mapped back to {width}×{height}."
        )
        stretch = max(width, height) / min(width, height)
        if stretch > MAX_STRETCH:
            warnings.append(
                f"The input is {width}×{height}, {stretch:.1f}× wider than tall (or taller than wide): "
                f"squeezed into the square toy world, objects come back distorted. Crop it to about "
                f"square."
            )
    for i, box in enumerate(boxes):
        prefix = f"Image {i + 1}: " if len(boxes) > 1 else ""
        warnings += [prefix + w for w in box_warnings(box)]
    bg_world = resize_images(background, world)
    if composite is None:
        result = pipe.generate(bg_world, world_mask, prompt_embeds, pooled, short_side=0, **options)
    else:
        comp_world = resize_images(composite, world)
        result = pipe.extract(comp_world, bg_world, world_mask, prompt_embeds, pooled, short_side=0, **options)
    result = dataclasses.replace(
        result, composite=resize_images(result.composite, (width, height)), original_size=(width, height)
    )
    for line in warnings:
        logger.warning("toy model: %s", line)
    return ToyRun(result=result, boxes=boxes, warnings=warnings, notes=notes)
