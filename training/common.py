"""What the trainers share besides the loop (training/loop.py): config fields, accelerate setup, optimiser, random
draws, checkpoints, encoders, logging, grids.

Checkpoint layout (`<output_dir>/checkpoints/checkpoint-<step>/`): the trainable weights only
(`bfs_weights.safetensors` in the node format, or `phi.safetensors`), accelerate's `optimizer.bin`, `scheduler.bin`
and `random_states_*.pkl` (torch, numpy, python and CUDA RNG), and `trainer_state.json` (the step counter that fixes
the data order). A checkpoint is written to `checkpoint-<step>.tmp` and renamed when complete
(`bfs_core.atomic.atomic_dir`), so a kill never leaves a half checkpoint that `resume` would pick; the oldest complete
ones beyond `checkpoints_total_limit` are deleted. Every other file a trainer writes goes through `bfs_core/atomic.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from bfs_core.atomic import atomic_dir, atomic_path


logger = logging.getLogger(__name__)


@dataclass
class CommonConfig:
    """Fields every trainer has. The trainers' own dataclasses add their data and model paths."""

    output_dir: str = "runs/bfs"  # checkpoints, samples, logs and the final weights go here
    seed: int = 0  # seeds weights, noise, timesteps and the data order
    resolution: int = 512  # training images are resized to resolution × resolution (Tab. A1: 512)
    batch_size: int = 8  # per process; effective batch = batch_size × gradient_accumulation_steps × processes
    gradient_accumulation_steps: int = 1
    max_steps: int = 3000  # optimiser steps
    learning_rate: float = 8e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # adamw8bit falls back to AdamW without bitsandbytes
    lr_scheduler: str = "cosine_with_restarts"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1  # restarts of cosine_with_restarts
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # frozen weights in this dtype; trainables stay fp32
    gradient_checkpointing: bool = True
    checkpointing_steps: int = 500  # save a resumable checkpoint every this many steps (and at the end)
    checkpoints_total_limit: int | None = 3  # keep this many newest checkpoints (None = all)
    resume_from_checkpoint: str | None = None  # "latest", a checkpoint folder, or None
    validation_steps: int = 250  # write a sample grid every this many steps (0 = never)
    num_validation_samples: int = 2
    validation_inference_steps: int = 28
    log_steps: int = 10  # loss-curve image every this many steps
    num_workers: int = 2  # DataLoader workers
    report_to: Literal["tensorboard", "none"] = "tensorboard"  # images/PNG are always written as well
    # Debug: after every optimiser step compare every trainable parameter across processes (rank_sync.jsonl) and
    # write process 0's trainables to rank_sync/step-<step>.safetensors (tests/test_training_ddp.py reads both).
    # It gathers all trainables from every process each step: for short runs (a full-size LoRA set is ~1 GB a step).
    debug_rank_sync: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Accelerate, optimiser, schedule


def weight_dtype(cfg: CommonConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[cfg.mixed_precision]


def make_accelerator(cfg: CommonConfig, kwargs_handlers: list | None = None) -> Accelerator:
    log_with = None
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed; writing PNG loss curves and sample grids only")
        else:
            log_with = "tensorboard"
    out = Path(cfg.output_dir)
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=kwargs_handlers or [],
    )


class PreparedView:
    """The model `accelerator.prepare` returned, called as such, with the unwrapped model's attributes readable.

    Code in bfs_core reads `.config` / `.dtype`, which DDP's wrapper does not have; but the forward must run through
    the wrapper, because DDP all-reduces only the gradients of a forward it ran itself."""

    def __init__(self, prepared: torch.nn.Module, accelerator: Accelerator):
        self._prepared, self._unwrapped = prepared, accelerator.unwrap_model(prepared)

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._unwrapped, name)


def make_optimizer(params: list[torch.nn.Parameter], cfg: CommonConfig) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            logger.warning("optimizer: bitsandbytes is not installed, so plain torch AdamW is used instead of 8-bit")
        else:
            logger.info("optimizer: bitsandbytes AdamW8bit")
            return bnb.optim.AdamW8bit(params, **kwargs)
    logger.info("optimizer: torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer, cfg: CommonConfig, accelerator: Accelerator):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles,
    )


def derived_numbers(cfg: CommonConfig, accelerator: Accelerator, dataset_sizes: dict[str, int]) -> dict:
    effective = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    return {
        "processes": accelerator.num_processes,
        "effective_batch": effective,
        **{f"samples_{k}": v for k, v in dataset_sizes.items()},
        **{f"steps_per_epoch_{k}": max(1, v // effective) for k, v in dataset_sizes.items()},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Random draws of the global batch
#
# Every process is seeded alike (`set_seed(cfg.seed)`), draws the noise and sigmas of the *global* batch and keeps its
# own rows. Process r of P holds global rows r, r + P, r + 2P, … (`ResumableSampler` deals the shuffled indices out
# that way), so a sample gets the same noise and sigma however many processes share the batch: P processes of
# batch B train exactly like one process of batch P·B (tests/test_training_ddp.py), and no two processes reuse one
# noise draw. With one process this is the plain draw, bit for bit.


def process_rows(x: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """This process's rows of a tensor drawn for the global batch (all of it without an accelerator)."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return x[accelerator.process_index :: accelerator.num_processes]


def randn_rows(like: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """`torch.randn_like(like)` for this process's rows of the global batch (see above)."""
    processes = 1 if accelerator is None else accelerator.num_processes
    shape = (like.shape[0] * processes, *like.shape[1:])
    return process_rows(torch.randn(shape, dtype=like.dtype, device=like.device), accelerator)


# Timesteps (as diffusers' Flux LoRA trainers: density over [0, 1] -> index into the scheduler's sigmas)


def sample_sigmas(
    n: int,
    weighting_scheme: str,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    device,
    accelerator: Accelerator | None = None,
):
    """sigma [N] and the loss weights [N] for it, exactly as `train_dreambooth_lora_flux.py` draws them.

    With `accelerator`: this process's N rows of the global batch's draw (see "Random draws of the global batch").
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from bfs_core.models.flux_fill_loading import load_shipped_config

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(load_shipped_config("flux_fill_scheduler"))
    processes = 1 if accelerator is None else accelerator.num_processes
    u = compute_density_for_timestep_sampling(weighting_scheme, n * processes, logit_mean, logit_std, mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp_max(len(scheduler.sigmas) - 1)
    sigmas = process_rows(scheduler.sigmas[indices], accelerator).to(device)  # the unshifted t/1000 (Flux: dynamic)
    return sigmas, compute_loss_weighting_for_sd3(weighting_scheme, sigmas)


# ---------------------------------------------------------------------------------------------------------------------
# Debug: are the processes' trainable parameters identical? (`debug_rank_sync`)


def check_rank_sync(accelerator: Accelerator, params: dict[str, torch.Tensor], step: int, output_dir) -> dict:
    """Compare every tensor of `params` (name -> trainable parameter) across processes after optimiser step `step`.

    Appends {step, processes, tensors, numel, max_abs_diff, worst, identical} to `<output_dir>/rank_sync.jsonl`
    (`identical`: the SHA-256 of every process's parameter bytes agree) and writes process 0's parameters to
    `<output_dir>/rank_sync/step-<step>.safetensors`. Collective: every process must call it.
    """
    from accelerate.utils import gather_object

    names = sorted(params)
    flat = torch.cat([params[n].detach().float().flatten() for n in names])
    digest = hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()
    gathered = accelerator.gather(flat[None].contiguous())  # [processes, numel]
    digests = gather_object([digest])
    diff = (gathered - gathered[:1]).abs().amax(dim=0)  # [numel]
    per_tensor = [part.max().item() for part in diff.split([params[n].numel() for n in names])]
    worst = max(range(len(names)), key=per_tensor.__getitem__)
    record = {
        "step": step,
        "processes": accelerator.num_processes,
        "tensors": len(names),
        "numel": flat.numel(),
        "max_abs_diff": per_tensor[worst],
        "worst": names[worst],
        "identical": len(set(digests)) == 1,
    }
    if accelerator.is_main_process:
        out = Path(output_dir)
        (out / "rank_sync").mkdir(parents=True, exist_ok=True)
        atomic_save_file({n: params[n] for n in names}, out / "rank_sync" / f"step-{step:06d}.safetensors")
        with (out / "rank_sync.jsonl").open("a") as f:  # an append-only log, like metrics.jsonl
            f.write(json.dumps(record) + "\n")
    accelerator.wait_for_everyone()
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Frozen encoders: VAE latents and cached text embeddings


class LatentEncoder:
    """Flux VAE for RGB (normalised latents, posterior mean) and the RGBA encoder for foreground layers."""

    def __init__(self, vae_path: str, rgba_vae_path: str | None, device, dtype):
        from diffusers import AutoencoderKL

        from bfs_core.models.rgba_vae import load_rgba_decoder

        self.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        self.rgba = None
        if rgba_vae_path:
            self.rgba = load_rgba_decoder(rgba_vae_path, device=device, dtype=dtype, flux_vae=self.vae)

    @torch.no_grad()
    def rgb(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 16, H/8, W/8] normalised Flux latents (fp32)."""
        vae = self.vae
        raw = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return ((raw - vae.config.shift_factor) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def rgba_latent(self, rgba: torch.Tensor) -> torch.Tensor:
        """[N, 4, H, W] straight RGBA in [0, 1] -> [N, 16, H/8, W/8] (the foreground branch's latent space)."""
        if self.rgba is None:
            raise ValueError("`rgba_vae` is not set, but foreground layers must be encoded with the RGBA encoder.")
        return self.rgba.encode(rgba.to(self.vae.device)).float()

    @torch.no_grad()
    def decode_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        raw = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(raw).sample.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def decode_rgba(self, latents: torch.Tensor) -> torch.Tensor:
        return self.rgba.decode(latents.to(self.vae.device), rgb=self.decode_rgb(latents)).float()


class TextEmbeddingCache:
    """Flux text embeddings per caption in `<dir>/<sha1>.safetensors`; encoders are loaded only for new captions."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, caption: str, max_len: int) -> Path:
        return self.dir / f"{hashlib.sha1(f'{max_len}|{caption}'.encode()).hexdigest()}.safetensors"

    def prepare(self, captions: list[str], encoders_root: str, max_len: int, batch: int = 16) -> None:
        todo = sorted({c for c in captions if not self._path(c, max_len).is_file()})
        if not todo:
            return
        from bfs_core.text_encoders import FluxTextEncoders

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        encoders = FluxTextEncoders.from_pretrained(encoders_root, torch_dtype=dtype, device=device)
        logger.info("Encoding %d new captions into %s", len(todo), self.dir)
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            embeds, pooled = encoders.encode(chunk, max_sequence_length=max_len)
            for caption, e, p in zip(chunk, embeds, pooled):
                atomic_save_file(
                    {"prompt_embeds": e.float().cpu(), "pooled": p.float().cpu()}, self._path(caption, max_len)
                )
        del encoders

    def get(self, captions: list[str], max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = [load_file(str(self._path(c, max_len))) for c in captions]
        embeds = torch.stack([x["prompt_embeds"] for x in loaded]).to(device, dtype)  # [N, T, D]
        pooled = torch.stack([x["pooled"] for x in loaded]).to(device, dtype)  # [N, P]
        return embeds, pooled


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, rotated, resumable


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """safetensors `save_file` through `bfs_core.atomic.atomic_path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (`checkpoint-<digits>` only: never `.tmp` / `.old` leftovers of a kill)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(cfg: CommonConfig) -> Path | None:
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(cfg.output_dir)
        if not found:
            logger.info("resume_from_checkpoint=latest but %s has no checkpoint yet: starting fresh", cfg.output_dir)
        return found[-1] if found else None
    path = Path(cfg.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"{path} is not a complete training checkpoint (no trainer_state.json).")
    return path


def save_checkpoint(accelerator: Accelerator, cfg: CommonConfig, state: dict) -> Path:
    """accelerator.save_state into `checkpoint-<step>.tmp` (`atomic_dir`), add trainer_state.json, rename, rotate."""
    root = Path(cfg.output_dir) / "checkpoints"
    final = root / f"checkpoint-{state['global_step']:06d}"
    tmp = final.with_name(final.name + ".tmp")  # the folder atomic_dir fills
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_dir(final))  # renamed to `final` when this block ends without error
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own random_states_<i>.pkl into it
        accelerator.wait_for_everyone()  # … before process 0 renames the folder
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if accelerator.is_main_process:
        if cfg.checkpoints_total_limit is not None:
            for old in checkpoint_dirs(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))  # our load hook restores the trainable weights
    state = json.loads((path / "trainer_state.json").read_text())
    logger.info("Resumed from %s at step %d", path, state["global_step"])
    return state


def resume_step(accelerator: Accelerator, cfg: CommonConfig) -> int:
    """Optimiser steps already done: 0 for a fresh run, else the step of the checkpoint `cfg` resumes (now loaded)."""
    path = resolve_resume(cfg)
    return 0 if path is None else load_checkpoint(accelerator, path)["global_step"]


# ---------------------------------------------------------------------------------------------------------------------
# Things a person can look at: loss curves, sample grids


class MetricsLog:
    """metrics.jsonl + a PNG loss curve (PIL, no plotting dependency) + TensorBoard scalars when enabled."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path):
        self.accelerator = accelerator
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def draw(self) -> Path | None:
        if not self.accelerator.is_main_process or not self.path.is_file():
            return None
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        width, height, pad = 640, 360, 40
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
        finite = [r[k] for r in rows for k in keys if k in r and math.isfinite(r[k])]
        if len(rows) < 2 or not finite:
            return None
        lo, hi = min(finite), max(finite)
        s0, s1 = rows[0]["step"], max(rows[-1]["step"], rows[0]["step"] + 1)
        draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
        for i, key in enumerate(keys):
            pts = [
                (
                    pad + (r["step"] - s0) / (s1 - s0) * (width - 1.5 * pad),
                    height - pad - (r[key] - lo) / max(hi - lo, 1e-12) * (height - 1.5 * pad),
                )
                for r in rows
                if key in r and math.isfinite(r[key])
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colours[i % len(colours)], width=2)
            draw.text((pad + 5, pad // 2 + 5 + 12 * i), key, fill=colours[i % len(colours)])
        draw.text((pad, height - pad + 5), f"step {s0} … {s1}   loss {lo:.4g} … {hi:.4g}", fill="black")
        out = self.dir / "loss_curve.png"
        with atomic_path(out) as tmp:
            img.save(tmp)
        return out


def checkerboard(height: int, width: int, cell: int = 8) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    board = ((ys // cell + xs // cell) % 2).float() * 0.4 + 0.5
    return board.expand(3, height, width)


def sample_grid(columns: dict[str, torch.Tensor]) -> Image.Image:
    """Rows = samples; columns = named [N, C, H, W] images in [0, 1] (RGBA shown over a checkerboard, A as grey)."""
    tiles = []
    for images in columns.values():
        col = []
        for img in images.float().cpu():
            if img.shape[0] == 4:
                img = img[3:] * img[:3] + (1 - img[3:]) * checkerboard(*img.shape[-2:])
            col.append(img.expand(3, -1, -1))
        tiles.append(torch.stack(col))
    grid = torch.cat([torch.cat(list(col), dim=1) for col in tiles], dim=2)  # [3, N·H, K·W]
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(array)
    draw = ImageDraw.Draw(img)
    width = tiles[0].shape[-1]
    for i, name in enumerate(columns):
        draw.text((i * width + 2, 2), name, fill=(255, 0, 255))
    return img


def write_grid(accelerator: Accelerator, output_dir: str | Path, step: int, columns: dict[str, torch.Tensor]) -> Path:
    img = sample_grid(columns)
    out = Path(output_dir) / "samples" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        img.save(tmp)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("samples", np.asarray(img), step, dataformats="HWC")
    return out
