"""The decomposition training set (Outpaint-and-Remove §3.7 / §4.1): 1–3 RGBA foregrounds over a background.

    python -m training decompose-data --config training/configs/decompose.yaml [--key=value ...]

Per sample: a background photo crop, 1–3 RGBA layers (MULAN-style real layers and/or LayerDiffuse-style generated
ones, any folder of RGBA PNGs) rescaled and placed so that they may overlap (possible occlusions), one of them the
*target*. Written as a `triplet` dataset (training/README.md) with
    foreground = the target layer, complete (also where another layer hides it: occlusion recovery),
    background = the scene without the target (photo + every other layer, occluders included),
    composite  = photo + all layers in order, mask = the target's *visible* part (clean; `imperfect_mask` spoils it
    on the fly during training, as the paper trains on imperfect masks), layers/ = every layer, bottom to top.
Layers are quantised to 8 bits first and the composite/background recomputed from the stored values, so the files
recomposite exactly (to ½ LSB): composite == composite_stack([photo, *layers]).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bfs_core.atomic import atomic_path, atomic_write_text
from bfs_core.layer_math import box_from_mask, composite_stack, imperfect_mask, shift_without_wrap  # noqa: F401


logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Decomposition training-set builder."""

    foreground_dir: str = ""  # RGBA PNGs (MULAN layers, LayerDiffuse generations); an optional <name>.txt caption
    background_dir: str = ""  # RGB photos (OpenImages in the paper)
    output_dir: str = "data/decomposition"  # a `triplet` dataset is written here
    count: int = 1000  # samples to write
    size: int = 512  # square output size
    min_objects: int = 1
    max_objects: int = 3
    min_scale: float = 0.3  # object's long side / image side
    max_scale: float = 0.7
    seed: int = 0


@dataclass
class DataResult:
    weights: Path  # the dataset folder (named like the trainers' results for the CLI)
    count: int


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)  # HWC -> CHW


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _save(x: torch.Tensor, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp)
    return path.as_posix()


def compose_sample(
    photo: Image.Image,
    layers: list[Image.Image],
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.3, 0.7),
) -> dict[str, torch.Tensor | int]:
    """Place `layers` (RGBA) over a random square crop of `photo`; returns quantised tensors and the target index.

    Keys: photo [3,S,S], layers [K,4,S,S] (bottom to top), target (int), foreground [4,S,S], background [3,S,S],
    composite [3,S,S], mask [1,S,S] (target's visible part, alpha·Π(1 − alpha above) > 0.5).
    """
    w, h = photo.size
    side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    base = _quantise(_to_tensor(photo.convert("RGB").crop((x, y, x + side, y + side)).resize((size, size))))
    placed = []
    anchor = (int(rng.integers(size // 8, size // 2)), int(rng.integers(size // 8, size // 2)))
    for layer in layers:
        layer = layer.convert("RGBA")
        s = rng.uniform(*scale) * size / max(layer.size)
        lw, lh = max(4, int(layer.size[0] * s)), max(4, int(layer.size[1] * s))
        # Near a shared anchor, so the objects overlap often (occlusions), but never entirely off the canvas.
        px = int(np.clip(anchor[0] + rng.integers(-size // 4, size // 4) - lw // 2, -lw // 3, size - 2 * lw // 3))
        py = int(np.clip(anchor[1] + rng.integers(-size // 4, size // 4) - lh // 2, -lh // 3, size - 2 * lh // 3))
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(layer.resize((lw, lh), Image.LANCZOS), (px, py))
        placed.append(_quantise(_to_tensor(canvas)))
    stack = torch.stack(placed)  # [K, 4, S, S]
    target = int(rng.integers(0, len(placed)))
    above = stack[target + 1 :, 3:]
    visible = stack[target, 3:] * torch.prod(1 - above, dim=0) if len(above) else stack[target, 3:]
    others = [base] + [stack[i] for i in range(len(placed)) if i != target]
    return {
        "photo": base,
        "layers": stack,
        "target": target,
        "foreground": stack[target],
        "background": composite_stack(others)[:3],
        "composite": composite_stack([base, *placed])[:3],
        "mask": (visible > 0.5).float(),
    }


def _images(folder: str, pattern: str, what: str) -> list[Path]:
    found = sorted(Path(folder).glob(pattern)) if folder and Path(folder).is_dir() else []
    if not found:
        raise ValueError(f"`{what}` must be a folder with {pattern} images but got {folder!r}, which has none.")
    return found


def main(cfg: DataConfig) -> DataResult:
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError(f"Need 1 <= min_objects <= max_objects but got {cfg.min_objects}, {cfg.max_objects}.")
    if cfg.size % 64:
        raise ValueError(f"`size` must be a multiple of 64 (the RGBA VAE needs it) but got {cfg.size}.")
    fgs = _images(cfg.foreground_dir, "*.png", "foreground_dir")
    bgs = [
        p
        for ext in ("*.jpg", "*.jpeg", "*.png")
        for p in _images(cfg.background_dir, "*", "background_dir")
        if p.match(ext)
    ]
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.output_dir)
    lines = []
    for i in range(cfg.count):
        k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        chosen = [fgs[j] for j in rng.choice(len(fgs), size=k, replace=len(fgs) < k)]
        with Image.open(bgs[int(rng.integers(len(bgs)))]) as photo:
            sample = compose_sample(
                photo, [Image.open(p) for p in chosen], cfg.size, rng, (cfg.min_scale, cfg.max_scale)
            )
        if not sample["mask"].any():
            continue  # the target is fully hidden: nothing to decompose
        name = f"d{i:06d}"
        caption_file = chosen[sample["target"]].with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else "a photo"
        entry = {"name": name, "caption": caption or "a photo", "target": sample["target"]}
        for key in ("foreground", "background", "composite", "mask"):
            entry[key] = f"{key}/{name}.png"
            _save(sample[key], out / entry[key])
        entry["photo"] = f"photo/{name}.png"
        _save(sample["photo"], out / entry["photo"])
        entry["layers"] = [f"layers/{name}_{j}.png" for j in range(k)]
        for j, path in enumerate(entry["layers"]):
            _save(sample["layers"][j], out / path)
        entry["box"] = list(box_from_mask(sample["mask"][0]))
        lines.append(json.dumps(entry))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.jsonl", "".join(line + "\n" for line in lines))
    logger.info("decompose-data: wrote %d samples to %s", len(lines), out)
    return DataResult(weights=out, count=len(lines))
