"""The tiny model sets: `write_tiny_set` (what `python -m bfs_core make-tiny DIR` writes: every on-disk format the
pack reads) and `write_tiny_models` (what the training tests and `scripts/train_tiny_demo.py` train)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ..atomic import atomic_path, atomic_write_text
from ..models.bfs_checkpoint import save_bfs_weights
from ..models.composition_unet import build_composition_unet
from ..models.dual_flux import DualBranchConfig, DualBranchFlux
from ..models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from .bfs import official_release_state_dict, randomize_bfs_parameters
from .decomposition import write_tiny_decomposition
from .flux import TINY_FLUX, write_tiny_flux_fill, write_tiny_flux_vae
from .gguf import write_tiny_flux_fill_gguf
from .rgba_vae import tiny_release_vae, write_tiny_rgba_vaes
from .text_encoders import write_tiny_text_encoders


TINY_PHI = dict(block_out_channels=[16, 32], norm_num_groups=8, layers_per_block=1, sample_size=8)


def write_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The training set: a Fill-shaped transformer (`TINY_FLUX`), the tiny Flux VAE and text encoders, a tiny
    release-format RGBA VAE and a tiny Φ (`TINY_PHI`); returns {"flux_fill", "rgba_vae", "phi"}."""
    out = Path(out_dir)
    root = out / "flux-fill"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        FluxTransformer2DModel(**TINY_FLUX).save_pretrained(root / "transformer")
        write_tiny_flux_vae(root / "vae", seed=seed)
        write_tiny_text_encoders(root, seed=seed)
        tiny_release_vae(seed).save_pretrained(out / "rgba_vae")
        torch.manual_seed(seed)
        build_composition_unet(**TINY_PHI).save_pretrained(out / "phi")
    return {"flux_fill": root, "rgba_vae": out / "rgba_vae", "phi": out / "phi"}


def write_tiny_set(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the whole tiny set under `out_dir` and return {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(write_tiny_flux_fill(out_dir, seed=seed))
    paths.update(write_tiny_flux_fill_gguf(out_dir, seed=seed))  # gguf_q8_0 (the bfl_bf16 weights), gguf_q4_k
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
    paths.update(write_tiny_decomposition(out_dir / "decomposition", paths["diffusers"]))
    paths.update({f"rgba_{k}": v for k, v in write_tiny_rgba_vaes(out_dir / "rgba_vae").items()})
    return paths
