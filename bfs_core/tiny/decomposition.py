"""Tiny random decomposition (Outpaint-and-Remove) weights for the tiny Flux-Fill."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.flux_fill_loading import load_flux_fill_transformer
from ..models.layer_decomposition import (
    FILL_IN_CHANNELS,
    DecompositionConfig,
    _group,
    initial_decomposition_model,
    save_decomposition_weights,
)


def write_tiny_decomposition(out_dir: Path, base_dir: Path) -> dict[str, Path]:
    """Tiny random (non-zero adapters) decomposition weights for the tiny Flux-Fill under `base_dir`.

    `base_dir` is what `write_tiny_flux_fill` / `write_tiny_set` call `diffusers` (the root holding `transformer/`).
    Returns {"decomposition": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer = load_flux_fill_transformer(base_dir, torch_dtype=torch.float32)
    config = DecompositionConfig(
        lora_rank=4, joint_rank=4, fusion_dim=32, fusion_latents=8, fusion_heads=2, fusion_channels=64
    )
    model = initial_decomposition_model(transformer, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            group = _group(name)
            if group in ("lora_bg", "lora_fg", "joint"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif name == "transformer.x_embedder.weight":
                param[:, FILL_IN_CHANNELS:] = (
                    torch.randn(param.shape[0], param.shape[1] - FILL_IN_CHANNELS, generator=gen) * 0.02
                )
    path = save_decomposition_weights(model, out_dir / "decomposition_tiny.safetensors")
    return {"decomposition": path}
