"""Outpaint-and-Remove decomposition training (paper §3.5, §4.1): flow matching on both layer sequences.

    python -m training decompose --config training/configs/decompose.yaml [--key=value ...]
    accelerate launch --config_file training/accelerate/multi_gpu.yaml -m training decompose --config ...

Data: a `triplet` dataset with masks (`python -m training decompose-data`): composite C, target foreground F (RGBA,
complete), background B (scene without F), visible mask M. Every batch spoils M (`imperfect_mask`: dilated, eroded,
jittered), as the paper trains on imperfect masks. Contexts: background = latent of C·(1 − M) + M, foreground =
latent of C·M + M, multi-modal = Canny edges of C (+ depth / segmentation when their local models are given), fused.
Loss: L = ‖v̂_B − (noise_B − z_B)‖² + ‖v̂_F − (noise_F − z_F)‖² at one sigma per sample (time convention:
training/losses.py). Trainable: both per-layer LoRAs (r = 256), the joint module, the grown input projection and the
fusion module; Flux-Fill stays frozen. Checkpoints hold only those weights, in the nodes' format.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from bfs_core.conditioning import canny_edges, estimate_depth, estimate_segmentation
from bfs_core.models.layer_decomposition import (
    FILL_CONTEXT_CHANNELS,
    TRAINABLE_GROUPS,
    DecompositionConfig,
    LayerDecomposition,
    initial_decomposition_model,
    read_decomposition_weights,
    save_decomposition_weights,
)
from bfs_core.sampling.flow_match import fill_condition, latent_image_ids, pack_latents

from .common import (
    CommonConfig,
    LatentEncoder,
    TextEmbeddingCache,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    randn_rows,
    resume_step,
    sample_sigmas,
    weight_dtype,
)
from .data import ManifestDataset, load_image, make_loader
from .decomposition_data import imperfect_mask
from .loop import Phase, TrainResult, echo_config, finish, train
from .losses import flow_matching_loss, noisy_latents


logger = logging.getLogger(__name__)

WEIGHTS_NAME = "decomposition_weights.safetensors"


@dataclass
class TrainConfig(CommonConfig):
    """Outpaint-and-Remove. Besides CommonConfig fields:"""

    data_dir: str = ""  # `triplet` dataset with masks (python -m training decompose-data)
    flux_fill: str = ""  # FLUX.1-Fill-dev: diffusers root (transformer/, vae/, text encoders) or a single file
    vae: str | None = None  # Flux VAE folder; default <flux_fill>/vae
    text_encoders: str | None = None  # default <flux_fill>
    rgba_vae: str = ""  # RGBA VAE: its encoder gives the foreground latents
    lora_rank: int = 256  # paper default; 128 / 1024 are its ablations
    decomposition_overrides: dict = field(default_factory=dict)  # other DecompositionConfig fields
    depth_model: str | None = None  # local transformers depth model (Depth-Anything-V2); None = no depth context
    segmentation_model: str | None = None  # local transformers segmentation model (SegFormer); None = none
    edges: bool = True  # Canny edge context
    mask_dilate_px: int = 8  # imperfect masks: max dilation (pixels at `resolution`)
    mask_erode_px: int = 4  # max erosion
    mask_jitter_px: int = 4  # max shift
    mask_spoil_probability: float = 0.8  # fraction of samples whose mask is spoiled
    guidance: float = 30.0
    max_sequence_length: int = 512
    text_cache_dir: str | None = None
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    output_name: str = "decomposition.safetensors"
    maps_from_data: bool = False  # read `segmentation` / `depth` images from the manifest (the toy world's maps)
    foreground_context: bool = True  # False: the foreground sequence gets no image-mask context (an ablation)
    trainable_groups: list[str] | None = None  # None = all of TRAINABLE_GROUPS; e.g. drop "joint" (an ablation)
    cache_latents: bool = False  # encode each sample's targets / query / maps once (data without random crops)


def decomposition_config(cfg: TrainConfig) -> DecompositionConfig:
    return DecompositionConfig(
        **{**dataclasses.asdict(DecompositionConfig()), "lora_rank": cfg.lora_rank, **cfg.decomposition_overrides}
    )


def known_modalities(cfg: TrainConfig) -> tuple[str, ...]:
    """The modalities the model's fusion module takes (a config without any is the "w/o fusion" ablation)."""
    return decomposition_config(cfg).modalities


def load_model(cfg: TrainConfig, device, dtype) -> LayerDecomposition:
    """Frozen Flux-Fill in `dtype`, decomposition parameters fresh (identity at start) and in fp32."""
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer

    transformer = load_flux_fill_transformer(cfg.flux_fill, torch_dtype=dtype, device=device).requires_grad_(False)
    model = initial_decomposition_model(transformer, decomposition_config(cfg))
    params = model.set_trainable(set(cfg.trainable_groups) if cfg.trainable_groups is not None else TRAINABLE_GROUPS)
    for param in params:
        param.data = param.data.float()  # trainables stay fp32 (STYLE: Training)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model.train()
    return model


def register_hooks(accelerator: Accelerator) -> None:
    """Checkpoints hold only the trainable weights (the nodes' format); loading checks the key set exactly."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_decomposition_weights(accelerator.unwrap_model(model), Path(output_dir) / WEIGHTS_NAME)  # atomic
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            _, tensors = read_decomposition_weights(Path(input_dir) / WEIGHTS_NAME)
            if set(tensors) != set(model.trainable_state_dict()):
                raise ValueError(f"{input_dir}: checkpoint keys do not match this model's trainable parameters.")
            model.load_state_dict(tensors, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


MAP_KEYS = ("segmentation", "depth")


class DecompositionDataset(ManifestDataset):
    """A `triplet` dataset with masks; with `maps=True` also each entry's `segmentation` / `depth` images (RGB),
    cropped like the sample's other images (the toy world writes exact maps: bfs_core/toy/decomposition.py)."""

    def __init__(self, root, resolution: int, maps: bool = False):
        super().__init__(root, "triplet", resolution)
        self.maps = maps
        if maps:
            missing = [e["name"] for e in self.entries if not all(e.get(k) for k in MAP_KEYS)]
            if missing:
                raise ValueError(
                    f"`maps_from_data` needs `segmentation` and `depth` in every entry of {self.root}/manifest.jsonl, "
                    f"but {len(missing)} lack them (first {missing[:3]}). Set maps_from_data: false or add the maps."
                )

    def _load(self, entry: dict) -> dict:
        item = super()._load(entry)
        if self.maps:
            window = self._window(entry)
            for key in MAP_KEYS:
                item[key] = load_image(self.root / entry[key], 3, self.resolution, window)
        return item


@dataclass
class Batch:
    """Packed targets [N, L, 64], condition [N, L, 640] (+ fused later), modality tokens, text, ids."""

    z_bg: torch.Tensor
    z_fg: torch.Tensor
    condition: torch.Tensor
    query: torch.Tensor
    modalities: dict[str, torch.Tensor]
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor


def spoil_masks(masks: torch.Tensor, cfg: TrainConfig, seeds: list[int]) -> torch.Tensor:
    """`imperfect_mask` per sample, each with its own generator seeded by `seeds[i]`."""
    spoil = (cfg.mask_dilate_px, cfg.mask_erode_px, cfg.mask_jitter_px, cfg.mask_spoil_probability)
    return torch.cat([imperfect_mask(m[None], torch.Generator().manual_seed(s), *spoil) for m, s in zip(masks, seeds)])


def mask_seeds(cfg: TrainConfig, step: int, micro: int, batch_size: int, accelerator) -> list[int]:
    """Seeds of this process's samples in micro-batch `micro` of optimiser step `step` (0-based).

    A function of the sample's row in the global batch (process r holds rows r, r + P, …, as the noise draws in
    training/common.py), so a resumed run, and a run on any number of processes, spoils each sample alike."""
    processes = accelerator.num_processes
    first = micro * batch_size * processes + accelerator.process_index
    rows = range(first, first + batch_size * processes, processes)
    return [cfg.seed * 1_000_000_007 + step * 65_536 + row for row in rows]


def _fixed_latents(raw: dict, composite: torch.Tensor, maps: dict, encoder: LatentEncoder, device) -> dict:
    """The batch's latents that do not depend on the spoiled mask: targets, the image query and every modality."""
    return {
        "z_bg": pack_latents(encoder.rgb(raw["background"].to(device))),
        "z_fg": pack_latents(encoder.rgba_latent(raw["foreground"].to(device))),
        "query": pack_latents(encoder.rgb(composite)),
        **{f"map_{k}": pack_latents(encoder.rgb(v)) for k, v in maps.items()},
    }


@torch.no_grad()
def encode_batch(
    raw: dict,
    encoder: LatentEncoder,
    texts,
    cfg: TrainConfig,
    seeds: list[int],
    device,
    dtype,
    cache: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Batch:
    """One training batch. With `cache` (sample name -> its fixed latents; `cache_latents`), each sample's targets,
    query and modality latents are encoded once; only the two contexts (which see the spoiled mask) every time."""
    composite = raw["composite"].to(device)
    mask = spoil_masks(raw["mask"], cfg, seeds).to(device)
    z_bg_ctx, z_fg_ctx = encoder.rgb(composite * (1 - mask)), encoder.rgb(composite * mask)
    names = list(raw["name"]) if cache is not None else []
    if cache is not None and all(n in cache for n in names):
        fixed = {k: torch.stack([cache[n][k] for n in names]) for k in cache[names[0]]}
    else:
        maps = {}
        if cfg.edges:
            maps["edge"] = canny_edges(composite)
        if cfg.maps_from_data:
            maps.update({k: raw[k].to(device) for k in MAP_KEYS})
        if cfg.depth_model:
            maps["depth"] = estimate_depth(composite, cfg.depth_model)  # loaded once, runs on `device` (the images')
        if cfg.segmentation_model:
            maps["segmentation"] = estimate_segmentation(composite, cfg.segmentation_model)
        maps = {k: v for k, v in maps.items() if k in known_modalities(cfg)}
        fixed = _fixed_latents(raw, composite, maps, encoder, device)
        if cache is not None:
            for i, n in enumerate(names):
                cache[n] = {k: v[i] for k, v in fixed.items()}
    embeds, pooled = texts.get(list(raw["caption"]), cfg.max_sequence_length, device, dtype)
    h, w = z_bg_ctx.shape[-2:]
    condition = torch.cat([fill_condition(z_bg_ctx, mask), fill_condition(z_fg_ctx, mask)], -1)
    if not cfg.foreground_context:  # [N, L, bg 320 | fg 320]: the foreground's image-mask context is zeroed
        condition[..., FILL_CONTEXT_CHANNELS:] = 0
    return Batch(
        z_bg=fixed["z_bg"],
        z_fg=fixed["z_fg"],
        condition=condition,
        query=fixed["query"],
        modalities={k.removeprefix("map_"): v for k, v in fixed.items() if k.startswith("map_")},
        prompt_embeds=embeds,
        pooled=pooled,
        img_ids=latent_image_ids(h, w, device=device, dtype=dtype),
    )


def decomposition_loss(model, b: Batch, cfg: TrainConfig, device, accelerator=None):
    """Flow-matching loss on both sequences (the fusion module is trained through the condition).

    `model` is what `accelerator.prepare` returned: the velocity forward must run through it, as DDP all-reduces
    only the gradients of a forward it ran (calling the unwrapped model trains each process on its own)."""
    core: LayerDecomposition = model if accelerator is None else accelerator.unwrap_model(model)
    sigma, weight = sample_sigmas(
        b.z_bg.shape[0], cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, device, accelerator
    )
    noise_bg = randn_rows(b.z_bg, accelerator)
    noise_fg = noise_bg if core.config.noise == "shared" else randn_rows(b.z_fg, accelerator)
    x_bg, x_fg = noisy_latents(b.z_bg, noise_bg, sigma), noisy_latents(b.z_fg, noise_fg, sigma)
    # The fusion module runs outside DDP's forward; its gradients are still all-reduced, because DDP's hooks sit
    # on every registered parameter and the backward of this same loss reaches them.
    fused = core.fuse(b.modalities, b.query, b.img_ids)
    condition = torch.cat([b.condition.to(fused.dtype), fused], -1)
    v_bg, v_fg = model(x_bg, x_fg, condition, b.prompt_embeds, b.pooled, sigma, sigma, b.img_ids, cfg.guidance)
    l_bg = flow_matching_loss(v_bg, noise_bg, b.z_bg, weight)  # ‖(noise − z) − v̂‖², see training/losses.py
    l_fg = flow_matching_loss(v_fg, noise_fg, b.z_fg, weight)
    return l_bg + l_fg, {"loss_bg": l_bg.item(), "loss_fg": l_fg.item()}


def main(cfg: TrainConfig, callback: Callable[[int, dict, object], None] | None = None) -> TrainResult:
    dataset = DecompositionDataset(cfg.data_dir, cfg.resolution, cfg.maps_from_data)  # bad data fails before setup
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    device, dtype = accelerator.device, weight_dtype(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    echo_config(accelerator, cfg, "decompose", {"samples": len(dataset)})
    texts = TextEmbeddingCache(cfg.text_cache_dir or out / "text_cache")
    with accelerator.main_process_first():
        texts.prepare(
            [e["caption"] for e in dataset.entries], cfg.text_encoders or cfg.flux_fill, cfg.max_sequence_length
        )
    encoder = LatentEncoder(cfg.vae or str(Path(cfg.flux_fill) / "vae"), cfg.rgba_vae, device, dtype)

    model = load_model(cfg, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("trainable: %d tensors, %.2f M parameters", len(params), sum(p.numel() for p in params) / 1e6)
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg, accelerator)
    register_hooks(accelerator)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("decompose")

    start = resume_step(accelerator, cfg)
    drawn = start * cfg.gradient_accumulation_steps  # micro-batches the resumed steps took: the data order goes on
    batches = iter(make_loader(dataset, cfg.batch_size, cfg.seed, drawn, accelerator, cfg.num_workers))

    cache = {} if cfg.cache_latents else None

    def next_batch(step: int, micro: int) -> Batch:
        # Mask spoiling is seeded by step and sample, so a resumed run spoils exactly as an uninterrupted one.
        seeds = mask_seeds(cfg, step, micro, cfg.batch_size, accelerator)
        return encode_batch(next(batches), encoder, texts, cfg, seeds, device, dtype, cache)

    phase = Phase(next_batch, loss=lambda b: decomposition_loss(model, b, cfg, device, accelerator), params=params)
    losses = train(
        accelerator,
        cfg,
        model,
        optimizer,
        lr_scheduler,
        phase,
        start_step=start,
        trainables=named,
        stage="decompose",
        callback=callback,
    )

    final = out / cfg.output_name
    if accelerator.is_main_process:
        save_decomposition_weights(accelerator.unwrap_model(model), final)  # atomic (bfs_core/atomic.py)
    return finish(accelerator, "decompose", final, losses, start)


__all__ = ["TrainConfig", "TrainResult", "main"]
