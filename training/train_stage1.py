"""BFS stage 1 — representation learning with compositional consistency (paper §4, eq. 5–7, Tab. A1).

    python -m training stage1 --config training/configs/stage1.yaml [--key=value ...]
    accelerate launch --config_file training/accelerate/multi_gpu.yaml -m training stage1 --config ...

L_first = L_flow + 0.1·L_comp on synthetic triplets {F, B, M, C}:
- L_flow (eq. 5): both branches noised at the same sigma (shared noise in the paper preset), each branch's predicted
  velocity regressed on its own target v* = noise − z (time convention: training/losses.py);
- L_comp (eq. 6): ‖Φ(ẑ_F, z_B) − ẑ_C‖₁ on the one-step clean estimates ẑ = x_sigma − sigma·v̂, Φ frozen.
Trainable: both content LoRAs, the joint LoRAs and the post projection (groups comp, fg, joint). The result is written
in the nodes' safetensors format (`bfs_stage1.safetensors`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .bfs_model import (
    BFSConfig,
    draw_noise,
    encode_batch,
    load_dual_model,
    load_frozen_phi,
    named_trainables,
    register_hooks,
    save_weights,
    set_phase_trainable,
    validation_batch,
    write_samples,
)
from .common import (
    LatentEncoder,
    TextEmbeddingCache,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resume_step,
    sample_sigmas,
    weight_dtype,
)
from .data import ManifestDataset, make_loader
from .loop import Phase, TrainResult, echo_config, finish, train
from .losses import flow_matching_loss, noisy_latents, one_step_estimate, packed_composition_loss


logger = logging.getLogger(__name__)

GROUPS = {"comp", "fg", "joint"}


@dataclass
class TrainConfig(BFSConfig):
    """BFS stage 1. Besides BFSConfig / CommonConfig fields:"""

    data_dir: str = ""  # synthetic triplet dataset (manifest.jsonl, kind `triplet`; `python -m training synth-data`)
    output_name: str = "bfs_stage1.safetensors"  # final weights in <output_dir>


def stage1_loss(
    model, phi, b, cfg: TrainConfig, device, noise_mode: str, accelerator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_flow + λ·L_comp for one encoded batch (eq. 5–7); `accelerator`: draw for the global batch (common.py)."""
    sigma, weight = sample_sigmas(
        b.comp.shape[0], cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, device, accelerator
    )
    noise_comp, noise_fg = draw_noise(b.comp, noise_mode, accelerator)
    x_comp = noisy_latents(b.comp, noise_comp, sigma)  # x_sigma = (1 − sigma)·z + sigma·noise
    x_fg = noisy_latents(b.fg, noise_fg, sigma)
    dtype = b.fill_cond.dtype
    v_comp, v_fg = model(
        x_comp.to(dtype), x_fg.to(dtype), b.fill_cond, b.prompt_embeds, b.pooled, sigma, sigma, b.img_ids, cfg.guidance
    )
    # Eq. 5: ‖v*_C − v_C‖² + ‖v*_F − v_F‖² with v* = noise − z (our sign of the paper's z1 − z0).
    l_flow_comp = flow_matching_loss(v_comp, noise_comp, b.comp, weight)
    l_flow_fg = flow_matching_loss(v_fg, noise_fg, b.fg, weight)
    # Eq. 6 on the one-step clean estimates ẑ = x_sigma − sigma·v̂; Φ is frozen but differentiable.
    comp_hat = one_step_estimate(x_comp, v_comp.float(), sigma)
    fg_hat = one_step_estimate(x_fg, v_fg.float(), sigma)
    l_comp = packed_composition_loss(phi, fg_hat, b.z_bg, comp_hat)
    loss = l_flow_comp + l_flow_fg + cfg.lambda_comp * l_comp
    parts = {"loss_flow_comp": l_flow_comp.item(), "loss_flow_fg": l_flow_fg.item(), "loss_comp": l_comp.item()}
    return loss, parts


def main(cfg: TrainConfig, callback: Callable[[int, dict, object], None] | None = None) -> TrainResult:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    device, dtype = accelerator.device, weight_dtype(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Data and conditioning: the manifest is validated up front; caption embeddings are cached once per caption.
    dataset = ManifestDataset(cfg.data_dir, "triplet", cfg.resolution)
    echo_config(accelerator, cfg, "stage 1", {"triplets": len(dataset)}, bad=dataset.bad)
    texts = TextEmbeddingCache(cfg.text_cache_dir or out / "text_cache")
    with accelerator.main_process_first():
        texts.prepare(
            [e["caption"] for e in dataset.entries], cfg.text_encoders or cfg.flux_fill, cfg.max_sequence_length
        )
    encoder = LatentEncoder(cfg.vae or str(Path(cfg.flux_fill) / "vae"), cfg.rgba_vae, device, dtype)

    # Model: frozen Flux-Fill + BFS parameters (fp32); Φ frozen.
    model = load_dual_model(cfg, device, dtype)
    groups = GROUPS if cfg.train_joint else GROUPS - {"joint"}
    params = set_phase_trainable(model, groups)
    noise_mode = model.config.noise
    logger.info("trainable: %d tensors, %.2f M parameters", len(params), sum(p.numel() for p in params) / 1e6)
    phi = load_frozen_phi(cfg.phi, device, dtype)
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg, accelerator)
    register_hooks(accelerator)
    named = named_trainables(model, groups)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("bfs_stage1")

    start = resume_step(accelerator, cfg)
    drawn = start * cfg.gradient_accumulation_steps  # micro-batches the resumed steps took: the data order goes on
    batches = iter(make_loader(dataset, cfg.batch_size, cfg.seed, drawn, accelerator, cfg.num_workers))
    val_batch = validation_batch(dataset, cfg, encoder, texts, device, dtype) if cfg.validation_steps else None
    phase = Phase(
        next_batch=lambda _step, _micro: encode_batch(next(batches), encoder, texts, cfg, device, dtype),
        loss=lambda b: stage1_loss(model, phi, b, cfg, device, noise_mode, accelerator),
        params=params,
    )
    losses = train(
        accelerator,
        cfg,
        model,
        optimizer,
        lr_scheduler,
        phase,
        start_step=start,
        trainables=named,
        stage="stage1",
        validate=lambda at: write_samples(accelerator, accelerator.unwrap_model(model), val_batch, encoder, cfg, at),
        callback=callback,
    )

    final = out / cfg.output_name
    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(model), final)
    return finish(accelerator, "stage 1", final, losses, start)
