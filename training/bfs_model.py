"""What BFS stage 1 and stage 2 share: their config fields, the dual-branch model with fp32 trainables, frozen Φ, the
accelerate save/load hooks (trainable weights only, in the nodes' safetensors format), batch encoding, sample grids.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from bfs_core.models.bfs_checkpoint import load_bfs, read_bfs_safetensors, save_bfs_weights
from bfs_core.models.dual_flux import (
    DualBranchConfig,
    DualBranchFlux,
    bfs_state_dict,
    parameter_group,
    reset_inference_state,
    set_trainable,
)
from bfs_core.sampling.flow_match import fill_condition, latent_image_ids, pack_latents, sample_dual, unpack_latents

from .common import CommonConfig, LatentEncoder, TextEmbeddingCache, randn_rows, write_grid


logger = logging.getLogger(__name__)

WEIGHTS_NAME = "bfs_weights.safetensors"


@dataclass
class BFSConfig(CommonConfig):
    """Model and conditioning fields of both BFS stages (Tab. A1 values in training/configs/stage{1,2}.yaml)."""

    flux_fill: str = ""  # FLUX.1-Fill-dev: diffusers root (with transformer/, vae/, text encoders) or a single file
    vae: str | None = None  # Flux VAE folder; default <flux_fill>/vae
    text_encoders: str | None = None  # folder with tokenizer(_2)/text_encoder(_2); default <flux_fill>
    rgba_vae: str = ""  # RGBA VAE (foreground latents): folder or file, any format load_rgba_decoder reads
    phi: str = ""  # the Φ trainer's output folder (frozen here)
    preset: Literal["paper", "release"] = "paper"  # DualBranchConfig preset
    bfs_overrides: dict = field(default_factory=dict)  # DualBranchConfig fields to change, e.g. {content_rank: 16}
    init_bfs: str | None = None  # start from these BFS weights (stage 2: the stage-1 result)
    guidance: float = 30.0  # Flux-Fill's distilled guidance value fed during training (as at inference)
    max_sequence_length: int = 512  # T5 tokens
    text_cache_dir: str | None = None  # caption embedding cache; default <output_dir>/text_cache
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    lambda_comp: float = 0.1  # weight of L_comp (eq. 7 / eq. 9 + 0.1 L_comp)
    train_joint: bool = True  # False: the joint module stays at its zero init: no cross-branch exchange (ablation)


def dual_config(cfg: BFSConfig) -> DualBranchConfig:
    base = DualBranchConfig.preset(cfg.preset)
    return DualBranchConfig(**{**dataclasses.asdict(base), **cfg.bfs_overrides})


def load_dual_model(cfg: BFSConfig, device, dtype) -> DualBranchFlux:
    """Flux-Fill in `dtype` (frozen), patched (fresh, or `init_bfs`), trainable groups cast to fp32."""
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer

    transformer = load_flux_fill_transformer(cfg.flux_fill, torch_dtype=dtype, device=device)
    transformer.requires_grad_(False)
    if cfg.init_bfs:
        model = load_bfs(transformer, cfg.init_bfs)
        reset_inference_state(transformer)  # loading prepares for inference (skips/folds); training needs all active
        if model.config != dual_config(cfg):
            logger.warning("init_bfs config %s differs from the preset; training with the file's config", model.config)
    else:
        model = DualBranchFlux(transformer, dual_config(cfg))
    for name, param in transformer.named_parameters():
        if parameter_group(name) != "base":
            param.data = param.data.float()  # trainables stay fp32 (STYLE: Training)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return model


def load_frozen_phi(path: str, device, dtype):
    from diffusers import UNet2DModel

    if not path or not Path(path).is_dir():
        raise ValueError(f"`phi` must be the Φ trainer's output folder (config.json + weights) but got {path!r}.")
    return UNet2DModel.from_pretrained(path, torch_dtype=dtype).to(device).eval().requires_grad_(False)


def trainable_names(model: DualBranchFlux, groups: set[str]) -> set[str]:
    return {n for n, _ in model.transformer.named_parameters() if parameter_group(n) in groups}


def save_weights(model: DualBranchFlux, path: str | Path) -> Path:
    """The nodes' format (bfs_core.models.bfs_checkpoint), written atomically (by `save_bfs_weights`)."""
    path = Path(path)
    save_bfs_weights(model, path)
    return path


def register_hooks(accelerator: Accelerator) -> None:
    """Checkpoints hold only the BFS parameters (safetensors), not the 12 B base; loading puts them back exactly."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_weights(accelerator.unwrap_model(model), Path(output_dir) / WEIGHTS_NAME)
        weights.clear()  # nothing else of the model goes into the checkpoint

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            ckpt = read_bfs_safetensors(Path(input_dir) / WEIGHTS_NAME)
            expected = set(bfs_state_dict(model.transformer))
            if set(ckpt.tensors) != expected:
                raise ValueError(f"{input_dir}: checkpoint keys do not match this model's BFS parameters.")
            model.transformer.load_state_dict(ckpt.tensors, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def set_phase_trainable(model: DualBranchFlux, groups: set[str]) -> list[torch.nn.Parameter]:
    return set_trainable(model.transformer, groups)


def named_trainables(model: DualBranchFlux, groups: set[str]) -> dict[str, torch.nn.Parameter]:
    """name -> parameter of `groups`, named as in the BFS weight files (for `check_rank_sync`)."""
    return {n: p for n, p in model.transformer.named_parameters() if parameter_group(n) in groups}


# ---------------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One encoded batch. Packed latents [N, L, 64]; z_bg / z_comp unpacked [N, 16, h, w]."""

    comp: torch.Tensor
    fg: torch.Tensor
    z_bg: torch.Tensor
    fill_cond: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor
    names: list[str]


def validation_batch(dataset, cfg: BFSConfig, encoder, texts, device, dtype, surrogate=False) -> Batch:
    """The first `num_validation_samples` samples of the dataset, encoded once: the same grid rows at every step."""
    n = min(cfg.num_validation_samples, len(dataset))
    raw = torch.utils.data.default_collate([dataset[i] for i in range(n)])
    return encode_batch(raw, encoder, texts, cfg, device, dtype, surrogate=surrogate)


def encode_batch(
    batch: dict, encoder: LatentEncoder, texts: TextEmbeddingCache, cfg: BFSConfig, device, dtype, surrogate=False
) -> Batch:
    """Encode a dataset batch. `surrogate`: no foreground layer (stage-2 pairs), use F̃ = C·M with alpha M (eq. 8)."""
    mask = batch["mask"].to(device)  # [N, 1, H, W] box mask, 1 = foreground region
    composite = batch["composite"].to(device)
    z_comp = encoder.rgb(composite)
    z_bg = encoder.rgb(batch["background"].to(device))
    if surrogate:
        fg_rgba = torch.cat([composite * mask, mask], dim=1)  # F̃ = C·M as a straight RGBA layer with alpha M
    else:
        fg_rgba = batch["foreground"].to(device)
    z_fg = encoder.rgba_latent(fg_rgba)
    embeds, pooled = texts.get(list(batch["caption"]), cfg.max_sequence_length, device, dtype)
    h, w = z_bg.shape[-2:]
    return Batch(
        comp=pack_latents(z_comp),
        fg=pack_latents(z_fg),
        z_bg=z_bg,
        fill_cond=fill_condition(z_bg, mask).to(dtype),  # background encoded unmasked, as the release feeds it
        prompt_embeds=embeds,
        pooled=pooled,
        img_ids=latent_image_ids(h, w, device=device, dtype=dtype),
        names=list(batch["name"]),
    )


def draw_noise(comp: torch.Tensor, noise_mode: str, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise for both branches: the paper shares one draw (eq. 5 has one z0), the release draws independently.

    With `accelerator`: this process's rows of the global batch's draw (training/common.py, `randn_rows`)."""
    noise_comp = randn_rows(comp, accelerator)
    return noise_comp, (noise_comp if noise_mode == "shared" else randn_rows(comp, accelerator))


@torch.no_grad()
def write_samples(
    accelerator: Accelerator, model: DualBranchFlux, b: Batch, encoder: LatentEncoder, cfg: BFSConfig, step: int
):
    """BG2FG on a fixed batch -> grid: background | composite branch | foreground over checkerboard | alpha."""
    from bfs_core.models.flux_fill_loading import load_shipped_config

    h, w = b.z_bg.shape[-2:]
    result = sample_dual(
        model,
        fill_cond=b.fill_cond,
        prompt_embeds=b.prompt_embeds,
        pooled=b.pooled,
        img_ids=b.img_ids,
        scheduler_config=load_shipped_config("flux_fill_scheduler"),
        steps=cfg.validation_inference_steps,
        guidance=cfg.guidance,
        generator=torch.Generator("cpu").manual_seed(cfg.seed),  # own generator: the training RNG is untouched
    )
    rgba = encoder.decode_rgba(unpack_latents(result.fg.float(), h, w))
    columns = {
        "background": encoder.decode_rgb(b.z_bg),
        "composite": encoder.decode_rgb(unpack_latents(result.comp.float(), h, w)),
        "foreground": rgba,
        "alpha": rgba[:, 3:],
    }
    return write_grid(accelerator, cfg.output_dir, step, columns)
