"""Layer compositing maths: alpha blending, premultiplication, "over", the BFS shadow-alpha derivation, boxes, crops.

Conventions: images are float tensors in [0, 1] laid out ``[..., C, H, W]`` (any leading batch dims); RGBA is
*straight* (un-premultiplied) unless a name says ``premultiplied``; alpha is ``[..., 1, H, W]`` with 1 = opaque.
Boxes are ``(x0, y0, x1, y1)`` integer pixel coordinates with exclusive ``x1``/``y1`` (so ``x1 - x0`` is the width).
"""

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
DEFAULT_EPS = 1e-6


def _check_rgba(rgba: torch.Tensor, name: str) -> None:
    if rgba.ndim < 3 or rgba.shape[-3] != 4:
        raise ValueError(f"`{name}` must be RGBA [..., 4, H, W] but got shape {tuple(rgba.shape)}.")


def _as_rgba(image: torch.Tensor, name: str) -> torch.Tensor:
    """RGB is treated as fully opaque RGBA."""
    if image.ndim >= 3 and image.shape[-3] == 3:
        return torch.cat([image, torch.ones_like(image[..., :1, :, :])], dim=-3)
    _check_rgba(image, name)
    return image


# ---------------------------------------------------------------------------------------------------------------
# blending, premultiplication, "over"


def alpha_blend(foreground: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``C = alpha * F + (1 - alpha) * B`` with straight colour F."""
    if foreground.shape[-2:] != background.shape[-2:] or alpha.shape[-2:] != foreground.shape[-2:]:
        raise ValueError(
            f"`foreground` {tuple(foreground.shape)}, `alpha` {tuple(alpha.shape)} and `background` "
            f"{tuple(background.shape)} must share H and W. Resize or crop them to the same size first."
        )
    return alpha * foreground + (1.0 - alpha) * background


def split_rgba(rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rgba(rgba, "rgba")
    return rgba[..., :3, :, :], rgba[..., 3:, :, :]


def premultiply(rgba: torch.Tensor) -> torch.Tensor:
    """Straight RGBA -> premultiplied RGBA (colour times alpha)."""
    rgb, alpha = split_rgba(rgba)
    return torch.cat([rgb * alpha, alpha], dim=-3)


def unpremultiply(rgba_premultiplied: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Premultiplied RGBA -> straight RGBA; colour is 0 where alpha <= eps (it is undefined there)."""
    rgb, alpha = split_rgba(rgba_premultiplied)
    safe = torch.where(alpha > eps, alpha, torch.ones_like(alpha))
    straight = torch.where(alpha > eps, rgb / safe, torch.zeros_like(rgb)).clamp(0, 1)
    return torch.cat([straight, alpha], dim=-3)


def over_premultiplied(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Porter-Duff "over" on premultiplied RGBA: ``top + bottom * (1 - alpha_top)`` on all four channels."""
    _check_rgba(top, "top")
    _check_rgba(bottom, "bottom")
    return top + bottom * (1.0 - top[..., 3:, :, :])


def over(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Straight RGBA ``top`` over straight RGBA (or opaque RGB) ``bottom`` -> straight RGBA."""
    return unpremultiply(
        over_premultiplied(premultiply(_as_rgba(top, "top")), premultiply(_as_rgba(bottom, "bottom")))
    )


def composite_stack(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Composite N layers, **bottom to top**, with "over"; RGB layers count as opaque. Returns straight RGBA.

    Accumulates in premultiplied space, so the result equals applying :func:`over` pairwise.
    """
    if len(layers) == 0:
        raise ValueError("`layers` must hold at least one image (bottom first).")
    shape = layers[0].shape[-2:]
    acc = None
    for i, layer in enumerate(layers):
        if layer.shape[-2:] != shape:
            raise ValueError(
                f"layer {i} has size {tuple(layer.shape[-2:])} but layer 0 has {tuple(shape)}; all layers must be "
                "the canvas size: resize the layer, or paste a crop onto a transparent canvas of that size "
                "(`bfs_core.layer_math.uncrop_layer`)."
            )
        premult = premultiply(_as_rgba(layer, f"layers[{i}]"))
        acc = premult if acc is None else over_premultiplied(premult, acc)
    return unpremultiply(acc)


# ---------------------------------------------------------------------------------------------------------------
# BFS appendix A.3, eq. (10)-(15): RGBA with shadow from renders on white and on black


def render_shadowed_on_white(
    foreground: torch.Tensor, alpha_object: torch.Tensor, alpha_shadow: torch.Tensor
) -> torch.Tensor:
    """Eq. (10)/(11): ``F_shadowed = alpha_F F + alpha_shadow * 0 + (1 - alpha_F - alpha_shadow) * 1``."""
    total = alpha_object + alpha_shadow
    if bool((total > 1 + 1e-6).any()):
        raise ValueError("`alpha_object + alpha_shadow` must be <= 1 everywhere (the shadow lies under the object).")
    return alpha_object * foreground + (1.0 - total)


def render_on_black(foreground: torch.Tensor, alpha_object: torch.Tensor) -> torch.Tensor:
    """``F_black = alpha_F * F``: the object (without shadow) on a black background."""
    return alpha_object * foreground


def combined_alpha_from_renders(f_shadowed: torch.Tensor, f_black: torch.Tensor) -> torch.Tensor:
    """Eq. (12): ``alpha = alpha_F + alpha_shadow = F_black + 1 - F_shadowed``.

    The right-hand side is per colour channel; the three estimates agree in theory, so their mean is used
    (least squares), clamped to [0, 1]. Inputs [..., 3, H, W] -> alpha [..., 1, H, W].
    """
    if f_shadowed.shape != f_black.shape or f_shadowed.shape[-3] != 3:
        raise ValueError(
            f"`f_shadowed` {tuple(f_shadowed.shape)} and `f_black` {tuple(f_black.shape)} must both be RGB "
            "[..., 3, H, W] renders of the same object at the same size."
        )
    return (f_black + 1.0 - f_shadowed).mean(dim=-3, keepdim=True).clamp(0, 1)


def shadowed_foreground_color(f_shadowed: torch.Tensor, alpha: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Eq. (14): ``F_color = (F_shadowed - (1 - alpha)) / (alpha + eps)``, clamped to [0, 1]."""
    return ((f_shadowed - (1.0 - alpha)) / (alpha + eps)).clamp(0, 1)


def rgba_from_shadowed_renders(
    f_shadowed: torch.Tensor, f_black: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Eq. (12)-(14): straight RGBA ``(F_color, alpha)`` of object + shadow from its renders on white and on black."""
    alpha = combined_alpha_from_renders(f_shadowed, f_black)
    return torch.cat([shadowed_foreground_color(f_shadowed, alpha, eps), alpha], dim=-3)


def recomposite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Eq. (15): ``C = alpha * F_color + (1 - alpha) * B`` for straight RGBA over an RGB background."""
    rgb, alpha = split_rgba(rgba)
    return alpha_blend(rgb, alpha, background)


# ---------------------------------------------------------------------------------------------------------------
# boxes and masks


def dilate_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary mask [..., H, W] grown by `pixels` (a square structuring element; nothing wraps around the edges)."""
    if pixels <= 0:
        return mask
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    grown = F.max_pool2d(flat, 2 * pixels + 1, stride=1, padding=pixels)
    return grown.reshape(mask.shape).to(mask.dtype)


def box_from_mask(mask: torch.Tensor | np.ndarray, threshold: float = 0.5) -> Box:
    """Tight box ``(x0, y0, x1, y1)`` around pixels with ``mask > threshold``; mask is [H, W] or [1, H, W]."""
    m = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"`mask` must be [H, W] (or [1, H, W]) but got shape {tuple(m.shape)}.")
    ys, xs = torch.nonzero(m.float() > threshold, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError(f"`mask` has no pixel above {threshold}; draw a mask or pass a box instead.")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def mask_from_box(box: Sequence[int], height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[H, W] mask, 1 inside the (clamped) box and 0 outside."""
    x0, y0, x1, y1 = clamp_box(box, height, width)
    mask = torch.zeros(height, width, dtype=dtype)
    mask[y0:y1, x0:x1] = 1
    return mask


def bounding_box_masks(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] any masks -> their bounding boxes as masks (the paper's region is a box), on the masks' device."""
    height, width = mask.shape[-2:]
    boxes = []
    for m in mask[:, 0]:
        if not (m >= 0.5).any():
            raise ValueError("The region `mask` is empty: paint or box the area where the foreground should go.")
        boxes.append(mask_from_box(box_from_mask(m), height, width))
    return torch.stack(boxes)[:, None].to(mask.device)


def clamp_box(box: Sequence[int], height: int, width: int) -> Box:
    """Clip a box to the image; raises if nothing of it is left inside."""
    if len(box) != 4:
        raise ValueError(f"`box` must be (x0, y0, x1, y1) but got {box!r}.")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"`box` {tuple(box)!r} lies outside the {width}x{height} image or is empty.")
    return x0, y0, x1, y1


def expand_box(box: Sequence[int], margin: int | float, height: int, width: int) -> Box:
    """Grow a box on every side, clamped to the image.

    ``margin`` is pixels when an int, or a fraction of the box's longer side when a float (0.25 = a quarter).
    """
    x0, y0, x1, y1 = clamp_box(box, height, width)
    pad = int(round(margin * max(x1 - x0, y1 - y0))) if isinstance(margin, float) else int(margin)
    if pad < 0:
        raise ValueError(f"`margin` must be >= 0 but got {margin!r}.")
    return clamp_box((x0 - pad, y0 - pad, x1 + pad, y1 + pad), height, width)


# ---------------------------------------------------------------------------------------------------------------
# crop and paste back


def crop_around_box(image: torch.Tensor, box: Sequence[int], margin: int | float = 0) -> tuple[torch.Tensor, Box]:
    """Crop ``image`` [..., C, H, W] to ``box`` grown by ``margin`` (see :func:`expand_box`).

    Returns (crop, crop_box); keep crop_box to paste results back at the original resolution.
    """
    height, width = image.shape[-2:]
    crop_box = expand_box(box, margin, height, width)
    x0, y0, x1, y1 = crop_box
    return image[..., y0:y1, x0:x1], crop_box


def resize_rgba(rgba: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize straight RGBA [B, 4, h, w] to ``size`` (H, W) in premultiplied space (no dark fringes)."""
    if tuple(rgba.shape[-2:]) == tuple(size):
        return rgba
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    premult = F.interpolate(premultiply(rgba), size=size, mode=mode, **kwargs).clamp(0, 1)
    return unpremultiply(premult)


def uncrop_layer(layer: torch.Tensor, crop_box: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Place a straight-RGBA crop [B, 4, h, w] back on a transparent full-size canvas [B, 4, height, width].

    The whole crop is kept (not only the object's box), so shadows or reflections the model drew inside the
    margin survive. A crop generated at another size is resized to the crop box first.
    """
    _check_rgba(layer, "layer")
    x0, y0, x1, y1 = clamp_box(crop_box, height, width)
    if tuple(crop_box) != (x0, y0, x1, y1):
        raise ValueError(f"`crop_box` {tuple(crop_box)!r} must lie inside the {width}x{height} canvas.")
    layer = resize_rgba(layer, (y1 - y0, x1 - x0))
    canvas = layer.new_zeros(*layer.shape[:-2], height, width)
    canvas[..., y0:y1, x0:x1] = layer
    return canvas


def paste_crop(image: torch.Tensor, crop: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Return a copy of ``image`` [..., C, H, W] with the crop box replaced by ``crop`` (resized if needed).

    Pixels outside the crop box are copied bit-for-bit.
    """
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = clamp_box(crop_box, height, width)
    if crop.shape[-3] != image.shape[-3]:
        raise ValueError(f"`crop` has {crop.shape[-3]} channels but `image` has {image.shape[-3]}.")
    if tuple(crop.shape[-2:]) != (y1 - y0, x1 - x0):
        lead = crop.shape[:-3]
        flat = crop.reshape(-1, *crop.shape[-3:]).float()
        flat = F.interpolate(flat, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        crop = flat.reshape(*lead, *flat.shape[-3:]).to(image.dtype)
    out = image.clone()
    out[..., y0:y1, x0:x1] = crop
    return out


# ---------------------------------------------------------------------------------------------------------------
# imperfect masks (as users draw them: the decomposition paper trains on them; training/ and bfs_core/toy use these)


def shift_without_wrap(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`m` [..., H, W] moved down by `dy` and right by `dx` pixels (negative: up / left), zeros shifted in."""
    height, width = m.shape[-2:]
    out = torch.zeros_like(m)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = m[
        ..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def imperfect_mask(
    mask: torch.Tensor,
    generator: torch.Generator,
    dilate_px: int = 8,
    erode_px: int = 4,
    jitter_px: int = 4,
    probability: float = 0.8,
) -> torch.Tensor:
    """Spoil binary masks [N, 1, H, W] as the paper trains with: per sample (with `probability`) a random dilation
    (up to `dilate_px`) or erosion (up to `erode_px`), then a random shift of up to `jitter_px` pixels (what leaves
    the image is dropped and the uncovered edge is empty: nothing wraps around to the opposite side)."""
    out = []
    for m in mask.float():
        draw = torch.rand(4, generator=generator)
        if draw[0] < probability:
            if draw[1] < 0.5 and dilate_px > 0:
                r = int(torch.randint(1, dilate_px + 1, (1,), generator=generator))
                m = F.max_pool2d(m[None], 2 * r + 1, 1, r)[0]
            elif erode_px > 0:
                r = int(torch.randint(1, erode_px + 1, (1,), generator=generator))
                eroded = -F.max_pool2d(-m[None], 2 * r + 1, 1, r)[0]
                m = eroded if eroded.any() else m  # never erase a small object entirely
            if jitter_px > 0:
                dy, dx = (int(v) for v in torch.randint(-jitter_px, jitter_px + 1, (2,), generator=generator))
                m = shift_without_wrap(m, dy, dx)
        out.append(m)
    return torch.stack(out)


__all__ = [
    "Box",
    "alpha_blend",
    "box_from_mask",
    "clamp_box",
    "combined_alpha_from_renders",
    "composite_stack",
    "crop_around_box",
    "dilate_mask",
    "expand_box",
    "imperfect_mask",
    "mask_from_box",
    "over",
    "over_premultiplied",
    "paste_crop",
    "premultiply",
    "recomposite",
    "render_on_black",
    "render_shadowed_on_white",
    "resize_rgba",
    "rgba_from_shadowed_renders",
    "shadowed_foreground_color",
    "shift_without_wrap",
    "split_rgba",
    "uncrop_layer",
    "unpremultiply",
]
