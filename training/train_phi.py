"""Φ — the latent composition network (paper appendix A.5, eq. 16, Tab. A3).

    python -m training phi --config training/configs/phi.yaml [--key=value ...]

Data: (foreground RGBA, background) pairs; the composite is made with eq. (1), C = α·F + (1 − α)·B. The foreground
latent comes from the RGBA encoder (the foreground branch's latent space), background and composite latents from the
Flux VAE. Loss: ‖z_C − Φ(z_F, z_B)‖², all of Φ trained in fp32 (Tab. A3). The result is a diffusers folder
`<output_dir>/phi` (config.json + safetensors) that stage 1 and stage 2 load frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from bfs_core.atomic import atomic_dir
from bfs_core.models.composition_unet import build_composition_unet, compose_latents

from .common import (
    CommonConfig,
    LatentEncoder,
    PreparedView,
    atomic_save_file,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resume_step,
    write_grid,
)
from .data import ManifestDataset, make_loader
from .loop import Phase, TrainResult, echo_config, finish, train
from .losses import phi_loss


logger = logging.getLogger(__name__)

WEIGHTS_NAME = "phi.safetensors"


@dataclass
class TrainConfig(CommonConfig):
    """Φ training. Besides CommonConfig fields:"""

    data_dir: str = ""  # Φ pairs (manifest.jsonl, kind `phi`)
    vae: str = ""  # Flux VAE folder
    rgba_vae: str = ""  # RGBA VAE (encodes the foreground layers)
    phi_overrides: dict = field(default_factory=dict)  # UNet2DModel fields over the appendix config (tiny tests)
    init_phi: str | None = None  # continue from a Φ folder


def register_hooks(accelerator) -> None:
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                atomic_save_file(accelerator.unwrap_model(model).state_dict(), Path(output_dir) / WEIGHTS_NAME)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            accelerator.unwrap_model(models.pop()).load_state_dict(load_file(str(Path(input_dir) / WEIGHTS_NAME)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def encode(batch: dict, encoder: LatentEncoder, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_fg = encoder.rgba_latent(batch["foreground"].to(device))  # RGBA encoder: the foreground branch's space
    z_bg = encoder.rgb(batch["background"].to(device))
    z_comp = encoder.rgb(batch["composite"].to(device))  # C = α·F + (1 − α)·B, eq. (1), made by the dataset
    return z_fg, z_bg, z_comp


@torch.no_grad()
def write_samples(accelerator, phi, val: dict, encoder: LatentEncoder, cfg: TrainConfig, step: int) -> Path:
    """foreground | background | composite (Flux VAE round trip) | Φ's composite decoded."""
    z_fg, z_bg, z_comp = val["latents"]
    columns = {
        "foreground": val["foreground"],
        "background": val["background"],
        "composite": encoder.decode_rgb(z_comp),
        "phi": encoder.decode_rgb(compose_latents(phi, z_fg, z_bg).float()),
    }
    return write_grid(accelerator, cfg.output_dir, step, columns)


def save_phi_folder(phi, path: Path) -> Path:
    """diffusers save_pretrained into `<path>.tmp`, renamed when complete (`atomic_dir`): never half a folder."""
    with atomic_dir(path) as tmp:
        phi.save_pretrained(str(tmp), safe_serialization=True)
    return path


def main(cfg: TrainConfig, callback: Callable[[int, dict, object], None] | None = None) -> TrainResult:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    device = accelerator.device
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    dataset = ManifestDataset(cfg.data_dir, "phi", cfg.resolution)
    echo_config(accelerator, cfg, "Φ", {"pairs": len(dataset)}, bad=dataset.bad)
    encoder = LatentEncoder(cfg.vae, cfg.rgba_vae, device, torch.float32)  # Tab. A3: float32 throughout

    if cfg.init_phi:
        from diffusers import UNet2DModel

        phi = UNet2DModel.from_pretrained(cfg.init_phi)
    else:
        phi = build_composition_unet(**cfg.phi_overrides)
    phi.to(device).train()
    if cfg.gradient_checkpointing:
        phi.enable_gradient_checkpointing()
    params = [p for p in phi.parameters()]
    logger.info("Φ: %.2f M trainable parameters", sum(p.numel() for p in params) / 1e6)
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg, accelerator)
    register_hooks(accelerator)
    named = dict(phi.named_parameters())
    phi, optimizer, lr_scheduler = accelerator.prepare(phi, optimizer, lr_scheduler)
    view = PreparedView(phi, accelerator)  # the forward through DDP, `config` for compose_latents
    if accelerator.is_main_process:
        accelerator.init_trackers("phi")

    start = resume_step(accelerator, cfg)
    drawn = start * cfg.gradient_accumulation_steps  # micro-batches the resumed steps took: the data order goes on
    batches = iter(make_loader(dataset, cfg.batch_size, cfg.seed, drawn, accelerator, cfg.num_workers))
    val = None
    if cfg.validation_steps:
        n = min(cfg.num_validation_samples, len(dataset))
        val = torch.utils.data.default_collate([dataset[i] for i in range(n)])
        val["latents"] = encode(val, encoder, device)
    phase = Phase(
        next_batch=lambda _step, _micro: encode(next(batches), encoder, device),
        loss=lambda z: (phi_loss(view, *z), {}),  # eq. 16: mean ‖z_C − Φ(z_F, z_B)‖² on (z_F, z_B, z_C)
        params=params,
    )
    losses = train(
        accelerator,
        cfg,
        phi,
        optimizer,
        lr_scheduler,
        phase,
        start_step=start,
        trainables=named,
        stage="phi",
        validate=lambda at: write_samples(accelerator, accelerator.unwrap_model(phi), val, encoder, cfg, at),
        callback=callback,
    )

    final = out / "phi"
    if accelerator.is_main_process:
        save_phi_folder(accelerator.unwrap_model(phi), final)
    return finish(accelerator, "Φ", final, losses, start)
