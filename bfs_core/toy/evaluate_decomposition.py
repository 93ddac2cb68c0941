"""Measure the toy decomposition model on held-out toy scenes (bfs_core/toy/decomposition.py), with exact ground truth.

Per scene (then averaged); the target's *footprint* is where its true layer (object + shadow) has alpha > 0.01, grown
by 2 px; the *object* is where the true layer's alpha > 0.75 (shadows are at most 0.6 opaque), the hidden part
included:
- `bg_psnr` / `bg_ssim`: the returned background against the scene without the target, inside the footprint (PSNR
  over the footprint's pixels; SSIM over its bounding box grown to at least 16 px);
- `alpha_iou`: IoU of the predicted object (alpha > 0.75) with the whole true object (occlusion completion counts);
- `hidden_recall`: the fraction of the object's hidden pixels (behind an occluder) that the layer covers (alpha >
  0.75), over the occluded scenes only;
- `fg_rgb_err`: mean |predicted − true colour| over the whole true object's pixels (straight RGB in [0, 1]).
Rows: the model; (a) the plain toy Fill model inpainting the masked region (its input: the same image, imperfect
mask and caption; it has no layer); `fill_then_extract` (toy Fill removal + the toy BFS model's Extract Foreground)
when the pipeline offers it; (b) chance: the model's predictions shuffled between scenes (roll by one).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..decomposition_eval import PAPER_TABLE, alpha_iou, psnr, ssim
from ..layer_math import dilate_mask
from ..models.layer_decomposition import FILL_CONTEXT_CHANNELS
from .decomposition import (
    DecompositionScene,
    decompose_scenes,
    heldout_decomposition_scenes,
    load_toy_decomposition,
    load_toy_fill_baseline,
    scene_tensors,
)


logger = logging.getLogger(__name__)

METRICS = ("bg_psnr", "bg_ssim", "alpha_iou", "hidden_recall", "fg_rgb_err")
HIGHER_IS_BETTER = {"bg_psnr": True, "bg_ssim": True, "alpha_iou": True, "hidden_recall": True, "fg_rgb_err": False}
OBJECT_ALPHA = 0.75
FOOTPRINT_ALPHA, FOOTPRINT_GROW = 0.01, 2
RESULTS = Path(__file__).resolve().parent / "results" / "decomposition"


def _footprint(true_fg: torch.Tensor) -> torch.Tensor:
    return dilate_mask((true_fg[:, 3:] > FOOTPRINT_ALPHA).float(), FOOTPRINT_GROW)  # [N, 1, H, W]


def _ssim_in_box(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor, min_side: int = 16) -> float:
    """SSIM of [1, 3, H, W] images over the bounding box of `region` [H, W] grown to at least `min_side`."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    h, w = region.shape
    box = []
    for lo, hi, size in ((int(ys.min()), int(ys.max()) + 1, h), (int(xs.min()), int(xs.max()) + 1, w)):
        grow = max(0, min_side - (hi - lo))
        lo, hi = max(0, lo - (grow + 1) // 2), min(size, hi + (grow + 1) // 2)
        box.append((lo, hi))
    (y0, y1), (x0, x1) = box
    return float(ssim(pred[..., y0:y1, x0:x1], target[..., y0:y1, x0:x1])[0])


def score(
    scenes: list[DecompositionScene], foreground: torch.Tensor | None, background: torch.Tensor, shift: int = 0
) -> dict[str, float | None]:
    """Mean metrics of predictions [N, 4 / 3, H, W]; `shift` > 0 scores scene i with prediction i + shift (chance)."""
    truth = scene_tensors(scenes)
    n = len(scenes)
    order = [(i + shift) % n for i in range(n)]
    bg = background.float().clamp(0, 1)[order]
    footprint = _footprint(truth["foreground"])
    rows = []
    for i in range(n):
        row = {
            "bg_psnr": float(psnr(bg[i : i + 1], truth["background"][i : i + 1], weight=footprint[i : i + 1])[0]),
            "bg_ssim": _ssim_in_box(bg[i : i + 1], truth["background"][i : i + 1], footprint[i, 0] > 0),
        }
        if foreground is not None:
            fg = foreground.float().clamp(0, 1)[order[i]]
            true_fg = truth["foreground"][i]
            obj = true_fg[3] > OBJECT_ALPHA
            row["alpha_iou"] = float(alpha_iou(fg[None, 3:], true_fg[None, 3:], threshold=OBJECT_ALPHA)[0])
            row["fg_rgb_err"] = float((fg[:3] - true_fg[:3]).abs()[:, obj].mean()) if obj.any() else None
            hidden = truth["hidden"][i, 0] > 0.5
            row["hidden_recall"] = float((fg[3][hidden] > OBJECT_ALPHA).float().mean()) if hidden.any() else None
        rows.append(row)

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {**{m: mean(m) for m in METRICS}, "per_scene": {m: [r.get(m) for r in rows] for m in METRICS}}


def paired_difference(a: dict, b: dict, metric: str) -> tuple[float, float]:
    """(mean, standard error) of the per-scene difference a − b of `metric` over the scenes both scored."""
    pairs = [(x, y) for x, y in zip(a["per_scene"][metric], b["per_scene"][metric]) if x is not None and y is not None]
    diff = np.array([x - y for x, y in pairs], dtype=np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    return float(diff.mean()), se


class WithoutForegroundContext(torch.nn.Module):
    """A decomposition model whose foreground sequence gets no image-mask context (zeros), as the
    `no_fg_context` ablation was trained (`foreground_context: false`). Everything else is the wrapped model's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, bg_latents, fg_latents, condition, *args, **kwargs):
        condition = condition.clone()
        condition[..., FILL_CONTEXT_CHANNELS : 2 * FILL_CONTEXT_CHANNELS] = 0  # [bg 320 | fg 320 | fused F]
        return self.inner(bg_latents, fg_latents, condition, *args, **kwargs)


def fill_then_extract_row(scenes: list[DecompositionScene], steps: int, seed: int):
    """(foreground, background) of the `fill_then_extract` method on the toy models, or None when the pipeline
    does not offer it (bfs_core/pipelines/decomposition.py `FillThenExtractPipeline`)."""
    from ..pipelines import decomposition as pipelines

    if not hasattr(pipelines, "FillThenExtractPipeline"):
        return None
    from .models import MAX_SEQUENCE_LENGTH, load_toy

    pipe, rgba = load_toy()
    method = pipelines.FillThenExtractPipeline(pipe.model, pipe.codec, rgba, pipe.scheduler_config)
    fgs, bgs = [], []
    for i in range(0, len(scenes), 16):
        chunk = scenes[i : i + 16]
        x = scene_tensors(chunk)
        embeds, pooled = pipe.text_encoders.encode([s.caption for s in chunk], max_sequence_length=MAX_SEQUENCE_LENGTH)
        result = method.decompose(x["composite"], x["mask"], embeds, pooled, seed=seed + i, steps=steps, short_side=0)
        fgs.append(result.foreground)
        bgs.append(result.background)
    return torch.cat(fgs), torch.cat(bgs)


def evaluate(
    scenes: int = 64,
    steps: int = 20,
    seed: int = 0,
    *,
    weights: str | Path | None = None,
    variants: dict[str, Path] | None = None,
    with_fill_then_extract: bool = True,
) -> dict[str, dict[str, float | None]]:
    """Rows {name: metrics} on `scenes` held-out scenes (run `seed`): the shipped model (or each of `variants`),
    the toy Fill baseline, fill_then_extract (when available) and chance (the first model's predictions shuffled)."""
    data = heldout_decomposition_scenes(scenes, seed)
    rows, first = {}, None
    for name, path in (variants or {"ours (toy Outpaint-and-Remove)": weights}).items():  # a None path: shipped
        toy = load_toy_decomposition(weights=path)
        if name.endswith("no_fg_context"):
            toy.pipeline.model = WithoutForegroundContext(toy.model)
        fg, bg = decompose_scenes(toy, data, steps=steps, seed=seed)
        rows[name] = score(data, fg, bg)
        first = first or (fg, bg)
        logger.info("%s: %s", name, rows[name])
    baseline = load_toy_fill_baseline()
    rows["(a) toy Fill inpainting"] = score(data, *decompose_scenes(baseline, data, steps=steps, seed=seed))
    if with_fill_then_extract:
        both = fill_then_extract_row(data, steps, seed)
        if both is not None:
            rows["fill_then_extract"] = score(data, *both)
    rows["(b) chance (shuffled)"] = score(data, *first, shift=1)
    ablations = [k for k in rows if k.startswith("ablation: ")]  # the ablations last, after the table's main rows
    return {**{k: v for k, v in rows.items() if k not in ablations}, **{k: rows[k] for k in ablations}}


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    header = "| method | " + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for name, values in rows.items():
        cells = []
        for m in METRICS:
            v = values.get(m)
            cells.append("–" if v is None or not math.isfinite(v) else (f"{v:.2f}" if m == "bg_psnr" else f"{v:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(rows: dict[str, dict[str, float | None]], ours: str | None = None) -> str:
    """The machine-readable last line: `bg_psnr=… baseline_bg_psnr=… alpha_iou=… chance_alpha_iou=…`."""
    ours = ours or next(iter(rows))
    fill, chance = rows["(a) toy Fill inpainting"], rows["(b) chance (shuffled)"]
    return (
        f"bg_psnr={rows[ours]['bg_psnr']:.2f} baseline_bg_psnr={fill['bg_psnr']:.2f} "
        f"alpha_iou={rows[ours]['alpha_iou']:.3f} chance_alpha_iou={chance['alpha_iou']:.3f}"
    )


def paper_lines() -> str:
    fill, ours = PAPER_TABLE["FLUX.1-Fill-dev"], PAPER_TABLE["Ours (paper)"]
    return (
        f"paper (MULAN test set, background PSNR / SSIM): FLUX.1-Fill-dev {fill[0]:.2f} / {fill[1]:.2f} -> "
        f"Outpaint-and-Remove {ours[0]:.2f} / {ours[1]:.2f}"
    )


def write_decomposition_results(
    variants: dict[str, Path],
    scenes: int = 64,
    steps: int = 20,
    seed: int = 0,
    out: Path = RESULTS,
    note: str = "",
) -> Path:
    """The ablation table (`scripts/train_toy.py --decomposition-ablations`) next to the shipped model's row, with a
    reading against the paper, as `out`.md and `out`.json."""
    named = {"ours (toy Outpaint-and-Remove)": None, **{f"ablation: {k}": v for k, v in variants.items()}}
    rows = evaluate(scenes, steps, seed, variants=named)
    text = "\n\n".join(
        [
            f"`python scripts/train_toy.py --decomposition-ablations` — {scenes} held-out toy scenes (seed {seed}), "
            f"{steps} Euler steps, guidance 30. {note}".strip(),
            format_table(rows),
            paper_lines(),
            "Reading (± is the standard error of the paired per-scene difference: it covers the choice of scenes, not "
            "training randomness — each variant is one training run with seed 0):",
            reading(rows),
            summary_line(rows),
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=2))
    logger.info("decomposition results: %s", out.with_suffix(".md"))
    return out.with_suffix(".md")


def reading(rows: dict[str, dict[str, float | None]]) -> str:
    """Where the toy numbers agree or disagree with the paper, computed from `rows` (no hand-written numbers)."""
    ours, fill = rows[next(iter(rows))], rows["(a) toy Fill inpainting"]
    gain, se = paired_difference(ours, fill, "bg_psnr")
    paper_gain = PAPER_TABLE["Ours (paper)"][0] - PAPER_TABLE["FLUX.1-Fill-dev"][0]
    verdict = "agrees with" if gain > 2 * se else "disagrees with" if gain < -2 * se else "does not settle"
    lines = [
        f"- Removal: the adapted model's background PSNR is {gain:+.2f} ± {se:.2f} dB over its toy Fill base "
        f"({verdict} the paper's {paper_gain:+.2f} dB: the adapted model removes better than its inpainting base)."
    ]
    full = rows.get("ablation: full")
    if full is not None:
        for name, paper in (
            ("no_fusion", "the paper's w/o multi-modal row"),
            ("no_fg_context", "the paper's w/o foreground context row"),
            ("no_joint", "the paper's w/o joint module row"),
        ):
            row = rows.get(f"ablation: {name}")
            if row is None:
                continue
            (d_bg, se_bg), (d_iou, se_iou) = (paired_difference(row, full, m) for m in ("bg_psnr", "alpha_iou"))
            worse = d_bg < -2 * se_bg or d_iou < -2 * se_iou
            better = d_bg > 2 * se_bg or d_iou > 2 * se_iou
            if worse and not better:
                verdict = f"worse, which agrees with {paper}"
            elif better and not worse:
                verdict = f"better, which disagrees with {paper}"
            elif worse and better:
                verdict = f"mixed (one metric better, one worse), so it neither confirms nor refutes {paper}"
            else:
                verdict = f"no difference beyond 2 standard errors, so it neither confirms nor refutes {paper}"
            lines.append(
                f"- {name}: background {d_bg:+.2f} ± {se_bg:.2f} dB, alpha IoU {d_iou:+.3f} ± {se_iou:.3f} (paired "
                f"per-scene difference ± its standard error) against the full recipe at the same budget: {verdict} "
                "(the paper keeps the part because its full model scores better)."
            )
    return "\n".join(lines)


__all__ = ["METRICS", "evaluate", "format_table", "score", "summary_line", "write_decomposition_results"]
