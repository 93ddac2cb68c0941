"""The embedded toy model: the real pack's classes at toy size, and where its trained files live.

Layout of a toy model folder (the committed one is `bfs_core/toy/weights/`; `scripts/train_toy.py` writes the same):

    flux-fill/transformer/     FluxTransformer2DModel, Fill layout (384 -> 64 channels), 2 double + 4 single blocks,
                               width 128 (4 heads × 32), T5 width 32, CLIP width 32, guidance embedding; fp16 on disk
    flux-fill/vae/             AutoencoderKL 3 -> 16 latent channels, ×8 downsampling (the toy "Flux VAE")
    flux-fill/scheduler/       the shipped Flux-Fill scheduler config
    flux-fill/text_encoder*/, tokenizer*/   tiny CLIP + T5 (frozen random, offline tokenizers): same CONDITIONING
                               structure as Flux ([B, T, 32] sequence + [B, 32] pooled), narrower
    rgba_vae/                  release-format transparency VAE: AutoencoderKL 4 -> 16 -> 4 (straight RGBA)
    phi/                       Φ (UNet2DModel), the latent composition network
    bfs_toy.safetensors        BFS weights (stage 1 + stage 2, paper preset at toy ranks), `save_bfs_weights` format
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RESOLUTION = 64
MAX_SEQUENCE_LENGTH = 16  # T5 tokens: the tiny T5 tokenizer is per character ("a purple pillar" + </s> = 16)
# The caption of a reference-only request (the real Redux workflow's "an object"); the toy BFS never saw it, the toy
# reference encoder (bfs_core/toy/reference.py) was trained with it.
NEUTRAL_PROMPT = "an object"

TOY_FLUX = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
TOY_VAE = dict(
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=1,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)
TOY_PHI = dict(block_out_channels=[32, 64], norm_num_groups=8, layers_per_block=1, sample_size=8)
TOY_BFS = dict(content_rank=32, joint_rank=8)  # bfs_overrides of the paper preset at width 128


def toy_vae(channels: int, seed: int = 0):
    """An untrained toy AutoencoderKL with `channels` image channels (3: the Flux-VAE stand-in, 4: RGBA)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=channels, out_channels=channels, scaling_factor=1.0, shift_factor=0.0, **TOY_VAE
        )


def toy_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**TOY_FLUX)


def write_toy_text_encoders(root: str | Path) -> Path:
    """The toy text encoders: the tiny CLIP + T5 (width 32) with offline tokenizers, frozen at a fixed seed."""
    from ..tiny.text_encoders import write_tiny_text_encoders

    return write_tiny_text_encoders(Path(root), t5_dim=32, clip_dim=32, seed=0)


def toy_paths(root: str | Path | None = None) -> dict[str, Path]:
    root = Path(root) if root is not None else WEIGHTS_DIR
    return {
        "root": root,
        "flux_fill": root / "flux-fill",
        "vae": root / "flux-fill" / "vae",
        "rgba_vae": root / "rgba_vae",
        "phi": root / "phi",
        "bfs": root / "bfs_toy.safetensors",
    }


def check_toy_weights(root: str | Path | None = None, need_bfs: bool = True) -> dict[str, Path]:
    paths = toy_paths(root)
    skip = {"root"} if need_bfs else {"root", "bfs"}
    missing = [str(p) for k, p in paths.items() if k not in skip and not p.exists()]
    if missing:
        raise ValueError(
            f"The toy model in {paths['root']} is incomplete (missing {missing}). "
            "Reproduce it with `python scripts/train_toy.py`, or use the committed bfs_core/toy/weights."
        )
    return paths


def load_toy(root: str | Path | None = None, bfs: str | Path | None = None, device: str = "cpu"):
    """(BFSPipeline, RGBA decoder) for the toy model at `root` (default: the committed one), in fp32."""
    from ..models.rgba_vae import load_rgba_decoder
    from ..pipelines.loading import load_pipeline

    paths = check_toy_weights(root, need_bfs=bfs is None)
    pipe = load_pipeline(str(paths["flux_fill"]), str(bfs or paths["bfs"]), dtype=torch.float32, device=device)
    rgba = load_rgba_decoder(str(paths["rgba_vae"]), device=device, dtype=torch.float32)
    return pipe, rgba


def encode_toy_prompt(text_encoders, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [1, 16, 32], pooled [1, 32]) of one prompt of the toy vocabulary ("a red cube", ...), or of
    NEUTRAL_PROMPT (for a reference image to say what the object is).

    The toy text encoders are frozen random nets over characters: any other text encodes to something the toy model
    never saw, so it is refused with the list of what it knows.
    """
    from .world import vocabulary

    known = vocabulary() + [NEUTRAL_PROMPT]
    if prompt not in known:
        raise ValueError(
            f"The toy model knows only 'a <colour> <shape>' prompts (and {NEUTRAL_PROMPT!r} beside a reference "
            f"image) but got {prompt!r}. Use one of: "
            f"{', '.join(known)}."
        )
    return text_encoders.encode([prompt], max_sequence_length=MAX_SEQUENCE_LENGTH)
