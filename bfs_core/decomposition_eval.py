"""Scoring layer decomposition: background PSNR / SSIM (the paper's Table 1), alpha IoU and foreground PSNR.

Case set layout (one folder per case, `build_case_set` writes one from the real test assets):
    <root>/<case>/composite.png   RGB input image
    <root>/<case>/mask.png        L, white = the object to decompose
    <root>/<case>/background.png  RGB ground-truth background (the image without the object)
    <root>/<case>/foreground.png  RGBA ground-truth object layer (straight alpha, complete where occluded)

LPIPS and FID need network weights; they are computed only when the caller passes local TorchScript files:
`lpips` maps two [N, 3, H, W] images in [-1, 1] to per-image distances [N]; `fid_features` maps [N, 3, H, W] images
in [0, 1] to features [N, D] (e.g. a scripted Inception pool3). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_path, atomic_write_text
from .layer_math import alpha_blend, composite_stack


logger = logging.getLogger(__name__)

CASE_FILES = ("composite.png", "mask.png", "background.png", "foreground.png")
PAPER_TABLE = {"FLUX.1-Fill-dev": (25.59, 0.92), "Ours (paper)": (27.30, 0.93)}  # MULAN test set, PSNR dB / SSIM


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (images [N, C, H, W] in [0, 1])


def psnr(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB; with `weight` [N, 1, H, W] only weighted pixels count (e.g. alpha > 0)."""
    err = (pred.float() - target.float()) ** 2
    if weight is None:
        mse = err.flatten(1).mean(1)
    else:
        w = weight.float().expand_as(err)
        mse = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian 11×11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, channel mean."""
    x, y = pred.float(), target.float()
    c = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)  # "valid" windows, as scikit-image / the reference code

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def alpha_iou(pred_alpha: torch.Tensor, true_alpha: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    p, t = pred_alpha > threshold, true_alpha > threshold
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


# ---------------------------------------------------------------------------------------------------------------------
# Case sets


def load_image(path: Path, mode: str) -> torch.Tensor:
    """[1, C, H, W] float in [0, 1]."""
    array = np.asarray(Image.open(path).convert(mode), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # [H, W, C] -> [1, C, H, W]


def save_image(tensor: torch.Tensor, path: Path) -> Path:
    array = (tensor[0].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp)
    return path


@dataclass
class Case:
    name: str
    composite: torch.Tensor  # [1, 3, H, W]
    mask: torch.Tensor  # [1, 1, H, W]
    background: torch.Tensor  # [1, 3, H, W]
    foreground: torch.Tensor  # [1, 4, H, W]


def read_cases(root: str | Path) -> list[Case]:
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    cases = []
    for folder in folders:
        missing = [f for f in CASE_FILES if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"Case `{folder}` lacks {missing}; every case folder needs {list(CASE_FILES)}.")
        cases.append(
            Case(
                folder.name,
                load_image(folder / "composite.png", "RGB"),
                load_image(folder / "mask.png", "L"),
                load_image(folder / "background.png", "RGB"),
                load_image(folder / "foreground.png", "RGBA"),
            )
        )
    if not cases:
        raise ValueError(
            f"`cases` must be a folder of case folders ({', '.join(CASE_FILES)}) but {str(root)!r} has none. Build "
            "one with `python -m bfs_core evaluate-decomposition --build-cases DIR`."
        )
    return cases


def _stamp_layer(stamp: Image.Image, size: int, scale: float, x: int, y: int) -> torch.Tensor:
    w, h = max(4, int(stamp.size[0] * scale)), max(4, int(stamp.size[1] * scale))
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(stamp.resize((w, h), Image.LANCZOS), (x, y))
    return torch.from_numpy(np.asarray(canvas, np.float32) / 255).permute(2, 0, 1)[None]  # [1, 4, S, S]


def build_case_set(assets: str | Path, out_dir: str | Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Real RGBA stamps composited onto real photo crops with known layers (tests/assets), one folder per case.

    Odd cases add a second stamp in front of the object (an occluder): the ground-truth foreground stays complete,
    the ground-truth background keeps the occluder, and the mask is the object's visible part.
    """
    assets, out = Path(assets), Path(out_dir)
    rng = np.random.default_rng(seed)
    photos = sorted((assets / "photos").glob("*.jpg")) + sorted((assets / "photos").glob("*.png"))
    stamps = sorted((assets / "stamps").glob("*.png"))
    if not photos or not stamps:
        raise ValueError(f"`assets` must hold photos/*.jpg|png and stamps/*.png but {str(assets)!r} does not.")
    for i in range(count):
        photo = Image.open(photos[i % len(photos)]).convert("RGB")
        pw, ph = photo.size
        side = int(rng.integers(min(pw, ph) // 2, min(pw, ph)))
        x, y = int(rng.integers(0, pw - side + 1)), int(rng.integers(0, ph - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        photo_t = torch.from_numpy(np.asarray(crop, np.float32) / 255).permute(2, 0, 1)[None]
        stamp = Image.open(stamps[i % len(stamps)]).convert("RGBA")
        scale = rng.uniform(0.45, 0.7) * size / max(stamp.size)
        sx, sy = int(rng.integers(0, size // 3)), int(rng.integers(0, size // 3))
        obj = _stamp_layer(stamp, size, scale, sx, sy)
        layers = [photo_t, obj]
        occluder = None
        if i % 2 == 1:
            other = Image.open(stamps[(i + 1) % len(stamps)]).convert("RGBA")
            occluder = _stamp_layer(other, size, 0.35 * size / max(other.size), sx + size // 4, sy + size // 4)
            layers.append(occluder)
        composite = composite_stack(layers)[:, :3]
        background = photo_t if occluder is None else alpha_blend(occluder[:, :3], occluder[:, 3:], photo_t)
        visible = obj[:, 3:] * (1 - (occluder[:, 3:] if occluder is not None else 0))
        mask = (visible > 0.5).float()
        folder = out / f"case{i:03d}"
        save_image(composite, folder / "composite.png")
        save_image(mask, folder / "mask.png")
        save_image(background, folder / "background.png")
        save_image(obj, folder / "foreground.png")
    atomic_write_text(
        out / "README.txt",
        "Built by bfs_core.decomposition_eval.build_case_set from tests/assets (stamps: tuxpaint-stamps, photos: "
        "plasma-workspace wallpapers; see tests/assets/LICENSE.md).\n",
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class MethodScores:
    name: str
    per_case: list[dict] = field(default_factory=list)

    def mean(self, key: str) -> float | None:
        values = [c[key] for c in self.per_case if c.get(key) is not None]
        return float(np.mean(values)) if values else None


Decomposer = Callable[[Case], tuple[torch.Tensor | None, torch.Tensor]]  # case -> (foreground RGBA | None, bg RGB)


def evaluate(
    name: str,
    decompose: Decomposer,
    cases: Iterable[Case],
    *,
    lpips: Callable | None = None,
    fid_features: Callable | None = None,
    out_dir: Path | None = None,
) -> MethodScores:
    """Run `decompose` on every case and score it; optionally write the predictions under `out_dir/<name>/`."""
    scores = MethodScores(name)
    real_feats, fake_feats = [], []
    for case in cases:
        foreground, background = decompose(case)
        background = background.float().cpu().clamp(0, 1)
        row = {
            "case": case.name,
            "bg_psnr": float(psnr(background, case.background)[0]),
            "bg_ssim": float(ssim(background, case.background)[0]),
        }
        if lpips is not None:
            row["bg_lpips"] = float(lpips(background * 2 - 1, case.background * 2 - 1).reshape(-1)[0])
        if fid_features is not None:
            real_feats.append(fid_features(case.background).detach().cpu().numpy())
            fake_feats.append(fid_features(background).detach().cpu().numpy())
        if foreground is not None:
            foreground = foreground.float().cpu().clamp(0, 1)
            true_alpha = case.foreground[:, 3:]
            row["alpha_iou"] = float(alpha_iou(foreground[:, 3:], true_alpha)[0])
            row["fg_psnr"] = float(psnr(foreground[:, :3], case.foreground[:, :3], weight=(true_alpha > 0).float())[0])
        scores.per_case.append(row)
        if out_dir is not None:
            save_image(background, Path(out_dir) / name / f"{case.name}_background.png")
            if foreground is not None:
                save_image(foreground, Path(out_dir) / name / f"{case.name}_foreground.png")
    if fid_features is not None and len(real_feats) > 1:
        fid = frechet_distance(np.concatenate(real_feats), np.concatenate(fake_feats))
        for row in scores.per_case:
            row["bg_fid"] = fid
    return scores


def format_table(results: list[MethodScores], paper: bool = True) -> str:
    """A plain-text table: one row per method, background PSNR/SSIM (+ LPIPS/FID), alpha IoU, foreground PSNR."""
    columns = [("bg_psnr", "BG PSNR", "{:.2f}"), ("bg_ssim", "BG SSIM", "{:.3f}")]
    if any(r.mean("bg_lpips") is not None for r in results):
        columns.append(("bg_lpips", "BG LPIPS", "{:.3f}"))
    if any(r.mean("bg_fid") is not None for r in results):
        columns.append(("bg_fid", "BG FID", "{:.2f}"))
    columns += [("alpha_iou", "alpha IoU", "{:.3f}"), ("fg_psnr", "FG PSNR (a>0)", "{:.2f}")]
    width = max([len(r.name) for r in results] + [len("Ours (paper)"), 6]) + 2
    header = "method".ljust(width) + "".join(title.rjust(15) for _, title, _ in columns) + "   cases"
    lines = [header, "-" * len(header)]
    for r in results:
        cells = []
        for key, _, fmt in columns:
            value = r.mean(key)
            cells.append(("–" if value is None or not math.isfinite(value) else fmt.format(value)).rjust(15))
        lines.append(r.name.ljust(width) + "".join(cells) + f"   {len(r.per_case)}")
    if paper:
        lines.append("paper, MULAN test set (526 images), background only:")
        for name, (p, s) in PAPER_TABLE.items():
            lines.append(f"  {name.ljust(width - 2)}{p:15.2f}{s:15.3f}")
    return "\n".join(lines)


def write_report(results: list[MethodScores], path: Path) -> Path:
    data = {r.name: {"per_case": r.per_case} for r in results}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path
