"""Synthetic BFS triplets from object-removal pairs (paper appendix A.3, eq. 10–15).

    python -m training synth-data --config training/configs/synth_data.yaml [--key=value ...]

Per pair (C, B, rough M): box of M -> segmenter mask M_sam (SAM2) -> keep if IoU(M, M_sam) >= 0.8 -> trimap (M_sam
dilated / eroded by `trimap_px` pixels: 0 outside, 0.5 band, 1 inside) -> matte α_F (ViTMatte) -> object on white
F_white = α_F·C + (1 − α_F) and on black F_black = α_F·C -> shadow generator G(F_white, α_F) = F_shadowed -> α and
colour by eq. (12)–(14) -> recomposite Ĉ = α·F̂ + (1 − α)·B (eq. 15). Output: a `triplet` dataset (training/README.md)
plus `filter_report.json`. The three models are pluggable callables:
    segmenter(image [3,H,W], box) -> mask [1,H,W];  matting(image [3,H,W], trimap [1,H,W]) -> alpha [1,H,W];
    shadow(f_white [3,H,W], alpha [1,H,W]) -> f_shadowed [3,H,W]   (all float in [0, 1])
SAM2 and ViTMatte load through transformers from local folders; the paper's shadow network is a Flux LoRA we cannot
train here, so `drop_shadow` (a squashed, sheared, blurred silhouette) stands in and anything with the same call
signature (`module:callable`) can replace it.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from bfs_core.atomic import atomic_path, atomic_write_text
from bfs_core.layer_math import box_from_mask, dilate_mask, mask_from_box, recomposite, rgba_from_shadowed_renders

from .data import read_manifest


logger = logging.getLogger(__name__)

Segmenter = Callable[[torch.Tensor, tuple[int, int, int, int]], torch.Tensor]
Matting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ShadowGenerator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SynthConfig:
    """Synthetic-triplet builder."""

    input_dir: str = ""  # object-removal pairs: manifest.jsonl with composite, background, mask (rough), caption
    output_dir: str = "data/bfs_triplets"  # a `triplet` dataset is written here
    segmenter: str = "sam2"  # "sam2" (needs sam2_path) or "module:callable" returning a Segmenter
    sam2_path: str = ""  # local transformers SAM2 folder (e.g. facebook/sam2.1-hiera-large downloaded beforehand)
    matting: str = "vitmatte"  # "vitmatte" (needs vitmatte_path) or "module:callable" returning a Matting
    vitmatte_path: str = ""  # local transformers ViTMatte folder (e.g. hustvl/vitmatte-base-composition-1k)
    shadow: str = "drop_shadow"  # "drop_shadow", "none", or "module:callable" returning a ShadowGenerator
    min_iou: float = 0.8  # IoU(M, M_sam) filter
    trimap_px: int = 11  # dilation / erosion radius of the trimap band, pixels
    box_from: Literal["object", "layer"] = "object"  # box mask M̂ around the object (M_sam) or the whole RGBA layer
    eps: float = 1e-6  # eq. 14
    shadow_opacity: float = 0.6
    shadow_squash: float = 0.3  # shadow height / object height
    shadow_shear: float = 0.8  # horizontal shift per unit of shadow height
    shadow_blur_px: int = 5
    device: str = "cpu"
    limit: int | None = None  # process only the first N pairs


@dataclass
class SynthResult:
    weights: Path  # the output dataset folder (named like the trainers' results for the CLI)
    kept: int
    report: dict


# ---------------------------------------------------------------------------------------------------------------------
# Mask utilities


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a >= 0.5, b >= 0.5
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


def make_trimap(mask: torch.Tensor, px: int) -> torch.Tensor:
    """[1, H, W] binary mask -> trimap: 1 inside the eroded mask, 0 outside the dilated one, 0.5 in the band."""
    m = (mask >= 0.5).float()
    dilated, eroded = dilate_mask(m, px), 1 - dilate_mask(1 - m, px)
    return torch.where(eroded > 0.5, 1.0, torch.where(dilated > 0.5, 0.5, 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# The pluggable models


def drop_shadow(opacity=0.6, squash=0.3, shear=0.8, blur_px=5) -> ShadowGenerator:
    """A geometric cast shadow: the silhouette flattened onto the ground at the object's base, sheared, blurred.

    Returns G(f_white, alpha) = f_white − α_shadow with α_shadow = opacity·blur(silhouette')·(1 − α_F), so
    α_F + α_shadow <= 1 and eq. (10) holds with I_black = 0, I_white = 1.
    """

    def generate(f_white: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        _, height, width = alpha.shape
        rows = torch.nonzero(alpha[0].amax(dim=1) > 0.5)
        if rows.numel() == 0:
            return f_white
        base = rows.max().item() / max(height - 1, 1) * 2 - 1  # the object's lowest row, normalised [-1, 1]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        # A shadow pixel `d` above the base line samples the silhouette `d / squash` above it, shifted sideways.
        src_y = base - (base - ys) / squash
        src_x = xs + shear * (base - ys) / squash * 0.5
        grid = torch.stack([src_x, src_y], dim=-1)[None]  # [1, H, W, 2] as (x, y)
        silhouette = F.grid_sample(alpha[None].float(), grid, align_corners=True, padding_mode="zeros")
        silhouette = silhouette * (ys <= base)  # only above the base line
        k = 2 * blur_px + 1
        soft = F.avg_pool2d(silhouette, k, stride=1, padding=blur_px, count_include_pad=False)[0]
        alpha_shadow = opacity * soft.clamp(0, 1) * (1 - alpha)
        return (f_white - alpha_shadow).clamp(0, 1)

    return generate


def no_shadow(f_white: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return f_white


class Sam2Segmenter:
    """SAM2 through transformers (`Sam2Model` + `Sam2Processor`) from a local folder, prompted with the box."""

    def __init__(self, folder: str, device: str = "cpu"):
        try:
            from transformers import Sam2Model, Sam2Processor
        except ImportError as error:  # transformers 4.50-4.55, which the pack otherwise supports, has no SAM2
            import transformers

            raise ImportError(
                f"segmenter 'sam2' needs transformers>=4.56 (Sam2Model) but {transformers.__version__} is installed: "
                "`pip install -U 'transformers>=4.56'`, or set `segmenter` to the import path of a segmenter of yours."
            ) from error
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"`sam2_path` must be a local transformers SAM2 folder but got {folder!r}.")
        self.processor = Sam2Processor.from_pretrained(folder, local_files_only=True)
        self.model = Sam2Model.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))  # CHW -> HWC
        inputs = self.processor(images=pil, input_boxes=[[list(box)]], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs, multimask_output=False)
        masks = self.processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu())[0]
        return masks.reshape(-1, *image.shape[-2:])[:1].float()  # [1, H, W]


class VitMatteMatting:
    """ViTMatte through transformers (`VitMatteForImageMatting`) from a local folder."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import VitMatteForImageMatting, VitMatteImageProcessor

        if not folder or not Path(folder).is_dir():
            raise ValueError(f"`vitmatte_path` must be a local transformers ViTMatte folder but got {folder!r}.")
        self.processor = VitMatteImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = VitMatteForImageMatting.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        tri = Image.fromarray((trimap[0].numpy() * 255).round().astype(np.uint8), mode="L")
        inputs = self.processor(images=pil, trimaps=tri, return_tensors="pt").to(self.device)
        alphas = self.model(**inputs).alphas  # [1, 1, H', W'], padded to a multiple of 32
        return alphas[0, :, :height, :width].float().cpu().clamp(0, 1)


def _import(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"Expected 'module:callable' but got {spec!r}.")
    return getattr(importlib.import_module(module), name)


def build_parts(
    cfg: SynthConfig, segmenter: Segmenter | None = None, matting: Matting | None = None, shadow=None
) -> tuple[Segmenter, Matting, ShadowGenerator]:
    """The three models: those passed in are kept, the others are built from the config."""
    if segmenter is None:
        segmenter = Sam2Segmenter(cfg.sam2_path, cfg.device) if cfg.segmenter == "sam2" else _import(cfg.segmenter)()
    if matting is None:
        matting = (
            VitMatteMatting(cfg.vitmatte_path, cfg.device) if cfg.matting == "vitmatte" else _import(cfg.matting)()
        )
    if shadow is None and cfg.shadow == "drop_shadow":
        shadow = drop_shadow(cfg.shadow_opacity, cfg.shadow_squash, cfg.shadow_shear, cfg.shadow_blur_px)
    elif shadow is None:
        shadow = no_shadow if cfg.shadow == "none" else _import(cfg.shadow)()
    return segmenter, matting, shadow


# ---------------------------------------------------------------------------------------------------------------------
# One sample, then a folder


def synthesize(
    composite: torch.Tensor,
    background: torch.Tensor,
    rough_mask: torch.Tensor,
    segmenter: Segmenter,
    matting: Matting,
    shadow: ShadowGenerator,
    cfg: SynthConfig,
) -> tuple[dict | None, dict]:
    """(images or None when filtered, stats). Images: foreground RGBA, recomposite, box mask, box, plus the steps."""
    box = box_from_mask(rough_mask)  # M -> M_bbox
    m_sam = (segmenter(composite, box) >= 0.5).float()
    iou = mask_iou(rough_mask, m_sam)
    stats = {"iou": round(iou, 4)}
    if iou < cfg.min_iou:
        return None, {**stats, "reason": f"iou {iou:.3f} < {cfg.min_iou}"}
    trimap = make_trimap(m_sam, cfg.trimap_px)
    alpha_f = matting(composite, trimap).clamp(0, 1)  # M_matte
    f_white = alpha_f * composite + (1 - alpha_f)  # the object on white
    f_black = alpha_f * composite  # α_F·F: the object on black
    f_shadowed = shadow(f_white, alpha_f).clamp(0, 1)
    rgba = rgba_from_shadowed_renders(f_shadowed, f_black, cfg.eps)  # eq. (12)–(14)
    out_box = box_from_mask(m_sam if cfg.box_from == "object" else rgba[3:] > 0.5)
    images = {
        "foreground": rgba,
        "composite": recomposite(rgba, background),  # eq. (15)
        "mask": mask_from_box(out_box, *composite.shape[-2:])[None],
        "box": out_box,
        "trimap": trimap,
        "matte": alpha_f,
        "f_shadowed": f_shadowed,
    }
    return images, stats


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # CHW -> HWC


def _save(x: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = _to_uint8(x)
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp)


def main(
    cfg: SynthConfig,
    segmenter: Segmenter | None = None,
    matting: Matting | None = None,
    shadow: ShadowGenerator | None = None,
) -> SynthResult:
    """Run the pipeline over `input_dir`; models not passed in are built from the config."""
    entries, bad = read_manifest(cfg.input_dir, "removal")
    if cfg.limit is not None:
        entries = entries[: cfg.limit]
    segmenter, matting, shadow = build_parts(cfg, segmenter, matting, shadow)
    root, out = Path(cfg.input_dir), Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"name": n, "status": "bad_input", "reason": r} for n, r in bad]
    lines = []
    for entry in tqdm(entries, desc="synth-data"):
        name = entry["name"]
        try:
            composite = _load_native(root / entry["composite"], 3)
            background = _load_native(root / entry["background"], 3)
            rough = _load_native(root / entry["mask"], 1) >= 0.5
            images, stats = synthesize(composite, background, rough.float(), segmenter, matting, shadow, cfg)
        except Exception as err:  # one broken sample must not stop the run: report it by name
            logger.warning("synth-data: %s failed: %s", name, err)
            samples.append({"name": name, "status": "error", "reason": str(err)})
            continue
        if images is None:
            samples.append({"name": name, "status": "filtered", **stats})
            continue
        # Quantise F̂ and B first and recomposite from the stored values, so the files satisfy eq. (15) to 1/2 LSB.
        rgba_q = torch.from_numpy(_to_uint8(images["foreground"])).permute(2, 0, 1).float() / 255
        bg_q = torch.from_numpy(_to_uint8(background)).permute(2, 0, 1).float() / 255
        files = {k: f"{k}/{name}.png" for k in ("foreground", "background", "composite", "mask")}
        _save(rgba_q, out / files["foreground"])
        _save(bg_q, out / files["background"])
        _save(recomposite(rgba_q, bg_q), out / files["composite"])
        _save(images["mask"], out / files["mask"])
        lines.append(json.dumps({"name": name, **files, "box": list(images["box"]), "caption": entry["caption"]}))
        samples.append({"name": name, "status": "kept", **stats})
    atomic_write_text(out / "manifest.jsonl", "".join(line + "\n" for line in lines))
    counts = Counter(s["status"] for s in samples)
    report = {"total": len(samples), "kept": counts["kept"], "by_status": dict(counts), "samples": samples}
    atomic_write_text(out / "filter_report.json", json.dumps(report, indent=2))
    logger.info("synth-data: kept %d of %d (%s); report: %s", counts["kept"], len(samples), dict(counts), out)
    return SynthResult(weights=out, kept=counts["kept"], report=report)


def _load_native(path: Path, channels: int) -> torch.Tensor:
    """Image at its own size -> [C, H, W] float in [0, 1] (the pipeline works at the pairs' native resolution)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert({1: "L", 3: "RGB"}[channels]), dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], channels)).permute(2, 0, 1)  # HWC -> CHW
