"""Small real-image datasets for the training tests and `scripts/train_tiny_demo.py`.

`write_layer_datasets(assets, dir)`: RGBA stamps pasted on photo crops with eq. (1), written as every dataset kind of
training/README.md (triplet, pair, phi, removal). The tiny models the trainers train on (`write_tiny_models`,
`TINY_FLUX`, `TINY_PHI`, `TINY_BFS`) live with every other tiny model in `bfs_core.tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bfs_core.layer_math import alpha_blend, box_from_mask


def _load(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert(mode), dtype=np.float32) / 255.0


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


def make_layer_samples(assets: str | Path, count: int, size: int, seed: int = 0) -> list[dict]:
    """`count` (foreground RGBA, background, composite, box, caption) from real stamps over real photo crops."""
    assets = Path(assets)
    rng = np.random.default_rng(seed)
    photos = sorted((assets / "photos").glob("*.jpg")) + sorted((assets / "photos").glob("*.png"))
    stamps = sorted((assets / "stamps").glob("*.png"))
    samples = []
    for i in range(count):
        photo = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = photo.size
        side = int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        bg = np.asarray(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC), np.float32) / 255
        stamp_path = stamps[i % len(stamps)]
        stamp = Image.open(stamp_path).convert("RGBA")
        scale = rng.uniform(0.4, 0.7) * size / max(stamp.size)
        sw, sh = max(4, int(stamp.size[0] * scale)), max(4, int(stamp.size[1] * scale))
        stamp = stamp.resize((sw, sh), Image.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(stamp, (int(rng.integers(0, size - sw + 1)), int(rng.integers(0, size - sh + 1))))
        fg = np.asarray(canvas, np.float32) / 255
        fg_t = torch.from_numpy(fg).permute(2, 0, 1)  # HWC -> CHW
        comp = alpha_blend(fg_t[:3], fg_t[3:], torch.from_numpy(bg).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        caption = stamp_path.with_suffix(".txt").read_text().strip()
        samples.append({"fg": fg, "bg": bg, "comp": comp, "box": list(box_from_mask(fg[..., 3])), "caption": caption})
    return samples


def write_layer_datasets(assets: str | Path, out_dir: str | Path, count: int = 8, size: int = 64, seed: int = 0):
    """Write `triplets/`, `pairs/`, `phi/` and `removal/` datasets; returns their folders."""
    out = Path(out_dir)
    lines: dict[str, list[str]] = {"triplets": [], "pairs": [], "phi": [], "removal": []}
    for i, s in enumerate(make_layer_samples(assets, count, size, seed)):
        name = f"s{i:03d}"
        for kind in lines:
            _save(s["bg"], out / kind / "background" / f"{name}.png")
        for kind in ("triplets", "phi"):
            _save(s["fg"], out / kind / "foreground" / f"{name}.png")
        for kind in ("triplets", "pairs", "removal"):
            _save(s["comp"], out / kind / "composite" / f"{name}.png")
        # A rough object-removal mask: alpha > 0.1, a little looser than the object (RORem's masks are loose).
        rough = (s["fg"][..., 3:] > 0.1).astype(np.float32)
        _save(rough, out / "removal" / "mask" / f"{name}.png")
        files = {k: f"{k}/{name}.png" for k in ("foreground", "background", "composite")}
        common = {"name": name, "caption": s["caption"]}
        lines["triplets"].append({**common, **files, "box": s["box"]})
        lines["pairs"].append(
            {**common, "composite": files["composite"], "background": files["background"], "box": s["box"]}
        )
        lines["phi"].append({"name": name, "foreground": files["foreground"], "background": files["background"]})
        lines["removal"].append(
            {**common, "composite": files["composite"], "background": files["background"], "mask": f"mask/{name}.png"}
        )
    for kind, rows in lines.items():
        (out / kind / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {kind: out / kind for kind in lines}
