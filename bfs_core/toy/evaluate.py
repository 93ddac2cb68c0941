"""Measure what the toy model learned, on held-out toy scenes with exact ground truth.

Metrics (per scene, then averaged). The object is alpha > 0.75 (shadows are at most 0.6 opaque) inside the box grown
by 2 px; the layer's footprint is the true layer's alpha > 0.01 grown by 3 px (object and shadow, wherever they fall):
- `alpha_iou`: IoU of the generated object inside the box with the true object;
- `colour_acc`: the object's mean colour is nearest (in the palette) to the prompt's colour;
- `shape_acc`: the object's silhouette best matches the prompt's shape (templates fitted to its own box; a rectangle
  taller than 1.75× its width is a pillar);
- `shadow_err_deg`: angle between (object foot -> centroid of the shadow: 0.05 <= alpha <= 0.75 outside the object,
  inside the footprint) and the true direction, which points away from the sun; 90° when no shadow is found;
- `stray_alpha`: mean alpha outside the footprint, where the true layer is empty (stray blobs; 0 is clean);
- `comp_consistency`: mean |C − blend(F, B)| between the composite branch and the foreground layer over the input
  background (eq. 1), pixels in [0, 1];
- `extract_err`: Extract Foreground on the ground-truth composite: mean |premultiplied RGBA − ground truth|.
`chance`: the same metrics with each scene's prediction swapped with another scene's (roll by one), so the number a
model that ignores its inputs would get; `autoencoders' round trip`: the true layers encoded and decoded (the ceiling
of any model working in these latents); `ground truth`: the true layers (the metrics' own ceiling).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..layer_math import dilate_mask
from .world import COLOURS, SHAPES, Scene, make_scene, shape_mask


logger = logging.getLogger(__name__)

METRICS = ("alpha_iou", "colour_acc", "shape_acc", "shadow_err_deg", "stray_alpha", "comp_consistency", "extract_err")
HIGHER_IS_BETTER = {
    "alpha_iou": True,
    "colour_acc": True,
    "shape_acc": True,
    "shadow_err_deg": False,
    "stray_alpha": False,
    "comp_consistency": False,
    "extract_err": False,
}
OBJECT_ALPHA = 0.75


def heldout_scenes(count: int, seed: int = 12345) -> list[Scene]:
    """Held-out scenes: a seed the training data (seed 0, scripts/train_toy.py) never uses."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(count)]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # [N, H, W, C] -> [N, C, H, W]


def box_masks(scenes: list[Scene]) -> torch.Tensor:
    masks = torch.zeros(len(scenes), 1, *scenes[0].background.shape[:2])
    for i, s in enumerate(scenes):
        x0, y0, x1, y1 = s.box
        masks[i, :, y0:y1, x0:x1] = 1
    return masks


@dataclass
class Predictions:
    foreground: torch.Tensor  # [N, 4, H, W] BG2FG layers (straight RGBA)
    composite: torch.Tensor  # [N, 3, H, W] the composite branch
    extracted: torch.Tensor  # [N, 4, H, W] Extract Foreground on the true composites
    transformer_calls: int = 0  # transformer calls made (one per sampling step)
    full_evaluations: int = 0  # calls that ran every block (fewer with step caching)


@torch.no_grad()
def predict(
    pipe, rgba, scenes: list[Scene], *, steps: int = 20, seed: int = 0, batch: int = 16, cache_threshold: float = 0.0
) -> Predictions:
    from .models import MAX_SEQUENCE_LENGTH

    out = {"foreground": [], "composite": [], "extracted": []}
    calls = full = 0
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        bg, comp = to_tensor([s.background for s in chunk]), to_tensor([s.composite for s in chunk])
        mask = box_masks(chunk)
        embeds, pooled = pipe.text_encoders.encode([s.caption for s in chunk], max_sequence_length=MAX_SEQUENCE_LENGTH)
        kwargs = dict(seed=seed + i, steps=steps, guidance=30.0, short_side=0, cache_threshold=cache_threshold)
        gen = pipe.generate(bg, mask, embeds, pooled, **kwargs)
        ext = pipe.extract(comp, bg, mask, embeds, pooled, **kwargs)
        out["foreground"].append(rgba.decode(gen.fg_latent))
        out["composite"].append(gen.composite)
        out["extracted"].append(rgba.decode(ext.fg_latent))
        calls += gen.transformer_calls + ext.transformer_calls
        full += gen.full_evaluations + ext.full_evaluations
    tensors = {k: torch.cat(v) for k, v in out.items()}
    return Predictions(**tensors, transformer_calls=calls, full_evaluations=full)


def ground_truth(scenes: list[Scene]) -> Predictions:
    fg = to_tensor([s.foreground for s in scenes])
    return Predictions(foreground=fg, composite=to_tensor([s.composite for s in scenes]), extracted=fg)


def _bbox(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def classify_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names])
    # Compare chromaticity and brightness separately-ish: shading scales colours by 0.65..1.05.
    dist = [np.abs(rgb / max(rgb.max(), 1e-3) - p / p.max()).sum() + 0.5 * abs(rgb.mean() - p.mean()) for p in palette]
    return names[int(np.argmin(dist))]


def classify_shape(obj: np.ndarray) -> str | None:
    box = _bbox(obj)
    if box is None:
        return None
    size = obj.shape[0]
    scores = {s: _iou(obj, shape_mask(s, box, size) > 0.5) for s in ("cube", "ball", "cone")}
    best = max(scores, key=scores.get)
    if best == "cube" and (box[3] - box[1]) > 1.75 * (box[2] - box[0]):
        return "pillar"
    return best


def _box_region(box: list[int], shape: tuple[int, int], margin: int) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    region[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = True
    return region


def shadow_direction(
    alpha: np.ndarray, obj: np.ndarray, region: np.ndarray | None = None
) -> tuple[float, float] | None:
    box = _bbox(obj)
    if box is None:
        return None
    dil = obj.copy()
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        dil |= np.roll(obj, (dy, dx), axis=(0, 1))
    weight = np.where((alpha >= 0.05) & (alpha <= OBJECT_ALPHA) & ~dil, alpha, 0.0)
    if region is not None:
        weight = weight * region
    if weight.sum() < 1.0:
        return None
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    vx = (weight * xs).sum() / weight.sum() - (box[0] + box[2]) / 2
    vy = (weight * ys).sum() / weight.sum() - box[3]
    norm = math.hypot(vx, vy)
    return (vx / norm, vy / norm) if norm > 1e-6 else None


def scene_metrics(scene: Scene, fg: np.ndarray, comp: np.ndarray, extracted: np.ndarray) -> dict[str, float]:
    """Metrics of one scene; `fg`, `extracted` [H, W, 4] straight RGBA and `comp` [H, W, 3], numpy in [0, 1]."""
    alpha = fg[..., 3]
    obj = (alpha > OBJECT_ALPHA) & _box_region(scene.box, alpha.shape, 2)
    true_obj = scene.object_alpha > 0.5
    footprint = dilate_mask(torch.from_numpy(scene.foreground[..., 3] > 0.01), 3).numpy()
    colour = classify_colour(fg[obj][:, :3].mean(0)) if obj.any() else None
    direction = shadow_direction(alpha, obj, footprint)
    if direction is None:
        shadow_err = 90.0
    else:
        cos = float(np.clip(direction[0] * scene.shadow_dir[0] + direction[1] * scene.shadow_dir[1], -1, 1))
        shadow_err = math.degrees(math.acos(cos))
    blend = fg[..., :3] * alpha[..., None] + scene.background * (1 - alpha[..., None])
    premul = np.concatenate([extracted[..., :3] * extracted[..., 3:], extracted[..., 3:]], -1)
    true_fg = scene.foreground
    true_premul = np.concatenate([true_fg[..., :3] * true_fg[..., 3:], true_fg[..., 3:]], -1)
    return {
        "alpha_iou": _iou(obj, true_obj),
        "colour_acc": float(colour == scene.colour),
        "shape_acc": float(classify_shape(obj) == scene.shape),
        "shadow_err_deg": shadow_err,
        "stray_alpha": float(alpha[~footprint].mean()) if (~footprint).any() else 0.0,
        "comp_consistency": float(np.abs(comp - blend).mean()),
        "extract_err": float(np.abs(premul - true_premul).mean()),
    }


def score(scenes: list[Scene], preds: Predictions, shift: int = 0) -> dict[str, float]:
    """Mean metrics; `shift` > 0 pairs scene i with prediction i + shift (the chance baseline)."""

    def np_img(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()  # [N, C, H, W] -> [N, H, W, C]

    fg, comp, ext = np_img(preds.foreground), np_img(preds.composite), np_img(preds.extracted)
    n = len(scenes)
    rows = [scene_metrics(scenes[i], fg[(i + shift) % n], comp[i], ext[(i + shift) % n]) for i in range(n)]
    if shift:  # chance for consistency: the composite against another scene's layer over this background
        for i, row in enumerate(rows):
            j = (i + shift) % n
            a = fg[j][..., 3:]
            blend = fg[j][..., :3] * a + scenes[i].background * (1 - a)
            row["comp_consistency"] = float(np.abs(comp[i] - blend).mean())
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = "| model | " + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for name, values in rows.items():
        cells = [f"{values[m]:.1f}" if m == "shadow_err_deg" else f"{values[m]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(pipe, rgba, count: int = 32, steps: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"model": ..., "chance": ..., "ground truth": ...} over `count` held-out scenes."""
    scenes = heldout_scenes(count)
    preds = predict(pipe, rgba, scenes, steps=steps, seed=seed)
    return {
        "model": score(scenes, preds),
        "chance": score(scenes, preds, shift=1),
        "ground truth": score(scenes, ground_truth(scenes)),
    }


def sweep(
    weights: str | None, settings: list[tuple[int, float]], count: int = 64, seed: int = 0
) -> dict[str, dict[str, float]]:
    """One row per (steps, cache_threshold): every toy metric plus the transformer evaluations it took, against
    the exact model at the same steps. For the step-caching trade and the steps-vs-quality curve."""
    from .models import load_toy

    scenes = heldout_scenes(count)
    pipe, rgba = load_toy(weights)
    rows = {}
    for steps, threshold in settings:
        preds = predict(pipe, rgba, scenes, steps=steps, seed=seed, cache_threshold=threshold)
        row = score(scenes, preds)
        row["full_evals"] = preds.full_evaluations
        row["calls"] = preds.transformer_calls
        rows[f"steps {steps}, cache {threshold:g}"] = row
        logger.info("steps %d cache %g: %s", steps, threshold, row)
    return rows


def format_sweep(rows: dict[str, dict[str, float]]) -> str:
    header = "| setting | evals (of calls) | speed-up | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    for name, values in rows.items():
        cells = [f"{values[m]:.1f}" if m == "shadow_err_deg" else f"{values[m]:.3f}" for m in METRICS]
        speed = values["calls"] / max(values["full_evals"], 1)
        lines.append(
            f"| {name} | {values['full_evals']} ({values['calls']}) | {speed:.2f}x | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


__all__ = [
    "METRICS",
    "SHAPES",
    "evaluate",
    "format_sweep",
    "format_table",
    "heldout_scenes",
    "predict",
    "score",
    "sweep",
]


def evaluate_variants(
    weights: str | None,
    variants: dict[str, str],
    count: int = 64,
    steps: int = 20,
    seed: int = 0,
    cache_threshold: float = 0.0,
    evals: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """The shipped model (or each variant's BFS weights on the same base), then chance and ground truth.

    `evals`, when given, receives the transformer calls made (`exact_evals`) and the full evaluations among them
    (`transformer_evals`; fewer with `cache_threshold` > 0).
    """
    from .models import load_toy

    scenes = heldout_scenes(count)
    rows, first = {}, None
    for name, bfs in ({"model": None} if not variants else variants).items():
        pipe, rgba = load_toy(weights, bfs=bfs)
        preds = predict(pipe, rgba, scenes, steps=steps, seed=seed, cache_threshold=cache_threshold)
        rows[name] = score(scenes, preds)
        if evals is not None:
            evals["exact_evals"] = evals.get("exact_evals", 0) + preds.transformer_calls
            evals["transformer_evals"] = evals.get("transformer_evals", 0) + preds.full_evaluations
        first = first or preds
        logger.info("%s: %s", name, rows[name])
    rows["chance (shuffled)"] = score(scenes, first, shift=1)
    rows["autoencoders' round trip"] = score(scenes, round_trip(pipe, rgba, scenes))
    rows["ground truth"] = score(scenes, ground_truth(scenes))
    return rows


@torch.no_grad()
def round_trip(pipe, rgba, scenes: list[Scene]) -> Predictions:
    """The true layers through the autoencoders (encode, decode): the ceiling any model on these latents can reach."""
    gt = ground_truth(scenes)
    fg = rgba.decode(rgba.encode(gt.foreground))
    comp = pipe.decode_latents(pipe.encode_images(gt.composite))
    return Predictions(foreground=fg, composite=comp, extracted=fg)


# ---------------------------------------------------------------------------------------------------------------------
# Reference-guided layers (bfs_core/toy/reference.py): a picture of the object instead of, or beside, the caption

REFERENCE_METRICS = ("alpha_iou", "colour_acc", "shape_acc", "shadow_err_deg", "stray_alpha")
REFERENCE_SEED = 54321  # reference renders: neither the reference encoder's training seed (1000) nor the scenes'


def contradicting(scene: Scene) -> Scene:
    """The same scene labelled with another colour and another shape (the next in each list): a caption that
    contradicts the reference on both."""
    import dataclasses

    colours = list(COLOURS)
    colour = colours[(colours.index(scene.colour) + 1) % len(colours)]
    shape = SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)]
    return dataclasses.replace(scene, colour=colour, shape=shape)


@torch.no_grad()
def predict_conditioned(
    pipe, rgba, scenes: list[Scene], condition, *, steps: int = 20, seed: int = 0, batch: int = 16
):
    """BG2FG layers with `condition(chunk) -> (prompt_embeds, pooled)` as the text conditioning (no extraction)."""
    layers, comps = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        embeds, pooled = condition(chunk)
        bg = to_tensor([s.background for s in chunk])
        gen = pipe.generate(bg, box_masks(chunk), embeds, pooled, seed=seed + i, steps=steps, short_side=0)
        layers.append(rgba.decode(gen.fg_latent))
        comps.append(gen.composite)
    fg = torch.cat(layers)
    return Predictions(foreground=fg, composite=torch.cat(comps), extracted=fg)


def evaluate_reference(
    weights: str | None = None,
    reference_weights: str | None = None,
    count: int = 64,
    steps: int = 20,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Rows of REFERENCE_METRICS on `count` held-out scenes, each with a reference render of its own object (another
    scene: background, sun, box). The pooled vector is the neutral prompt's except where a caption is given.

    - `caption`: the toy model with the scene's caption (what a reference should approach);
    - `neutral prompt only`: "an object", no reference (what the model does without being told);
    - `reference, replace` / `reference, append`: the reference tokens replacing the neutral caption's tokens (the
      paper) / after them (StyleModelApply, the toy workflow);
    - `reference + contradicting caption` (append, the caption's pooled vector): scored against the reference's
      object, and (`... scored against the caption`) against the caption's;
    - `chance (shuffled)`: the append rows with each scene's layer swapped with another scene's.
    """
    import numpy as np

    from ..conditioning import ReferenceMode, join_reference
    from .models import MAX_SEQUENCE_LENGTH, NEUTRAL_PROMPT, load_toy
    from .reference import load_toy_reference, reference_scene

    scenes = heldout_scenes(count)
    rng = np.random.default_rng(REFERENCE_SEED)
    references = to_tensor([reference_scene(rng, s.colour, s.shape).composite for s in scenes])
    pipe, rgba = load_toy(weights)
    encoder = load_toy_reference(reference_weights)
    tokens = encoder(references)  # [N, 16, 32]
    index = {id(s): i for i, s in enumerate(scenes)}

    def encode(captions: list[str]):
        return pipe.text_encoders.encode(captions, max_sequence_length=MAX_SEQUENCE_LENGTH)

    neutral_embeds, neutral_pooled = encode([NEUTRAL_PROMPT])

    def with_reference(mode: ReferenceMode, captions=None):
        def condition(chunk):
            ref = tokens[[index[id(s)] for s in chunk]]
            if captions is None:
                embeds, pooled = neutral_embeds.expand(len(chunk), -1, -1), neutral_pooled.expand(len(chunk), -1)
            else:
                embeds, pooled = encode([captions(s) for s in chunk])
            return join_reference(embeds, ref, mode), pooled

        return condition

    def caption_only(chunk):
        return encode([s.caption for s in chunk])

    def neutral_only(chunk):
        return neutral_embeds.expand(len(chunk), -1, -1), neutral_pooled.expand(len(chunk), -1)

    run = dict(steps=steps, seed=seed)
    rows = {}
    rows["caption"] = score(scenes, predict_conditioned(pipe, rgba, scenes, caption_only, **run))
    rows["neutral prompt only"] = score(scenes, predict_conditioned(pipe, rgba, scenes, neutral_only, **run))
    replace = predict_conditioned(pipe, rgba, scenes, with_reference(ReferenceMode.REPLACE), **run)
    rows["reference, replace"] = score(scenes, replace)
    append = predict_conditioned(pipe, rgba, scenes, with_reference(ReferenceMode.APPEND), **run)
    rows["reference, append"] = score(scenes, append)
    contra = with_reference(ReferenceMode.APPEND, captions=lambda s: contradicting(s).caption)
    contra_preds = predict_conditioned(pipe, rgba, scenes, contra, **run)
    rows["reference + contradicting caption"] = score(scenes, contra_preds)
    rows["... scored against the caption"] = score([contradicting(s) for s in scenes], contra_preds)
    rows["chance (shuffled)"] = score(scenes, append, shift=1)
    for name, row in rows.items():
        logger.info("%s: %s", name, row)
    return {name: {m: row[m] for m in REFERENCE_METRICS} for name, row in rows.items()}


def format_reference_table(rows: dict[str, dict[str, float]]) -> str:
    header = "| conditioning | " + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in REFERENCE_METRICS)
    lines = [header + " |", "|" + "---|" * (len(REFERENCE_METRICS) + 1)]
    for name, values in rows.items():
        cells = [f"{values[m]:.1f}" if m == "shadow_err_deg" else f"{values[m]:.3f}" for m in REFERENCE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
