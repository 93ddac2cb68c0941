"""Render a template-browser thumbnail for every example workflow: `workflows/<name>.jpg` beside `<name>.json`.

ComfyUI's template browser lists each custom node pack's example workflows and shows `<name>.jpg` from the same
folder as the card's image (the frontend asks for `.jpg` only). Every thumbnail is a 2 × 2 grid of 128-pixel tiles
rendered from runs of the embedded toy model (CPU, a few seconds in all), chosen by what the workflow does:

- BG2FG (text, Redux reference, LayerDiffuse decoder): background with the box | the RGBA layer (checkerboard =
  transparent) | the layer over the background | its alpha. The reference variant shows, in place of the alpha, the
  toy world's rendering of the object the layer is prompted with (the reference image such a graph is given).
- Several chained BG2FG samplers: the background, then the scene after each added layer.
- Extract Foreground: composite | background | the extracted layer | its alpha.
- Decompose Layers: image | object mask | object layer | background without the object. The workflow needs weights
  nobody has published; its thumbnail shows the same inputs and outputs made by the toy BFS model (the object
  generated over a toy background, then extracted from the composite), not by a decomposition model.

Usage: `python scripts/make_thumbnails.py [--only NAME ...] [--check]` (`--check`: list what would be rendered).
Re-run it after adding a workflow; a workflow of a kind not listed above is refused by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bfs_core.atomic import atomic_path  # noqa: E402
from bfs_core.layer_math import alpha_blend  # noqa: E402


WORKFLOWS = REPO / "workflows"
TILE = 128  # 2 × 2 tiles: a square card of 256 px, as the template browser shows them
QUALITY = 82
STEPS = 20
KINDS = ("decompose", "extract", "chain", "reference", "bg2fg")


def kind_of(workflow: dict) -> str:
    """What a workflow does, from its node types (the first match of KINDS' order)."""
    types = [node.get("type") for node in workflow.get("nodes", [])]
    samplers = types.count("BFSBG2FGSample")
    if "BFSDecomposeLayers" in types:
        return "decompose"
    if "BFSExtractForeground" in types:
        return "extract"
    if samplers > 1:
        return "chain"
    if samplers == 1 and "StyleModelApply" in types:
        return "reference"
    if samplers == 1:
        return "bg2fg"
    raise ValueError(f"No thumbnail recipe for a workflow with nodes {sorted(set(types))}: add one to {__file__}.")


def _tile(image: torch.Tensor, box: list[int] | None = None) -> Image.Image:
    """[C, 64, 64] in [0, 1] (RGBA over a checkerboard, 1 channel as grey) -> a TILE × TILE PIL tile."""
    if image.shape[0] == 4:
        ys, xs = torch.meshgrid(torch.arange(image.shape[1]), torch.arange(image.shape[2]), indexing="ij")
        board = (((ys // 4 + xs // 4) % 2).float() * 0.35 + 0.55).expand(3, -1, -1)
        image = image[:3] * image[3:] + board * (1 - image[3:])
    elif image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [C, H, W] -> [H, W, C]
    tile = Image.fromarray(array).resize((TILE, TILE), Image.NEAREST)
    if box is not None:
        scale = TILE / image.shape[-1]
        ImageDraw.Draw(tile).rectangle(
            [v * scale for v in box[:2]] + [v * scale - 1 for v in box[2:]], outline=(255, 230, 0), width=2
        )
    return tile


def _grid(tiles: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (2 * TILE, 2 * TILE))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % 2) * TILE, (k // 2) * TILE))
    return sheet


class ToyRuns:
    """The toy model, loaded once, and the few runs the thumbnails are made of."""

    def __init__(self):
        from bfs_core.toy.models import load_toy

        self.pipe, self.rgba = load_toy()

    @staticmethod
    def _mask(box: list[int], size: int = 64) -> torch.Tensor:
        mask = torch.zeros(1, 1, size, size)
        mask[..., box[1] : box[3], box[0] : box[2]] = 1
        return mask

    def _embed(self, prompt: str):
        from bfs_core.toy.models import encode_toy_prompt

        return encode_toy_prompt(self.pipe.text_encoders, prompt)

    @torch.no_grad()
    def bg2fg(self, background: torch.Tensor, prompt: str, box: list[int], seed: int = 0) -> torch.Tensor:
        """The RGBA layer [1, 4, 64, 64] BG2FG makes for `prompt` in `box`."""
        embeds, pooled = self._embed(prompt)
        result = self.pipe.generate(background, self._mask(box), embeds, pooled, seed=seed, steps=STEPS, short_side=0)
        return self.rgba.decode(result.fg_latent).float()

    @torch.no_grad()
    def extract(self, composite: torch.Tensor, background: torch.Tensor, prompt: str, box: list[int]):
        embeds, pooled = self._embed(prompt)
        result = self.pipe.extract(
            composite, background, self._mask(box), embeds, pooled, seed=0, steps=STEPS, short_side=0
        )
        return self.rgba.decode(result.fg_latent).float()

    def render(self, kind: str, variant: int = 0) -> Image.Image:
        """The thumbnail of a workflow of `kind`; `variant` (the how-many-th of its kind) picks the toy scene."""
        from bfs_core.toy.demo import SCENES, background_image

        bg_seed, items = SCENES[variant % len(SCENES)]  # the demo's scenes: boxes that stand on each one's ground
        bg = background_image(bg_seed)  # [1, 3, 64, 64]
        if kind == "chain":
            scene, tiles = bg, [_tile(bg[0])]
            for k, (prompt, box) in enumerate(items[:3]):
                layer = self.bg2fg(scene, prompt, box, seed=10 + k)
                scene = alpha_blend(layer[:, :3], layer[:, 3:], scene)
                tiles.append(_tile(scene[0]))
            return _grid(tiles)
        prompt, box = items[variant // len(SCENES) % len(items)]
        layer = self.bg2fg(bg, prompt, box)
        composite = alpha_blend(layer[:, :3], layer[:, 3:], bg)
        if kind == "bg2fg":
            return _grid([_tile(bg[0], box), _tile(layer[0]), _tile(composite[0]), _tile(layer[0, 3:])])
        if kind == "reference":
            return _grid([_tile(self._reference(prompt)), _tile(bg[0], box), _tile(layer[0]), _tile(composite[0])])
        extracted = self.extract(composite, bg, prompt, box)
        if kind == "extract":
            return _grid([_tile(composite[0], box), _tile(bg[0]), _tile(extracted[0]), _tile(extracted[0, 3:])])
        if kind == "decompose":
            return _grid([_tile(composite[0]), _tile(self._mask(box)[0]), _tile(extracted[0]), _tile(bg[0])])
        raise ValueError(f"unknown thumbnail kind {kind!r}; one of {KINDS}")

    @staticmethod
    def _reference(prompt: str) -> torch.Tensor:
        """The toy world's own rendering of `prompt`'s object, large on a grey backdrop: a reference image."""
        from bfs_core.toy.world import render_object

        _, colour, shape = prompt.split()
        rgb, alpha = render_object(colour, shape, [12, 12, 52, 52], sun_dx=1)
        image = rgb * alpha[..., None] + 0.5 * (1 - alpha[..., None])
        return torch.from_numpy(image).permute(2, 0, 1).float()  # [H, W, 3] -> [3, H, W]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="workflow names (stems) to render; default: all")
    parser.add_argument("--check", action="store_true", help="print each workflow's kind and render nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    every = sorted(WORKFLOWS.glob("*.json"))
    kinds = {p: kind_of(json.loads(p.read_text())) for p in every}
    paths = every
    if args.only:
        unknown = set(args.only) - {p.stem for p in every}
        if unknown:
            parser.error(f"no workflows/{sorted(unknown)[0]}.json; known: {', '.join(p.stem for p in every)}")
        paths = [p for p in every if p.stem in args.only]
    if args.check:
        for path in paths:
            print(f"{path.stem}: {kinds[path]}")
        return 0
    runs = ToyRuns()
    for path in paths:
        variant = [kinds[p] for p in every if p < path].count(kinds[path])  # the same kind: another toy scene
        image = runs.render(kinds[path], variant)
        target = path.with_suffix(".jpg")
        with atomic_path(target) as tmp:
            image.save(tmp, format="JPEG", quality=QUALITY, optimize=True)
        print(f"{target.relative_to(REPO)}: {kinds[path]}, {target.stat().st_size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
