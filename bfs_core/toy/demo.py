"""The toy demo: the pack's main job on the embedded toy model, end to end on a CPU in seconds.

Several toy backgrounds (sun on the left or the right) -> BG2FG with different prompts in boxes -> straight-alpha RGBA
layers with shadows -> a three-layer scene by chaining (each new object is generated over the scene so far) -> PSD
and ORA files of that scene, every layer as a PNG, and `contact_sheet.png`, a labelled grid a person can look at.
Its last row decomposes a held-out toy composite (an object partly hidden by another, a rough mask) into the object's
layer and the clean background, by both methods: the toy Outpaint-and-Remove model and fill_then_extract (the BFS toy
model's Fill base removes the object, BFS extraction pulls it out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_path
from ..layer_math import alpha_blend
from ..layered_files import write_layered_file
from .models import MAX_SEQUENCE_LENGTH, load_toy
from .world import make_background


logger = logging.getLogger(__name__)

# (background seed, [(prompt, box), ...]): boxes [x0, y0, x1, y1] on the 64 × 64 canvas, standing on the ground.
SCENES = [
    (3, [("a red cube", [14, 34, 30, 50]), ("a blue ball", [36, 38, 52, 54]), ("a yellow cone", [24, 40, 40, 56])]),
    (
        7,
        [
            ("a green ball", [12, 38, 28, 54]),
            ("a purple pillar", [40, 28, 49, 52]),
            ("a white cube", [26, 42, 42, 58]),
        ],
    ),
    (11, [("a yellow cone", [34, 36, 50, 52]), ("a red ball", [14, 40, 30, 56]), ("a blue pillar", [28, 30, 37, 54])]),
]
CHAIN = (3, [("a red cube", [10, 38, 26, 54]), ("a blue ball", [38, 40, 54, 56])])
DECOMPOSITION_SCENE = 7  # held-out toy decomposition scene (the Toy Decomposition Scene node's default)
FILL_DILATION_PX = 2  # fill_then_extract's mask growth at 64 px
SCALE = 4


@dataclass
class DemoResult:
    contact_sheet: Path
    psd: Path
    ora: Path
    seconds: float
    decomposition: dict[str, Path] | None = None  # method -> PSD (background + object layer)


def background_image(seed: int) -> torch.Tensor:
    """The toy background of `seed` as [1, 3, 64, 64] in [0, 1] (the Toy Background node's image)."""
    bg, _ = make_background(np.random.default_rng(seed))
    return torch.from_numpy(bg).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]


def _mask(box: list[int], size: int = 64) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    x0, y0, x1, y1 = box
    m[..., y0:y1, x0:x1] = 1
    return m


@torch.no_grad()
def bg2fg(pipe, rgba, background: torch.Tensor, prompt: str, box: list[int], *, steps: int, seed: int):
    """One BG2FG call: (RGBA layer [1, 4, H, W], composite branch [1, 3, H, W])."""
    embeds, pooled = pipe.text_encoders.encode([prompt], max_sequence_length=MAX_SEQUENCE_LENGTH)
    result = pipe.generate(
        background, _mask(box, background.shape[-1]), embeds, pooled, seed=seed, steps=steps, short_side=0
    )
    return rgba.decode(result.fg_latent), result.composite


def _tile(image: torch.Tensor, box: list[int] | None = None, label: str = "") -> Image.Image:
    """[C, H, W] in [0, 1] (RGBA over a checkerboard) -> an upscaled labelled PIL tile."""
    if image.shape[0] == 4:
        ys, xs = torch.meshgrid(torch.arange(image.shape[1]), torch.arange(image.shape[2]), indexing="ij")
        board = (((ys // 4 + xs // 4) % 2).float() * 0.35 + 0.55).expand(3, -1, -1)
        image = image[:3] * image[3:] + board * (1 - image[3:])
    elif image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [C, H, W] -> [H, W, C]
    tile = Image.fromarray(array).resize((array.shape[1] * SCALE, array.shape[0] * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(tile)
    if box is not None:
        draw.rectangle([v * SCALE for v in box[:2]] + [v * SCALE - 1 for v in box[2:]], outline=(255, 230, 0))
    if label:
        draw.rectangle([0, 0, tile.width, 11], fill=(0, 0, 0))
        draw.text((2, 0), label, fill=(255, 255, 255))
    return tile


def _sheet(rows: list[list[Image.Image]], title: str) -> Image.Image:
    tw, th = rows[0][0].size
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (tw + 4) + 4, len(rows) * (th + 4) + 24), (40, 40, 40))
    ImageDraw.Draw(sheet).text((4, 5), title, fill=(255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (4 + c * (tw + 4), 24 + r * (th + 4)))
    return sheet


def run_demo(out_dir: str | Path, *, weights: str | Path | None = None, steps: int = 20, seed: int = 0) -> DemoResult:
    start = time.time()
    out = Path(out_dir)
    (out / "layers").mkdir(parents=True, exist_ok=True)
    pipe, rgba = load_toy(weights)
    rows = []
    for bg_seed, items in SCENES:
        bg = background_image(bg_seed)
        row = [_tile(bg[0], label=f"background {bg_seed}")]
        for k, (prompt, box) in enumerate(items):
            layer, _ = bg2fg(pipe, rgba, bg, prompt, box, steps=steps, seed=seed + k)
            comp = alpha_blend(layer[:, :3], layer[:, 3:], bg)
            name = f"bg{bg_seed}_{prompt.replace(' ', '_')}"
            _save_rgba(layer[0], out / "layers" / f"{name}.png")
            row += [_tile(layer[0], box, prompt), _tile(comp[0], box, "composite")]
        rows.append(row)

    # Chaining: every new layer is generated over the scene so far; the file keeps the layers separate.
    bg_seed, items = CHAIN
    scene = bg = background_image(bg_seed)
    layers, chain_row = [], [_tile(bg[0], label="chain: background")]
    for k, (prompt, box) in enumerate(items):
        layer, _ = bg2fg(pipe, rgba, scene, prompt, box, steps=steps, seed=seed + 10 + k)
        scene = alpha_blend(layer[:, :3], layer[:, 3:], scene)
        layers.append((prompt, _to_pil(layer[0])))
        chain_row += [_tile(layer[0], box, f"layer {k + 1}: {prompt}"), _tile(scene[0], box, f"scene, {k + 2} layers")]
    rows.append(chain_row)
    decomposition_row, decomposition = _decomposition_row(pipe, rgba, out, steps=steps, seed=seed)
    rows.append(decomposition_row)
    psd = write_layered_file(out / "scene.psd", _to_pil(bg[0]), layers)
    ora = write_layered_file(out / "scene.ora", _to_pil(bg[0]), layers)
    _save_rgba(scene[0], out / "scene.png")
    sheet = out / "contact_sheet.png"
    title = (
        "BFS toy demo: background | per prompt: RGBA layer (checkerboard = transparent, yellow = box) | "
        "layer over background.  Row 4: a three-layer scene by chaining.  Row 5: decomposing a composite."
    )
    with atomic_path(sheet) as tmp:
        _sheet(rows, title).save(tmp)
    seconds = time.time() - start
    logger.info("toy demo written to %s in %.1f s", out, seconds)
    return DemoResult(contact_sheet=sheet, psd=psd, ora=ora, seconds=seconds, decomposition=decomposition)


@torch.no_grad()
def decompose_demo_scene(pipe, rgba, *, steps: int, seed: int) -> tuple[object, dict[str, object]]:
    """The demo's held-out decomposition scene and {method: DecompositionResult} by both methods (toy models)."""
    from ..pipelines.decomposition import FillThenExtractPipeline
    from .decomposition import HELDOUT_SEEDS, load_toy_decomposition, make_decomposition_scene

    scene = make_decomposition_scene(HELDOUT_SEEDS[0] + DECOMPOSITION_SCENE)
    image = torch.from_numpy(scene.composite).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]
    mask = torch.from_numpy(scene.mask)[None, None].float()
    maps = {k: torch.from_numpy(getattr(scene, k)).permute(2, 0, 1)[None].float() for k in ("segmentation", "depth")}
    toy = load_toy_decomposition()
    results = {
        "outpaint_and_remove": toy.pipeline.decompose(
            image, mask, *toy.encode_prompt(scene.caption), **maps, seed=seed, steps=steps, short_side=0
        )
    }
    embeds, pooled = pipe.text_encoders.encode([scene.caption], max_sequence_length=MAX_SEQUENCE_LENGTH)
    results["fill_then_extract"] = FillThenExtractPipeline(
        pipe.model, pipe.codec, rgba, pipe.scheduler_config
    ).decompose(image, mask, embeds, pooled, dilation=FILL_DILATION_PX, seed=seed, steps=steps, short_side=0)
    return scene, results


def _decomposition_row(pipe, rgba, out: Path, *, steps: int, seed: int) -> tuple[list[Image.Image], dict[str, Path]]:
    scene, results = decompose_demo_scene(pipe, rgba, steps=steps, seed=seed)
    image = torch.from_numpy(scene.composite).permute(2, 0, 1).float()  # [H, W, 3] -> [3, H, W]
    row = [_tile(image, label=f"decompose: {scene.caption}"), _tile(torch.from_numpy(scene.mask)[None], label="mask")]
    files = {}
    for method, result in results.items():
        short = "O&R" if method == "outpaint_and_remove" else "fill+extract"
        row += [
            _tile(result.foreground[0], label=f"{short}: object"),
            _tile(result.background[0], label=f"{short}: bg"),
        ]
        _save_rgba(result.foreground[0], out / "layers" / f"decomposed_{method}_object.png")
        files[method] = write_layered_file(
            out / f"decomposed_{method}.psd",
            _to_pil(result.background[0]),
            [("object", _to_pil(result.foreground[0]))],
        )
    return row, files


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [C, H, W] -> [H, W, C]
    return Image.fromarray(array)


def _save_rgba(image: torch.Tensor, path: Path) -> None:
    with atomic_path(path) as tmp:
        _to_pil(image).save(tmp)
