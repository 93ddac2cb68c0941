"""Toy scenes that need decomposition, and the toy Outpaint-and-Remove model trained on them.

A scene is the BFS toy world (`world.py`: sky, ground, sun, shaded objects with shadows) with 1–3 objects, drawn
back to front (an object whose foot is lower stands nearer). With two or more objects the *target* is, in most
scenes, an object that another one partly hides. Ground truth, exact by construction:
    layers[i]         each object's full, unoccluded RGBA layer (object + its shadow, straight alpha);
    clean_background  the empty world; background = the world without the target (the other objects stay);
    foreground        layers[target], also where the occluder hides it (occlusion completion);
    visible_mask      where the target's layer (object + shadow) shows in the composite;
    mask              that mask spoiled as a user draws it (`layer_math.imperfect_mask`: dilated or eroded, shifted);
    segmentation      a toy semantic map (sky, ground and one colour per shape class, on the visible pixels);
    depth             a toy depth map (near = bright: the ground by its row, each object at its foot's depth).
Canny edges come from the composite (`bfs_core.conditioning.canny_edges`, as the pipeline computes them).

Every scene is a function of its seed (`make_decomposition_scene(seed)`); training uses seeds in `TRAIN_SEEDS`,
evaluation seeds in `HELDOUT_SEEDS` (disjoint ranges).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..layer_math import imperfect_mask
from . import world
from .models import WEIGHTS_DIR


logger = logging.getLogger(__name__)

TRAIN_SEEDS = (0, 1_000_000)  # [start, stop): training scenes
HELDOUT_SEEDS = (1_000_000, 2_000_000)  # held-out scenes (evaluation, tests)
SIZE = world.SIZE
VISIBLE_ALPHA = 0.05  # the visible mask: the target's layer shows with at least this alpha
MIN_VISIBLE = 0.35  # an occluded target keeps at least this fraction of its object pixels visible
# Imperfect masks at 64 px (the paper: 16 / 8 / 8 px at 1024²; scaled up so they still change a 12-20 px object):
MASK_DILATE_PX, MASK_ERODE_PX, MASK_JITTER_PX = 3, 1, 2
SEGMENTATION_COLOURS = {
    "sky": (0.10, 0.10, 0.60),
    "ground": (0.40, 0.25, 0.05),
    "cube": (0.90, 0.10, 0.10),
    "ball": (0.10, 0.90, 0.10),
    "cone": (0.95, 0.95, 0.10),
    "pillar": (0.10, 0.90, 0.90),
}
DECOMPOSITION_DIR = WEIGHTS_DIR / "decomposition"
WEIGHTS_NAME = "decomposition.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class DecompositionScene:
    """One toy decomposition sample; images are float32 HWC in [0, 1], masks [H, W]."""

    seed: int
    composite: np.ndarray  # [H, W, 3]
    clean_background: np.ndarray  # [H, W, 3] the world with no object
    layers: list[np.ndarray]  # [H, W, 4] per object, back to front, each complete (unoccluded), straight alpha
    object_alphas: list[np.ndarray]  # [H, W] each object alone (no shadow), complete
    captions: list[str]
    boxes: list[list[int]]
    target: int  # index into layers
    occluded: bool  # another object hides part of the target
    background: np.ndarray  # [H, W, 3] the scene without the target
    visible_mask: np.ndarray  # [H, W] binary: where the target's layer shows
    mask: np.ndarray  # [H, W] binary: visible_mask as a user draws it (imperfect)
    segmentation: np.ndarray  # [H, W, 3]
    depth: np.ndarray  # [H, W, 3]

    @property
    def foreground(self) -> np.ndarray:
        return self.layers[self.target]

    @property
    def object_alpha(self) -> np.ndarray:
        return self.object_alphas[self.target]

    @property
    def caption(self) -> str:
        return self.captions[self.target]

    @property
    def hidden(self) -> np.ndarray:
        """[H, W] bool: the target object's pixels that another object covers (what occlusion completion restores)."""
        return (self.object_alpha > 0.5) & (self.visible_object < 0.5)

    @property
    def visible_object(self) -> np.ndarray:
        above = [a for a in self.object_alphas[self.target + 1 :]]
        cover = np.prod([1 - a for a in above], axis=0) if above else 1.0
        return self.object_alpha * cover


def _object_size(rng: np.random.Generator, shape: str) -> tuple[int, int]:
    w = int(rng.integers(world.BOX_SIDE_RANGE[0], world.BOX_SIDE_RANGE[1] + 1))
    h = int(rng.integers(world.BOX_SIDE_RANGE[0], world.BOX_SIDE_RANGE[1] + 1))
    if shape == "pillar":
        w, h = max(world.PILLAR_WIDTH_RANGE[0], w // 2), min(world.PILLAR_HEIGHT_RANGE[1], h + 6)
    return w, h


def _place_occluder(rng, back: list[int], w: int, h: int, size: int) -> list[int]:
    """A box in front of `back` (its foot 3–8 px lower) overlapping it sideways by 30–70 % of its width."""
    bx0, _, bx1, foot = back
    bw = bx1 - bx0
    foot = min(foot + int(rng.integers(3, 9)), size - 2)
    side = -1 if rng.random() < 0.5 else 1
    shift = int(round(bw * rng.uniform(0.3, 0.7)))
    x0 = bx0 + shift if side > 0 else bx1 - shift - w
    x0 = int(np.clip(x0, 2, size - 2 - w))
    return [x0, foot - h, x0 + w, foot]


def _render_maps(
    objects: list[tuple[str, list[int], np.ndarray]], horizon: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Toy segmentation and depth ([H, W, 3] each) of the composite: `objects` (shape, box, alpha) back to front."""
    rows = (np.arange(size) + 0.5)[:, None] * np.ones((1, size))
    ground = rows >= horizon
    seg = np.where(ground[..., None], SEGMENTATION_COLOURS["ground"], SEGMENTATION_COLOURS["sky"])
    # Depth as a depth model shows it: near = bright; the ground brightens towards the bottom, the sky is far (0).
    near = np.clip((rows - horizon) / (size - horizon), 0, 1)
    depth = np.where(ground, 0.2 + 0.8 * near, 0.0)
    for shape, box, alpha in objects:
        a = alpha[..., None]
        seg = seg * (1 - a) + np.array(SEGMENTATION_COLOURS[shape]) * a
        foot_depth = 0.2 + 0.8 * np.clip((box[3] - horizon) / (size - horizon), 0, 1)
        depth = depth * (1 - alpha) + foot_depth * alpha
    return seg.astype(np.float32), np.repeat(depth[..., None], 3, -1).astype(np.float32)


def _over(layer: np.ndarray, below: np.ndarray) -> np.ndarray:
    a = layer[..., 3:]
    return layer[..., :3] * a + below * (1 - a)


def make_decomposition_scene(seed: int, objects: int | None = None, size: int = SIZE) -> DecompositionScene:
    """The scene of `seed` (deterministic): 1–3 objects (or `objects`), the target partly hidden when possible."""
    rng = np.random.default_rng(seed)
    bg, light = world.make_background(rng, size)
    count = int(objects if objects is not None else rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    if not 1 <= count <= 3:
        raise ValueError(f"`objects` must be 1, 2 or 3 but got {objects!r}.")
    colours = [str(c) for c in rng.choice(list(world.COLOURS), size=count, replace=False)]
    shapes = [world.SHAPES[int(rng.integers(len(world.SHAPES)))] for _ in range(count)]
    sizes = [_object_size(rng, s) for s in shapes]
    # The first object stands far enough back for an occluder to fit in front of it.
    w, h = sizes[0]
    foot = int(rng.integers(light["horizon"] + world.FOOT_ABOVE_HORIZON, size - world.FOOT_MARGIN - 6))
    x0 = int(rng.integers(8, size - 8 - w))
    boxes = [[x0, foot - h, x0 + w, foot]]
    if count >= 2:
        boxes.append(_place_occluder(rng, boxes[0], *sizes[1], size))
    if count == 3:  # anywhere on the ground: it may hide, or be hidden by, the others
        w, h = sizes[2]
        foot = int(rng.integers(light["horizon"] + world.FOOT_ABOVE_HORIZON, size - world.FOOT_MARGIN))
        x0 = int(rng.integers(4, size - 4 - w))
        boxes.append([x0, foot - h, x0 + w, foot])
    rendered = [
        world.make_scene(rng, colour=c, shape=s, background=(bg, light), box=b, size=size)
        for c, s, b in zip(colours, shapes, boxes)
    ]
    order = sorted(range(count), key=lambda i: (boxes[i][3], i))  # back (foot higher up) to front
    layers = [rendered[i].foreground for i in order]
    object_alphas = [rendered[i].object_alpha for i in order]
    captions = [rendered[i].caption for i in order]
    boxes = [boxes[i] for i in order]
    shapes = [shapes[i] for i in order]

    def visible_fraction(t: int) -> float:
        cover = np.prod([1 - a for a in object_alphas[t + 1 :]], axis=0) if t + 1 < count else 1.0
        full = (object_alphas[t] > 0.5).sum()
        return float(((object_alphas[t] * cover) > 0.5).sum() / max(full, 1))

    fractions = [visible_fraction(t) for t in range(count)]
    hidden = [t for t in range(count) if MIN_VISIBLE <= fractions[t] < 0.97]
    if hidden and rng.random() < 0.8:
        target = hidden[int(rng.integers(len(hidden)))]
    else:
        candidates = [t for t in range(count) if fractions[t] >= MIN_VISIBLE] or [count - 1]
        target = candidates[int(rng.integers(len(candidates)))]
    composite = bg
    background = bg
    for i, layer in enumerate(layers):
        composite = _over(layer, composite)
        if i != target:
            background = _over(layer, background)
    cover = np.prod([1 - lay[..., 3] for lay in layers[target + 1 :]], axis=0) if target + 1 < count else 1.0
    visible = (layers[target][..., 3] * cover) > VISIBLE_ALPHA
    spoiled = imperfect_mask(
        torch.from_numpy(visible.astype(np.float32))[None, None],
        torch.Generator().manual_seed(seed),
        MASK_DILATE_PX,
        MASK_ERODE_PX,
        MASK_JITTER_PX,
        probability=1.0,
    )[0, 0].numpy()
    # Segmentation and depth see each object where it shows (object alpha, not its shadow).
    seg, depth = _render_maps(list(zip(shapes, boxes, object_alphas)), light["horizon"], size)
    return DecompositionScene(
        seed=seed,
        composite=composite.astype(np.float32),
        clean_background=bg,
        layers=layers,
        object_alphas=object_alphas,
        captions=captions,
        boxes=boxes,
        target=target,
        occluded=fractions[target] < 0.97,
        background=background.astype(np.float32),
        visible_mask=visible.astype(np.float32),
        mask=spoiled.astype(np.float32),
        segmentation=seg,
        depth=depth,
    )


def heldout_decomposition_scenes(count: int, seed: int = 0) -> list[DecompositionScene]:
    """`count` held-out scenes; `seed` picks another run of them (seeds HELDOUT_SEEDS[0] + seed·count + i)."""
    first = HELDOUT_SEEDS[0] + seed * count
    if seed < 0 or first + count > HELDOUT_SEEDS[1]:
        raise ValueError(f"`seed` {seed} with {count} scenes leaves the held-out seed range {HELDOUT_SEEDS}.")
    return [make_decomposition_scene(first + i) for i in range(count)]


def write_decomposition_dataset(out_dir: str | Path, count: int, first_seed: int = TRAIN_SEEDS[0]) -> Path:
    """A `triplet` dataset with masks (training/README.md) of `count` training scenes, plus the toy maps:
    foreground (complete target layer), background (scene without it), composite, mask (the *clean* visible mask:
    the trainer spoils it on the fly), segmentation, depth, caption, box."""
    from .world import _save

    if first_seed < TRAIN_SEEDS[0] or first_seed + count > TRAIN_SEEDS[1]:
        raise ValueError(f"Training scenes must use seeds in {TRAIN_SEEDS}; got {first_seed}..{first_seed + count}.")
    out = Path(out_dir)
    lines = []
    for i in range(count):
        scene = make_decomposition_scene(first_seed + i)
        name = f"{first_seed + i:07d}"
        entry = {"name": name, "caption": scene.caption, "box": scene.boxes[scene.target]}
        for key in ("foreground", "background", "composite", "mask", "segmentation", "depth"):
            value = scene.visible_mask if key == "mask" else getattr(scene, key)
            entry[key] = f"{key}/{name}.png"
            _save(value, out / entry[key])
        lines.append(json.dumps(entry))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.jsonl", "".join(line + "\n" for line in lines))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The shipped toy decomposition model


@dataclass
class ToyDecomposition:
    """Everything the decomposition pipeline and the Decompose Layers node need for the toy model.

    `pipeline` is ready to call (`pipeline.decompose(image, mask, *encode_prompt("a red cube"), short_side=0)`);
    `model` is the `LayerDecomposition` (or the `FluxFillBaseline`), `codec` the toy Flux VAE as an image codec,
    `rgba_decoder` the toy RGBA VAE (None for the baseline), `text_encoders` the toy CLIP + T5, `scheduler_config`
    the Flux-Fill scheduler's; `paths`: `flux_fill` (diffusers root), `transformer`, `vae`, `rgba_vae`, `weights`.
    """

    pipeline: object
    model: torch.nn.Module
    codec: object
    rgba_decoder: object | None
    text_encoders: object
    scheduler_config: dict
    paths: dict[str, Path]

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [1, 16, 32], pooled [1, 32]) of a toy-vocabulary prompt ("a red cube", ...)."""
        from .models import encode_toy_prompt

        return encode_toy_prompt(self.text_encoders, prompt)


def check_toy_decomposition(weights: str | Path | None = None) -> Path:
    path = Path(weights) if weights is not None else DECOMPOSITION_DIR / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(
            f"The toy decomposition weights {str(path)!r} are missing. Reproduce them with "
            "`python scripts/train_toy.py --decomposition --ship`, or use the committed bfs_core/toy/weights."
        )
    return path


def _load_toy_parts(root: str | Path | None, device, dtype, baseline: bool, weights: str | Path | None):
    from ..models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
    from ..models.layer_decomposition import FluxFillBaseline, apply_decomposition_weights
    from ..models.rgba_vae import load_rgba_decoder
    from ..pipelines.codec import DiffusersFluxVAE
    from ..pipelines.decomposition import DecompositionPipeline
    from ..pipelines.loading import load_flux_vae
    from ..text_encoders import FluxTextEncoders
    from .models import check_toy_weights

    paths = dict(check_toy_weights(root, need_bfs=False))
    paths["transformer"] = paths["flux_fill"] / "transformer"
    transformer = load_flux_fill_transformer(paths["flux_fill"], torch_dtype=dtype, device=device)
    if baseline:
        model, decoder = FluxFillBaseline(transformer), None
    else:
        paths["weights"] = check_toy_decomposition(weights)
        model = apply_decomposition_weights(transformer, paths["weights"]).to(device)
    model.eval()
    vae = load_flux_vae(str(paths["vae"]), dtype=dtype, device=device)
    if not baseline:
        decoder = load_rgba_decoder(str(paths["rgba_vae"]), device=device, dtype=dtype, flux_vae=vae)
    encoders = FluxTextEncoders.from_pretrained(paths["flux_fill"], torch_dtype=dtype, device=device)
    scheduler = load_shipped_config("flux_fill_scheduler")
    shipped = paths["flux_fill"] / "scheduler" / "scheduler_config.json"
    if shipped.is_file():
        scheduler = {**scheduler, **json.loads(shipped.read_text())}
    codec = DiffusersFluxVAE(vae)
    pipeline = DecompositionPipeline(model, codec, decoder, scheduler)
    return ToyDecomposition(pipeline, model, codec, decoder, encoders, scheduler, paths)


def load_toy_decomposition(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    weights: str | Path | None = None,
    root: str | Path | None = None,
) -> ToyDecomposition:
    """The toy Outpaint-and-Remove model: the toy Fill base at `root` (default: the committed bfs_core/toy/weights)
    + the decomposition `weights` (default: the committed DECOMPOSITION_DIR / WEIGHTS_NAME)."""
    return _load_toy_parts(root, device, dtype, baseline=False, weights=weights)


def load_toy_fill_baseline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, root: str | Path | None = None
) -> ToyDecomposition:
    """The plain toy Fill model behind the same pipeline (object removal by inpainting; no foreground layer)."""
    return _load_toy_parts(root, device, dtype, baseline=True, weights=None)


def scene_tensors(scenes: list[DecompositionScene]) -> dict[str, torch.Tensor]:
    """Batched inputs and ground truth of `scenes`: [N, C, H, W] tensors (masks [N, 1, H, W])."""

    def stack(key: str) -> torch.Tensor:
        arrays = [getattr(s, key) for s in scenes]
        t = torch.from_numpy(np.stack(arrays)).float()
        return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]

    keys = ("composite", "mask", "segmentation", "depth", "background", "foreground", "object_alpha", "hidden")
    return {k: stack(k) for k in keys}


@torch.no_grad()
def decompose_scenes(
    toy: ToyDecomposition, scenes: list[DecompositionScene], *, steps: int = 20, seed: int = 0, batch: int = 16
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(foreground RGBA [N, 4, H, W] or None for the baseline, background [N, 3, H, W]) of every scene, from its
    composite, its imperfect mask, its caption and the toy maps (Canny computed by the pipeline)."""
    from .models import MAX_SEQUENCE_LENGTH

    fgs, bgs = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        x = scene_tensors(chunk)
        embeds, pooled = toy.text_encoders.encode([s.caption for s in chunk], max_sequence_length=MAX_SEQUENCE_LENGTH)
        result = toy.pipeline.decompose(
            x["composite"],
            x["mask"],
            embeds,
            pooled,
            segmentation=x["segmentation"],
            depth=x["depth"],
            seed=seed + i,
            steps=steps,
            short_side=0,
        )
        bgs.append(result.background)
        if result.foreground is not None:
            fgs.append(result.foreground)
    return (torch.cat(fgs) if fgs else None), torch.cat(bgs)
