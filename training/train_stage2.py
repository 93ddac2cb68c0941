"""BFS stage 2 — realism enhancement with distribution regularisation (paper §4, eq. 8–9, Tab. A1).

    python -m training stage2 --config training/configs/stage2.yaml --init_bfs=runs/stage1/bfs_stage1.safetensors

Optimiser steps alternate (odd steps L_real, even steps L_reg; step numbers from 1):
- L_real (eq. 8) on real (composite, background, box) pairs, **composite LoRA only**: both branches noised at the same
  sigma; the foreground branch gets the surrogate F̃ = C·M (RGBA with alpha M through the RGBA encoder), noised; only
  v_C is regressed on noise − z_C. (`lambda_comp_real` > 0 adds L_comp here too — the paper's text is ambiguous.)
- L_reg + 0.1·L_comp (eq. 9) on the synthetic triplets, **foreground LoRA + joint module only**: the composite branch
  is fed the clean composite latent at sigma = 0 (the paper's "t = 0"; time convention in training/losses.py), the
  foreground branch is noised at sigma; v_F is regressed on noise − z_F, and ẑ_C = z_C exactly.
Only the active phase's parameters require grad, and gradients are set to None between steps, so AdamW (torch or
bitsandbytes) leaves every other parameter — weight decay included — untouched on that step. Under DDP both phases'
parameters are registered once (see `main`) and the off-phase ones are reported unused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, set_seed

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

PHASE_GROUPS = {"real": {"comp"}, "reg": {"fg", "joint"}}


@dataclass
class TrainConfig(BFSConfig):
    """BFS stage 2. Besides BFSConfig / CommonConfig fields:"""

    pairs_dir: str = ""  # real (composite, background, box, caption) pairs for L_real (kind `pair`)
    triplets_dir: str = ""  # the stage-1 synthetic triplets for L_reg (kind `triplet`)
    lambda_comp_real: float = 0.0  # L_comp weight in the L_real step (the issue: none)
    output_name: str = "bfs_stage2.safetensors"


def phase_of(step: int) -> str:
    """Phase of optimiser step `step` (1-based): odd -> L_real, even -> L_reg."""
    return "real" if step % 2 == 1 else "reg"


def phase_batches_done(step_done: int) -> dict[str, int]:
    """Optimiser steps each phase has taken after `step_done` steps (fixes both data orders on resume)."""
    return {"real": (step_done + 1) // 2, "reg": step_done // 2}


def real_loss(
    model, phi, b, cfg: TrainConfig, device, noise_mode: str, accelerator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 8: ‖v*_C − v_C(z_C^σ, z_F̃^σ, σ)‖² with b.fg the surrogate F̃ = C·M latent."""
    sigma, weight = sample_sigmas(
        b.comp.shape[0], cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, device, accelerator
    )
    noise_comp, noise_fg = draw_noise(b.comp, noise_mode, accelerator)
    x_comp = noisy_latents(b.comp, noise_comp, sigma)
    x_fg = noisy_latents(b.fg, noise_fg, sigma)
    dtype = b.fill_cond.dtype
    v_comp, v_fg = model(
        x_comp.to(dtype), x_fg.to(dtype), b.fill_cond, b.prompt_embeds, b.pooled, sigma, sigma, b.img_ids, cfg.guidance
    )
    l_real = flow_matching_loss(v_comp, noise_comp, b.comp, weight)  # target v* = noise − z_C
    loss, parts = l_real, {"loss_real": l_real.item()}
    if cfg.lambda_comp_real:
        comp_hat = one_step_estimate(x_comp, v_comp.float(), sigma)
        fg_hat = one_step_estimate(x_fg, v_fg.float(), sigma)
        l_comp = packed_composition_loss(phi, fg_hat, b.z_bg, comp_hat)
        loss, parts["loss_comp_real"] = loss + cfg.lambda_comp_real * l_comp, l_comp.item()
    return loss, parts


def reg_loss(
    model, phi, b, cfg: TrainConfig, device, noise_mode: str, accelerator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9 + 0.1·L_comp: composite branch clean at sigma_C = 0, foreground branch noised at sigma."""
    sigma, weight = sample_sigmas(
        b.comp.shape[0], cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, device, accelerator
    )
    _, noise_fg = draw_noise(b.fg, noise_mode, accelerator)  # same number of draws in both noise modes' fg stream
    x_fg = noisy_latents(b.fg, noise_fg, sigma)
    sigma_comp = torch.zeros_like(sigma)  # the paper's "t = 0": the clean composite latent
    dtype = b.fill_cond.dtype
    v_comp, v_fg = model(
        b.comp.to(dtype),
        x_fg.to(dtype),
        b.fill_cond,
        b.prompt_embeds,
        b.pooled,
        sigma_comp,
        sigma,
        b.img_ids,
        cfg.guidance,
    )
    l_reg = flow_matching_loss(v_fg, noise_fg, b.fg, weight)  # target v* = noise − z_F
    comp_hat = one_step_estimate(b.comp, v_comp.float(), sigma_comp)  # = z_C exactly (sigma_C = 0)
    fg_hat = one_step_estimate(x_fg, v_fg.float(), sigma)
    l_comp = packed_composition_loss(phi, fg_hat, b.z_bg, comp_hat)
    loss = l_reg + cfg.lambda_comp * l_comp
    return loss, {"loss_reg": l_reg.item(), "loss_comp": l_comp.item()}


def main(cfg: TrainConfig, callback: Callable[[int, dict, object], None] | None = None) -> TrainResult:
    # DDP and the alternating phases: DDP registers (and all-reduces) only the parameters that require grad when
    # `prepare` wraps the model, so the union of both phases' parameters is made trainable before it (below). In a
    # step, the other phase's parameters are switched off (requires_grad False): they are not in the autograd graph,
    # so without find_unused_parameters DDP would wait forever for their gradients ("Expected to have finished
    # reduction"). With it, DDP marks them unused; a parameter unused on every process keeps grad None after the
    # all-reduce (it is not given a zero gradient), so AdamW skips it: no weight decay, no momentum step off-phase.
    accelerator = make_accelerator(cfg, [DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    device, dtype = accelerator.device, weight_dtype(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    datasets = {
        "real": ManifestDataset(cfg.pairs_dir, "pair", cfg.resolution),
        "reg": ManifestDataset(cfg.triplets_dir, "triplet", cfg.resolution),
    }
    bad = [(f"{phase}:{n}", r) for phase, ds in datasets.items() for n, r in ds.bad]
    echo_config(accelerator, cfg, "stage 2", {k: len(v) for k, v in datasets.items()}, bad=bad)
    texts = TextEmbeddingCache(cfg.text_cache_dir or out / "text_cache")
    with accelerator.main_process_first():
        captions = [e["caption"] for ds in datasets.values() for e in ds.entries]
        texts.prepare(captions, cfg.text_encoders or cfg.flux_fill, cfg.max_sequence_length)
    encoder = LatentEncoder(cfg.vae or str(Path(cfg.flux_fill) / "vae"), cfg.rgba_vae, device, dtype)

    model = load_dual_model(cfg, device, dtype)
    noise_mode = model.config.noise
    phase_groups = {k: v if cfg.train_joint else v - {"joint"} for k, v in PHASE_GROUPS.items()}
    all_groups = phase_groups["real"] | phase_groups["reg"]
    phase_params = {phase: set_phase_trainable(model, groups) for phase, groups in phase_groups.items()}
    logger.info("trainable: %s", {k: f"{sum(p.numel() for p in v) / 1e6:.2f} M" for k, v in phase_params.items()})
    params = set_phase_trainable(model, all_groups)  # last before prepare: DDP registers both phases' parameters
    named = named_trainables(model, all_groups)
    phi = load_frozen_phi(cfg.phi, device, dtype)
    optimizer = make_optimizer(params, cfg)  # one optimiser; a phase's step skips parameters whose grad is None
    lr_scheduler = make_lr_scheduler(optimizer, cfg, accelerator)
    register_hooks(accelerator)
    unwrapped = model
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("bfs_stage2")

    start = resume_step(accelerator, cfg)
    done = phase_batches_done(start)
    batches = {}
    for name, ds in datasets.items():  # each phase's data order goes on from the micro-batches it took
        seed, drawn = cfg.seed + (0 if name == "real" else 1), done[name] * cfg.gradient_accumulation_steps
        batches[name] = iter(make_loader(ds, cfg.batch_size, seed, drawn, accelerator, cfg.num_workers))
    val_batch = None
    if cfg.validation_steps:
        val_batch = validation_batch(datasets["real"], cfg, encoder, texts, device, dtype, surrogate=True)
    loss_fns = {"real": real_loss, "reg": reg_loss}

    def make_phase(name: str) -> Phase:
        """L_real or L_reg; `begin` gives only this phase's parameters gradients (see `main`'s first comment)."""
        return Phase(
            name=name,
            next_batch=lambda _step, _micro: encode_batch(
                next(batches[name]), encoder, texts, cfg, device, dtype, surrogate=name == "real"
            ),
            loss=lambda b: loss_fns[name](model, phi, b, cfg, device, noise_mode, accelerator),
            params=phase_params[name],
            begin=lambda: set_phase_trainable(unwrapped, phase_groups[name]),
        )

    phases = {name: make_phase(name) for name in PHASE_GROUPS}
    losses = train(
        accelerator,
        cfg,
        model,
        optimizer,
        lr_scheduler,
        lambda step: phases[phase_of(step)],
        start_step=start,
        trainables=named,
        stage="stage2",
        validate=lambda at: write_samples(accelerator, unwrapped, val_batch, encoder, cfg, at),
        callback=callback,
    )

    final = out / cfg.output_name
    if accelerator.is_main_process:
        save_weights(unwrapped, final)
    return finish(accelerator, "stage 2", final, losses, start)
