"""The toy layered world: procedural 64×64 scenes with a sky, a ground, a sun and coloured objects with shadows.

Every sample has exact ground truth: the straight-alpha foreground layer F (object + shadow), the background B, the
composite C = α·F + (1 − α)·B (eq. 1), the object's box, the prompt and the light. The sun's side sets the shadow's
direction (shadows fall on the ground *away* from the sun), its height sets the shadow's length and softness (a low
sun casts long, soft shadows), and the object is shaded brighter on the sun's side.

Two degraded variants follow the paper's data recipe:
- stage-1 triplets (`degraded=True`): the shadow comes from a generic "shadow generator" that does not know the scene's
  light (random side, fixed length), as the paper's synthetic triplets get a plausible but scene-agnostic shadow;
- stage-2 pairs: the real composite and background with no foreground layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path, atomic_write_text


SIZE = 64
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.75),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("cube", "ball", "cone", "pillar")
SHADOW_OPACITY = 0.6
SUPERSAMPLE = 4
# What the toy model was trained on (make_background / make_scene draw from exactly these ranges, inclusive):
HORIZON_RANGE = (22, 29)  # the sky/ground line, in pixels from the top
BOX_SIDE_RANGE = (12, 20)  # width and height of a box (cube, ball, cone)
PILLAR_WIDTH_RANGE, PILLAR_HEIGHT_RANGE = (8, 10), (18, 26)  # pillars: half as wide, 6 px taller (at most 26)
FOOT_ABOVE_HORIZON = 10  # a box's bottom edge (the object's foot) is at least this far below the horizon ...
FOOT_MARGIN = 4  # ... and at least this far above the bottom edge of the image


@dataclass
class Scene:
    """One toy sample. Images are float32 HWC in [0, 1]; `box` is [x0, y0, x1, y1] (exclusive x1/y1) of the object.

    `light_dx` is −1 when the sun is on the left (shadow falls right) and +1 when it is on the right; `shadow_dir`
    is the unit image-space direction (x right, y down) from the object's foot to the centre of its shadow.
    """

    foreground: np.ndarray  # [H, W, 4] straight alpha: object + shadow
    object_alpha: np.ndarray  # [H, W] the object alone (for IoU and shape checks)
    background: np.ndarray  # [H, W, 3]
    composite: np.ndarray  # [H, W, 3]
    box: list[int]
    colour: str
    shape: str
    light_dx: int
    shadow_dir: tuple[float, float]

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def _grid(size: int, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a supersampled grid, in output pixel units."""
    c = (np.arange(size * ss) + 0.5) / ss
    return np.meshgrid(c, c, indexing="xy")


def _downsample(x: np.ndarray, ss: int = SUPERSAMPLE) -> np.ndarray:
    h, w = x.shape[0] // ss, x.shape[1] // ss
    return x.reshape(h, ss, w, ss, *x.shape[2:]).mean(axis=(1, 3))


def shape_mask(shape: str, box: list[float], size: int = SIZE) -> np.ndarray:
    """Antialiased silhouette [size, size] of `shape` filling `box` (x0, y0, x1, y1, floats)."""
    if shape not in SHAPES:
        raise ValueError(f"`shape` must be one of {SHAPES} but got {shape!r}.")
    x, y = _grid(size)
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if shape in ("cube", "pillar"):
        m = inside
    elif shape == "ball":
        m = ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1
    else:  # cone: apex at the top centre, base at the bottom
        half = (y - y0) / max(h, 1e-6) * (w / 2)
        m = inside & (np.abs(x - cx) <= half)
    return _downsample(m.astype(np.float32))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, radius, mode="edge")
    rows = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, pad)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, rows)


def cast_shadow(obj_box: list[float], shape: str, dx: int, length: float, softness: float, size: int = SIZE):
    """Shadow alpha [size, size] on the ground: the silhouette laid down from the foot line, squashed vertically and
    sheared sideways by `dx·length` per unit of object height, then blurred by `softness` px. Also returns the unit
    direction from the foot centre to the shadow's centroid."""
    x, y = _grid(size)
    x0, y0, x1, y1 = obj_box
    foot = y1
    squash = 0.3
    # Inverse map: a ground pixel (x, y) below the foot is the shadow of the object point at height hgt above the foot.
    hgt = (y - foot) / squash
    src_x, src_y = x - dx * length * hgt, foot - hgt
    valid = (hgt >= 0) & (src_y >= y0)
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    inside = valid & (src_x >= x0) & (src_x < x1)
    if shape == "ball":
        m = valid & (((src_x - cx) / (w / 2)) ** 2 + ((src_y - cy) / (h / 2)) ** 2 <= 1)
    elif shape == "cone":
        half = (src_y - y0) / max(h, 1e-6) * (w / 2)
        m = inside & (np.abs(src_x - cx) <= half)
    else:
        m = inside
    alpha = _blur(_downsample(m.astype(np.float32)), softness)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    total = alpha.sum()
    if total < 1e-6:
        return alpha, (float(dx), 0.0)
    vx, vy = (alpha * xs).sum() / total - cx, (alpha * ys).sum() / total - foot
    norm = math.hypot(vx, vy) or 1.0
    return alpha, (vx / norm, vy / norm)


def make_background(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, dict]:
    """Sky (vertical gradient) over ground (gradient + a little texture), a sun on the left or right."""
    horizon = int(rng.integers(HORIZON_RANGE[0], HORIZON_RANGE[1] + 1))
    dusk = rng.random() < 0.3
    top = np.array([0.95, 0.55, 0.35] if dusk else [0.35, 0.55, 0.95]) * rng.uniform(0.85, 1.0)
    bottom = np.array([0.98, 0.80, 0.60] if dusk else [0.70, 0.85, 1.00])
    ground_choices = [(0.35, 0.55, 0.25), (0.55, 0.45, 0.30), (0.50, 0.50, 0.48), (0.75, 0.68, 0.50)]
    ground = np.array(ground_choices[int(rng.integers(len(ground_choices)))]) * rng.uniform(0.85, 1.1)
    ys = (np.arange(size) + 0.5)[:, None, None]
    t = np.clip(ys / horizon, 0, 1)
    sky = top * (1 - t) + bottom * t
    g = np.clip((ys - horizon) / (size - horizon), 0, 1)
    ground_img = ground * (0.85 + 0.3 * g)
    img = np.where(ys < horizon, sky, ground_img) * np.ones((1, size, 1))
    img = img + rng.normal(0, 0.012, img.shape) * (ys >= horizon)
    # The sun: left or right, higher = shorter, sharper shadows.
    dx = -1 if rng.random() < 0.5 else 1  # -1: sun on the left
    sun_x = rng.uniform(6, 18) if dx == -1 else rng.uniform(size - 18, size - 6)
    sun_y = rng.uniform(5, horizon - 8)
    elevation = 1 - (sun_y - 5) / max(horizon - 13, 1)  # 1 = high, 0 = near the horizon
    x, y = _grid(size)
    r = 4.0
    sun = _downsample((((x - sun_x) ** 2 + (y - sun_y) ** 2) <= r * r).astype(np.float32))[..., None]
    glow = np.exp(-(((np.arange(size)[None, :] + 0.5 - sun_x) ** 2 + (ys[..., 0] - sun_y) ** 2) / 120.0))[..., None]
    img = img * (1 - sun) + np.array([1.0, 0.95, 0.55]) * sun
    img = img + 0.15 * glow * (ys < horizon)
    light = {
        "dx": -dx,  # shadows fall away from the sun
        "length": float(0.5 + 1.1 * (1 - elevation)),
        "softness": float(0.4 + 1.2 * (1 - elevation)),
        "sun": (float(sun_x), float(sun_y)),
        "horizon": horizon,
    }
    return np.clip(img, 0, 1).astype(np.float32), light


def render_object(colour: str, shape: str, box: list[float], sun_dx: int, size: int = SIZE):
    """Object colour [size, size, 3] (brighter on the sun's side) and its alpha."""
    alpha = shape_mask(shape, box, size)
    base = np.array(COLOURS[colour], dtype=np.float32)
    x0, _, x1, _ = box
    xs = (np.arange(size) + 0.5)[None, :, None]
    side = np.clip((xs - (x0 + x1) / 2) / max((x1 - x0) / 2, 1), -1, 1)  # -1 left edge .. 1 right edge
    shade = 0.85 + 0.2 * side * sun_dx  # sun_dx = +1: the sun is on the right
    rgb = np.clip(base * shade, 0, 1) * np.ones((size, 1, 1))
    return rgb.astype(np.float32), alpha.astype(np.float32)


def make_scene(
    rng: np.random.Generator,
    *,
    colour: str | None = None,
    shape: str | None = None,
    background: tuple[np.ndarray, dict] | None = None,
    box: list[int] | None = None,
    degraded: bool = False,
    size: int = SIZE,
) -> Scene:
    """Sample one scene. Pass `background` (from `make_background`) to put several objects into one world."""
    bg, light = background if background is not None else make_background(rng, size)
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    if box is None:
        w = int(rng.integers(BOX_SIDE_RANGE[0], BOX_SIDE_RANGE[1] + 1))
        h = int(rng.integers(BOX_SIDE_RANGE[0], BOX_SIDE_RANGE[1] + 1))
        if shape == "pillar":
            w, h = max(PILLAR_WIDTH_RANGE[0], w // 2), min(PILLAR_HEIGHT_RANGE[1], h + 6)
        foot = int(rng.integers(light["horizon"] + FOOT_ABOVE_HORIZON, size - FOOT_MARGIN))
        x0 = int(rng.integers(12, size - 12 - w))
        box = [x0, foot - h, x0 + w, foot]
    box = [int(v) for v in box]
    rgb, a_obj = render_object(colour, shape, box, -light["dx"], size)
    if degraded:  # scene-agnostic shadow generator (stage-1 triplets)
        dx, length, softness = (-1 if rng.random() < 0.5 else 1), 0.9, 0.9
    else:
        dx, length, softness = light["dx"], light["length"], light["softness"]
    a_sh, _ = cast_shadow(box, shape, dx, length, softness, size)
    a_sh = SHADOW_OPACITY * a_sh * (1 - a_obj)
    # The true shadow direction is the scene's (also for degraded samples: it is what a correct layer would show).
    _, true_dir = cast_shadow(box, shape, light["dx"], light["length"], light["softness"], size)
    alpha = a_obj + (1 - a_obj) * a_sh
    colour_rgb = np.where(alpha[..., None] > 1e-6, (a_obj[..., None] * rgb) / np.maximum(alpha[..., None], 1e-6), 0)
    fg = np.concatenate([colour_rgb, alpha[..., None]], axis=-1).astype(np.float32)
    comp = (fg[..., :3] * fg[..., 3:] + bg * (1 - fg[..., 3:])).astype(np.float32)
    return Scene(fg, a_obj, bg, comp, box, colour, shape, light["dx"], true_dir)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp)


def write_datasets(out_dir: str | Path, count: int, seed: int = 0) -> dict[str, Path]:
    """Write every dataset kind of training/README.md from the toy world under `out_dir`:

    - `real/` (kind `triplet`): correct shadows (base pretraining, Φ, evaluation ground truth);
    - `triplets/` (kind `triplet`): the stage-1 synthetic triplets (scene-agnostic generator shadows);
    - `pairs/` (kind `pair`): composite/background pairs of real scenes with no foreground (stage 2 L_real);
    - `phi/` (kind `phi`): foreground/background pairs for Φ.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {"real": [], "triplets": [], "pairs": [], "phi": []}
    for i in range(count):
        name = f"{i:05d}"
        background = make_background(rng)
        real = make_scene(rng, background=background)
        fake = make_scene(
            rng, background=background, colour=real.colour, shape=real.shape, box=real.box, degraded=True
        )
        for kind, scene in (("real", real), ("triplets", fake)):
            files = {k: f"{k}/{name}.png" for k in ("foreground", "background", "composite")}
            _save(scene.foreground, out / kind / files["foreground"])
            _save(scene.background, out / kind / files["background"])
            _save(scene.composite, out / kind / files["composite"])
            rows[kind].append({"name": name, **files, "box": scene.box, "caption": scene.caption})
        rows["pairs"].append(
            {
                "name": name,
                "composite": f"../real/composite/{name}.png",
                "background": f"../real/background/{name}.png",
                "box": real.box,
                "caption": real.caption,
            }
        )
        rows["phi"].append(
            {
                "name": name,
                "foreground": f"../real/foreground/{name}.png",
                "background": f"../real/background/{name}.png",
            }
        )
    for kind, lines in rows.items():
        (out / kind).mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / kind / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return {kind: out / kind for kind in rows}


def vocabulary() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]
