"""Tiny FLUX transformers: the test/training config, a random Fill-shaped transformer in every layout the loader reads,
inputs for the two-branch model at that size, and the tiny Flux VAE."""

from __future__ import annotations

import math
import pathlib
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from ..atomic import atomic_dir, atomic_path
from ..models.flux_fill_loading import _FILL_IN_CHANNELS, load_shipped_config
from ..models.flux_keys import diffusers_to_bfl
from ..models.fp8 import quantize_state_dict_fp8
from ..sampling.flow_match import latent_image_ids


# The Fill-shaped transformer of the CPU tests and the training set: 2 + 2 blocks, width 64, real input layout.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)


def make_tiny_flux(seed: int = 0, dtype=torch.float32, **overrides):
    """A random `TINY_FLUX` transformer (torch's global RNG seeded with `seed`), in eval mode."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_FLUX, **overrides}).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def dual_inputs(n: int = 1, seed: int = 0, latent_hw=(8, 8), text_len: int = 6, width: int = 32):
    """Packed inputs for DualBranchFlux.forward at a tiny size."""
    gen = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    length = (h // 2) * (w // 2)
    return dict(
        comp_latents=torch.randn(n, length, 64, generator=gen),
        fg_latents=torch.randn(n, length, 64, generator=gen),
        fill_cond=torch.randn(n, length, 320, generator=gen),
        prompt_embeds=torch.randn(n, text_len, width, generator=gen),
        pooled=torch.randn(n, width, generator=gen),
        timestep_comp=torch.rand(n, generator=gen),
        timestep_fg=torch.rand(n, generator=gen),
        img_ids=latent_image_ids(h, w),
    )


def _random_flux(config: dict, seed: int) -> FluxTransformer2DModel:
    """A bf16 FluxTransformer2DModel with non-trivial random weights (fan-in scaled Linears, norm scales near 1)."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    generator = torch.Generator("cpu").manual_seed(seed)
    sd = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 2:
            sd[name] = noise / math.sqrt(param.shape[1])
        elif re.search(r"norm_(added_)?[qk]\.weight$", name):
            sd[name] = 1.0 + 0.1 * noise
        else:
            sd[name] = 0.05 * noise
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def _tiny_fill_config(in_channels: int = _FILL_IN_CHANNELS) -> dict:
    return {
        **load_shipped_config("flux_fill_transformer"),
        "in_channels": in_channels,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": [4, 14, 14],
    }


def write_tiny_flux_fill(out_dir: pathlib.Path, *, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write a tiny random Fill-shaped transformer in every layout the loader reads.

    Returns paths by name: `diffusers` (pipeline root holding `transformer/`), `bfl_bf16`, `bfl_fp8`,
    `bfl_fp8_scaled` (ComfyUI legacy scaled fp8), `bfl_fp8_comfy_quant` (newer per-layer format) and
    `bfl_non_fill` (a 64-input-channel FLUX.1-dev-shaped model, for the error path).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _random_flux(_tiny_fill_config(), seed)
    paths = {"diffusers": out_dir / "flux-fill-diffusers"}
    paths["diffusers"].mkdir(exist_ok=True)
    with atomic_dir(paths["diffusers"] / "transformer") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)

    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}
    files = {
        "bfl_bf16": ("flux1-fill-tiny-bf16.safetensors", bfl),
        "bfl_fp8": ("flux1-fill-tiny-fp8_e4m3fn.safetensors", quantize_state_dict_fp8(bfl, scaled=False)),
        "bfl_fp8_scaled": ("flux1-fill-tiny-fp8_scaled.safetensors", quantize_state_dict_fp8(bfl, scaled=True)),
        "bfl_fp8_comfy_quant": (
            "flux1-fill-tiny-fp8_comfy_quant.safetensors",
            quantize_state_dict_fp8(bfl, scaled=True, comfy_quant=True),
        ),
    }
    other = _random_flux(_tiny_fill_config(in_channels=64), seed + 1)
    other_bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(other.state_dict()).items()}
    files["bfl_non_fill"] = ("flux1-dev-tiny-bf16.safetensors", other_bfl)
    for name, (filename, sd) in files.items():
        paths[name] = out_dir / filename
        with atomic_path(paths[name]) as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
    return paths


def write_tiny_flux_vae(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Flux-layout AutoencoderKL (16 latent channels, ×8 downsampling, Flux scaling/shift)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp)
    return out_dir
