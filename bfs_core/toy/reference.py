"""The toy reference encoder: a picture of the object instead of (or beside) a caption, as the paper's §5 (Fig. 6a)
does with Flux Redux.

Two nets mirror the real pair, so the pack's nodes hand them to ComfyUI's own CLIPVisionEncode and StyleModelApply:
- `ToyVisionEncoder` (the SigLIP stand-in): a 64×64 RGB image -> `last_hidden_state` [B, 16, 64], one token per
  16×16 patch (4×4 grid) plus the image's global feature, like a vision transformer's patch tokens;
- `ToyReduxProjection` (the Redux stand-in): the same two Linears as ComfyUI's `ReduxImageEncoder`
  (`redux_down(silu(redux_up(x)))`, 64 -> 3·32 -> 32), mapping each patch token into the toy text space
  (T5 width 32), so the tokens join or replace the caption's 16 tokens in CONDITIONING.

A reference image is a render of the target object in another scene: another background, sun, box size and place
(`reference_scene`). Training (`training/train_toy_reference.py`) keeps the toy BFS frozen and fits both nets with the
flow loss on toy composites, the reference replacing the caption (paper) or appended to a neutral caption
(StyleModelApply); the shipped weights are `bfs_core/toy/weights/reference/{vision,redux}/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..atomic import atomic_dir
from .models import NEUTRAL_PROMPT, WEIGHTS_DIR
from .world import SIZE, Scene, make_background, make_scene


logger = logging.getLogger(__name__)

REFERENCE_DIR = WEIGHTS_DIR / "reference"


def reference_scene(rng: np.random.Generator, colour: str, shape: str) -> Scene:
    """The object `colour` `shape` in a scene of its own: a fresh background and sun, a random box size and place."""
    return make_scene(rng, colour=colour, shape=shape, background=make_background(rng))


def reference_image(colour: str, shape: str, seed: int = 0) -> torch.Tensor:
    """A reference picture of `colour` `shape` (its composite) as [1, 3, 64, 64] in [0, 1]."""
    scene = reference_scene(np.random.default_rng(seed), colour, shape)
    return torch.from_numpy(scene.composite).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]


def preprocess(images: torch.Tensor, crop: bool = True) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, 64, 64] in [-1, 1]: `crop` takes the centre square first (as ComfyUI's
    `clip_preprocess` with crop=True); otherwise the whole image is resized (squashed) to 64×64."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"The reference image must be [batch, 3, height, width] but got {list(images.shape)}.")
    h, w = images.shape[-2:]
    if crop and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top : top + side, left : left + side]
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return images.float().clamp(0, 1) * 2 - 1


class ToyVisionEncoder(ModelMixin, ConfigMixin):
    """A small CNN standing in for SigLIP: patch tokens of a 64×64 image.

    Args:
        channels: output channels of the four stride-2 convolutions (64 -> 32 -> 16 -> 8 -> 4 px).
        hidden_dim: width of the output tokens (`last_hidden_state`'s last dim).
    """

    @register_to_config
    def __init__(self, *, channels: tuple[int, ...] = (16, 32, 64, 64), hidden_dim: int = 64):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.patch_proj = nn.Linear(c_in, hidden_dim)
        self.global_proj = nn.Linear(c_in, hidden_dim)
        grid = (SIZE // 2 ** len(channels)) ** 2
        self.position = nn.Parameter(torch.zeros(1, grid, hidden_dim))
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 64, 64] in [-1, 1] -> last_hidden_state [B, 16, hidden_dim]."""
        feat = self.features(pixels)  # [B, C, 4, 4]
        tokens = feat.flatten(2).transpose(1, 2)  # [B, C, 4, 4] -> [B, 16, C]
        # Every patch token also sees the whole image (a ViT's tokens do, through attention).
        pooled = self.global_proj(tokens.mean(dim=1, keepdim=True))  # [B, 1, D]
        return self.norm(self.patch_proj(tokens) + pooled + self.position)


class ToyReduxProjection(ModelMixin, ConfigMixin):
    """The Redux stand-in: ComfyUI's `ReduxImageEncoder` layout at toy width, vision tokens -> toy text tokens.

    Args:
        redux_dim: width of the vision tokens (ToyVisionEncoder's `hidden_dim`).
        txt_in_features: width of the text tokens it produces (the toy T5 width, 32).
    """

    @register_to_config
    def __init__(self, *, redux_dim: int = 64, txt_in_features: int = 32):
        super().__init__()
        self.redux_up = nn.Linear(redux_dim, txt_in_features * 3)
        self.redux_down = nn.Linear(txt_in_features * 3, txt_in_features)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, redux_dim] -> [B, N, txt_in_features]."""
        return self.redux_down(F.silu(self.redux_up(vision_tokens)))


class ToyReferenceEncoder(nn.Module):
    """Both nets together: reference images -> tokens in the toy text space (what training and the CLI use)."""

    def __init__(self, vision: ToyVisionEncoder, redux: ToyReduxProjection):
        super().__init__()
        self.vision, self.redux = vision, redux

    def forward(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> reference tokens [B, 16, 32]."""
        return self.redux(self.vision(preprocess(images, crop)))

    def save(self, folder: str | Path) -> Path:
        """`<folder>/vision/` and `<folder>/redux/` (config.json + safetensors), written atomically."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self.vision.save_pretrained(tmp / "vision", safe_serialization=True)
            self.redux.save_pretrained(tmp / "redux", safe_serialization=True)
        return folder


def load_toy_reference(folder: str | Path | None = None, device: str = "cpu") -> ToyReferenceEncoder:
    """The trained toy reference encoder (default: the shipped one), frozen, in fp32."""
    folder = Path(folder) if folder is not None else REFERENCE_DIR
    missing = [str(folder / part / "config.json") for part in ("vision", "redux") if not (folder / part).is_dir()]
    if missing:
        raise ValueError(
            f"The toy reference encoder in {folder} is incomplete (missing {missing}). Reproduce it with "
            "`python scripts/train_toy_reference.py`, or use the shipped bfs_core/toy/weights/reference."
        )
    vision = ToyVisionEncoder.from_pretrained(folder / "vision")
    redux = ToyReduxProjection.from_pretrained(folder / "redux")
    encoder = ToyReferenceEncoder(vision, redux).to(device).eval().requires_grad_(False)
    logger.info("Loaded the toy reference encoder from %s", folder)
    return encoder


__all__ = [
    "NEUTRAL_PROMPT",
    "REFERENCE_DIR",
    "ToyReduxProjection",
    "ToyReferenceEncoder",
    "ToyVisionEncoder",
    "load_toy_reference",
    "preprocess",
    "reference_image",
    "reference_scene",
]
