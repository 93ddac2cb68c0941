"""ComfyUI's own `.latent` files (its Save Latent / Load Latent nodes), so headless runs and ComfyUI hand latents over.

The format, read from ComfyUI's `nodes.py` (`SaveLatent.save`, `LoadLatent.load`): a safetensors file with
- `latent_tensor`: the LATENT's `samples` as ComfyUI holds them — for Flux the *raw* VAE latent [B, 16, H/8, W/8]
  (ComfyUI applies the model's latent format, Flux `(raw - 0.1159) · 0.3611`, only inside the sampler), float32;
- `latent_format_version_0`: an empty tensor marking the current convention. Files without it are from ComfyUI
  before that marker, which stored SD1 latents multiplied by 0.18215 (LoadLatent divides them back); no Flux latent
  was ever saved that way, so such a file is refused here.
- metadata: `prompt` (and the workflow) as JSON strings when ComfyUI writes them; LoadLatent ignores it.

The pack's own latent files (`bfs_core.models.rgba_vae.save_latent_file`) hold *normalised* Flux latents
(`space=flux_normalized`): normalised = (raw − shift) · scale, with the Flux VAE's scaling 0.3611 and shift 0.1159,
the same conversion the nodes apply between their core and ComfyUI's LATENT (`nodes/common.py`).
"""

from __future__ import annotations

import pathlib

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import UserInputError, open_safetensors
from .models.transparent_vae import FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR


COMFY_LATENT_SUFFIX = ".latent"
COMFY_TENSOR_KEY = "latent_tensor"
COMFY_VERSION_KEY = "latent_format_version_0"


def comfy_from_normalized(latent: torch.Tensor) -> torch.Tensor:
    """The pack's normalised Flux latent -> ComfyUI's LATENT samples (the raw VAE latent)."""
    return latent / FLUX_SCALING_FACTOR + FLUX_SHIFT_FACTOR


def normalized_from_comfy(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LATENT samples (raw VAE latent) -> the pack's normalised Flux latent."""
    return (samples - FLUX_SHIFT_FACTOR) * FLUX_SCALING_FACTOR


def save_comfy_latent(path: str | pathlib.Path, latent: torch.Tensor) -> pathlib.Path:
    """Write a normalised Flux latent [B, 16, h, w] as a ComfyUI `.latent` file (Load Latent reads it as is)."""
    path = pathlib.Path(path)
    if path.suffix != COMFY_LATENT_SUFFIX:
        raise ValueError(f"A ComfyUI latent file must end in {COMFY_LATENT_SUFFIX!r} but got {str(path)!r}.")
    if latent.ndim != 4 or latent.shape[1] != 16:
        raise ValueError(f"The latent must be a Flux latent [B, 16, H/8, W/8] but is {tuple(latent.shape)}.")
    tensors = {
        COMFY_TENSOR_KEY: comfy_from_normalized(latent.detach().float().cpu()).contiguous(),
        COMFY_VERSION_KEY: torch.tensor([]),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prompt": ""})  # what SaveLatent writes when it has no prompt
    return path


def load_comfy_latent(path: str | pathlib.Path, name: str = "latent") -> torch.Tensor:
    """Read a ComfyUI `.latent` file (Save Latent) -> the pack's normalised Flux latent [B, 16, h, w] float32."""
    path = pathlib.Path(path)
    with open_safetensors(path, name) as f:
        keys = list(f.keys())
        if COMFY_TENSOR_KEY not in keys:
            raise UserInputError(
                f"`{name}` file {str(path)!r} has no `{COMFY_TENSOR_KEY}` tensor (it has {keys[:5]}): it is not a "
                "ComfyUI latent. Save one with ComfyUI's Save Latent node, or pass a latent `generate` wrote."
            )
        samples = f.get_tensor(COMFY_TENSOR_KEY)
    if COMFY_VERSION_KEY not in keys:
        raise UserInputError(
            f"`{name}` file {str(path)!r} has no `{COMFY_VERSION_KEY}` marker: it is from a ComfyUI before 2023 "
            "(SD1 latents scaled by 0.18215), not a Flux latent. Save the Flux latent again with Save Latent."
        )
    if not samples.is_floating_point() or samples.ndim != 4 or samples.shape[1] != 16:
        hint = " (4 channels: an SD1/SDXL latent)" if samples.ndim == 4 and samples.shape[1] == 4 else ""
        raise UserInputError(
            f"`{name}` file {str(path)!r} holds a {samples.dtype} latent of shape {list(samples.shape)}{hint}, but "
            "a Flux latent is floating point [batch, 16, height/8, width/8]. Save the latent of a Flux model."
        )
    return normalized_from_comfy(samples.float())


def read_latent(path: str | pathlib.Path, name: str = "latent") -> torch.Tensor:
    """A normalised Flux latent from either a ComfyUI `.latent` file or the pack's `.safetensors` latent file."""
    from .models.rgba_vae import load_latent_file

    suffix = pathlib.Path(path).suffix
    if suffix == COMFY_LATENT_SUFFIX:
        return load_comfy_latent(path, name)
    if suffix != ".safetensors":
        raise UserInputError(
            f"`{name}` file {str(path)!r} must be an existing .safetensors file holding a `latent` tensor (as "
            "`generate` writes: fg_latent.safetensors) or a ComfyUI `.latent` file (Save Latent, fg_latent.latent)."
        )
    return load_latent_file(path, name)


__all__ = ["save_comfy_latent", "load_comfy_latent", "read_latent", "comfy_from_normalized", "normalized_from_comfy"]
