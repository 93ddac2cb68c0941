"""Tiny random models in every on-disk format the pack reads (for tests, CI and anyone checking the loaders).

`write_tiny_set(out_dir)` is what `python -m bfs_core make-tiny DIR` runs. The tiny Flux-Fill keeps the real layout
(384 input channels, guidance embedding, text width = joint_attention_dim) at width 64 so everything runs on a CPU in
seconds. Nothing here is a trained model: outputs are noise-like by design.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .atomic import atomic_dir, atomic_path, atomic_write_text
from .models.bfs_checkpoint import save_bfs_weights
from .models.dual_flux import DualBranchConfig, DualBranchFlux, parameter_group


logger = logging.getLogger(__name__)


def official_release_state_dict(
    num_double: int,
    num_single: int,
    dim: int,
    rank: int = 4,
    *,
    include_double: bool = True,
    seed: int = 0,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the release's `trained_weights.pt` key layout (spec §1.3): joint LoRAs
    `attn1n.{to_q,to_k,to_v[,to_out.0]}.lora_{A,B}.{xy_lora,yx_lora}.weight` and `conv1n.weight`, per block."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [(f"transformer_blocks.{i}", True) for i in range(num_double if include_double else 0)]
    blocks += [(f"single_transformer_blocks.{j}", False) for j in range(num_single)]
    sd = {}
    for prefix, is_double in blocks:
        for proj in ("to_q", "to_k", "to_v") + (("to_out.0",) if is_double else ()):
            for direction in ("xy_lora", "yx_lora"):
                sd[f"{prefix}.attn1n.{proj}.lora_A.{direction}.weight"] = torch.randn(rank, dim, generator=gen) * std
                sd[f"{prefix}.attn1n.{proj}.lora_B.{direction}.weight"] = torch.randn(dim, rank, generator=gen) * std
        sd[f"{prefix}.conv1n.weight"] = torch.randn(dim, dim, generator=gen) * std
    return sd


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


def randomize_bfs_parameters(
    transformer, seed: int = 1, std: float = 0.02, groups: tuple[str, ...] = ("comp", "fg", "joint")
) -> None:
    """Fill every BFS parameter of `groups` with N(0, std²) values (fresh adapters are exact no-ops, which makes a
    random model useless for checking that weights load and act)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if parameter_group(name) in groups:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def write_tiny_set(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the whole tiny set under `out_dir` and return {name: path}."""
    from .models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config, write_tiny_flux_fill
    from .text_encoders import write_tiny_text_encoders

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(write_tiny_flux_fill(out_dir, seed=seed))
    root = paths["diffusers"]
    write_tiny_flux_vae(root / "vae", seed=seed)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        root / "scheduler" / "scheduler_config.json", json.dumps(load_shipped_config("flux_fill_scheduler"), indent=2)
    )
    write_tiny_text_encoders(root, seed=seed)
    paths["vae"] = root / "vae"
    paths["text_encoders"] = root

    transformer = load_flux_fill_transformer(root, torch_dtype=torch.float32)
    cfg = transformer.config
    bfs_dir = out_dir / "bfs"
    bfs_dir.mkdir(exist_ok=True)
    official = official_release_state_dict(cfg.num_layers, cfg.num_single_layers, transformer.inner_dim, seed=seed + 1)
    paths["bfs_official_pt"] = bfs_dir / "trained_weights.pt"
    with atomic_path(paths["bfs_official_pt"]) as tmp:
        torch.save(official, tmp)
    for preset in ("release", "paper"):
        fresh = load_flux_fill_transformer(root, torch_dtype=torch.float32)
        model = DualBranchFlux(fresh, DualBranchConfig.preset(preset))
        randomize_bfs_parameters(fresh, seed=seed + 2)
        paths[f"bfs_{preset}"] = bfs_dir / f"bfs_{preset}_tiny.safetensors"
        save_bfs_weights(model, paths[f"bfs_{preset}"])

    from .models.layer_decomposition import write_tiny_decomposition

    paths.update(write_tiny_decomposition(out_dir / "decomposition", paths["diffusers"]))
    try:
        from .models.rgba_vae import write_tiny_rgba_vaes
    except ImportError:  # the RGBA decoders are optional for the core set
        logger.info("RGBA VAE writers not available; skipping them")
    else:
        paths.update({f"rgba_{k}": v for k, v in write_tiny_rgba_vaes(out_dir / "rgba_vae").items()})
    return paths
