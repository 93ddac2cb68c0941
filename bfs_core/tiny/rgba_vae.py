"""Tiny random RGBA VAEs in every on-disk format the RGBA loader reads (release diffusers folder and single file,
LayerDiffuse `TransparentVAE.pth` with the real key names, and its conversion)."""

from __future__ import annotations

import pathlib
from collections import OrderedDict

import torch
from diffusers import AutoencoderKL

from ..atomic import atomic_dir, atomic_path
from ..models.rgba_vae import save_release_vae_single_file
from ..models.transparent_vae import (
    LatentTransparencyOffsetEncoder,
    TransparentVAEDecoderUNet,
    convert_transparent_vae_to_safetensors,
)


def tiny_release_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=4,
        out_channels=4,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


# Widths repeat where the real ones do (32, 32, 64, 128, 256, 512, 512), so the tiny file has all 556 real key names.
TINY_TRANSPARENT_DECODER = {"block_out_channels": (8, 8, 16, 24, 32, 40, 40), "norm_num_groups": 4}
TINY_TRANSPARENT_ENCODER = {"block_out_channels": (4, 8, 8, 16)}


def tiny_transparent_vae_state_dict(seed: int = 0, with_sd_vae: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Real LayerDiffuse-Flux key names at tiny widths, random weights (incl. the zero-initialised layers), bf16."""
    gen = torch.Generator("cpu").manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    if with_sd_vae:
        for k, v in tiny_release_vae(seed).state_dict().items():
            if k.startswith("decoder.conv_out") or k.startswith("encoder.conv_in"):
                state[f"sd_vae.{k}"] = v.to(torch.bfloat16)
    parts = (
        ("encoder.", LatentTransparencyOffsetEncoder(**TINY_TRANSPARENT_ENCODER)),
        ("decoder.", TransparentVAEDecoderUNet(**TINY_TRANSPARENT_DECODER)),
    )
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            # Randomise everything (the real zero-initialised layers are trained, so non-zero) with a fan-in scale.
            fan_in = v[0].numel() if v.ndim > 1 else 1
            scale = 1.0 / fan_in**0.5 if v.ndim > 1 else 0.1
            rand = torch.randn(v.shape, generator=gen) * scale
            if k.endswith("weight") and v.ndim == 1:  # norm scales around 1
                rand = rand + 1.0
            state[prefix + k] = rand.to(torch.bfloat16)
    return state


def write_tiny_rgba_vaes(out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write tiny random RGBA VAEs in every on-disk format the loader reads; returns name -> path.

    * ``bfs_release_folder``: diffusers folder (config.json + diffusion_pytorch_model.safetensors);
    * ``bfs_release_single``: the same weights as one safetensors with ``config`` metadata;
    * ``layerdiffuse_pth``: a ``TransparentVAE.pth``-style bf16 OrderedDict with the real key names at tiny widths
      (the loader infers widths from shapes), plus a few ``sd_vae.*`` keys that the loader must ignore;
    * ``layerdiffuse_safetensors``: its conversion (only ``encoder.*``/``decoder.*``).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = tiny_release_vae(0)
    folder = out_dir / "bfs_transparency_vae"
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
    single = save_release_vae_single_file(vae, out_dir / "bfs_transparency_vae.safetensors")
    pth = out_dir / "TransparentVAE_tiny.pth"
    with atomic_path(pth) as tmp:
        torch.save(tiny_transparent_vae_state_dict(0), str(tmp))
    converted = convert_transparent_vae_to_safetensors(pth, out_dir / "TransparentVAE_tiny.safetensors")
    return {
        "bfs_release_folder": folder,
        "bfs_release_single": single,
        "layerdiffuse_pth": pth,
        "layerdiffuse_safetensors": converted,
    }
