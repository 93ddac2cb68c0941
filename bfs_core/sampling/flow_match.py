"""Flow-matching Euler sampling for the dual-branch model, plus the Flux-Fill latent/mask packing it needs.

Time convention (stated once, used everywhere in this pack): the scheduler's. sigma = 1 is pure noise and sigma = 0 is
clean data; x_sigma = (1 − sigma)·x0 + sigma·noise, and the model predicts v = noise − x0. The paper writes the same
interpolation with t = 1 − sigma (eq. 5: t = 1 is data), and its "t = 0 composite branch" in eq. 9 / extraction means
the clean latent, i.e. sigma = 0 here. The transformer receives sigma (diffusers multiplies it by 1000 inside).

Modes:
- `bg2fg`: both branches start from noise and are integrated together (one scheduler over the 2N rows).
- `extract_fg`: the composite branch is fed the clean composite latent at sigma = 0 at every step; only the foreground
  branch is integrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..finite import check_branch_finite, check_finite
from .step_cache import step_cache


InterruptCheck = Callable[[], bool | None]


class SamplingInterrupted(RuntimeError):
    """Raised when the caller's interrupt check returns True."""


# ---------------------------------------------------------------------------------------------------------------------
# Packing (Flux's 2×2 patchify) and the Fill conditioning


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], channel order (c, py, px) as diffusers' Flux pipelines."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Latent height and width must be even to pack 2×2 but got {h}×{w}.")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] for latent size h × w (the inverse of `pack_latents`)."""
    b, length, c4 = packed.shape
    if length != (height // 2) * (width // 2):
        raise ValueError(f"Packed latents have {length} tokens, which does not fit a {height}×{width} latent.")
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, c4 // 4, height, width)


def pack_mask(mask: torch.Tensor, vae_scale: int = 8) -> torch.Tensor:
    """Binary pixel mask [B, 1, H, W] (1 = region to fill) -> [B, L, vae_scale² · 4] Fill mask tokens.

    Each 8×8 pixel cell becomes 64 channels (space-to-depth), then the 2×2 latent patchify gives 256 channels.
    """
    b, _, height, width = mask.shape
    h, w = height // vae_scale, width // vae_scale
    if h * vae_scale != height or w * vae_scale != width:
        raise ValueError(f"Mask size {height}×{width} must be a multiple of {vae_scale}.")
    m = mask[:, 0].reshape(b, h, vae_scale, w, vae_scale).permute(0, 2, 4, 1, 3)  # [B, 8, 8, h, w]
    return pack_latents(m.reshape(b, vae_scale * vae_scale, h, w))


def latent_image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] with columns (0, row, col) of the packed token grid."""
    rows = torch.arange(latent_height // 2, device=device).repeat_interleave(latent_width // 2)
    cols = torch.arange(latent_width // 2, device=device).repeat(latent_height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


def fill_condition(image_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flux-Fill conditioning tokens: normalised image latents [B,16,h,w] + pixel mask [B,1,8h,8w] -> [B,L,320]."""
    return torch.cat([pack_latents(image_latents), pack_mask(mask.to(image_latents.dtype))], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler


def time_shift_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """Flux's resolution-dependent shift: mu linear in the number of image tokens."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - base_len * slope


def make_scheduler(scheduler_config: dict, steps: int, image_seq_len: int, device) -> FlowMatchEulerDiscreteScheduler:
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1 but got {steps}.")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    mu = time_shift_mu(image_seq_len, scheduler_config) if scheduler.config.use_dynamic_shifting else None
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    return scheduler


# ---------------------------------------------------------------------------------------------------------------------
# The denoise loop


@dataclass
class DenoiseStep:
    """What the step callback receives after each step: both branches, packed [N, L, 64], and their clean estimates.

    `comp_x0` / `fg_x0` are the flow-matching x0 predictions of the step just taken, x0 = x_sigma − sigma·v, from the
    latents the model saw at `sigma` and its velocity (float32); a sampler's live preview shows them. In `extract_fg`
    the composite branch is the clean input, so `comp_x0` is that input.
    """

    comp: torch.Tensor  # the latents after the step
    fg: torch.Tensor
    comp_x0: torch.Tensor
    fg_x0: torch.Tensor
    sigma: float  # the fg branch's sigma at this step (the composite's too in bg2fg)
    latent_size: tuple[int, int]  # (h, w) of the unpacked latent: `unpack_latents(x, *latent_size)`

    def unpacked_x0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(comp_x0, fg_x0) as [N, C, h, w] latents."""
        return unpack_latents(self.comp_x0, *self.latent_size), unpack_latents(self.fg_x0, *self.latent_size)


StepCallback = Callable[[int, int, DenoiseStep], None]


@dataclass
class DualSample:
    """Packed final latents of both branches, [N, L, 64] each (comp is the clean input in `extract_fg`)."""

    comp: torch.Tensor
    fg: torch.Tensor
    transformer_calls: int = 0  # transformer calls made (one per step)
    full_evaluations: int = 0  # calls that ran every block (fewer than the calls with step caching)


def initial_noise(
    shape: tuple[int, int, int],
    noise: Literal["independent", "shared"],
    generator: torch.Generator | None,
    device,
    dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise for both branches, [N, L, 64] each: one [2N, ...] draw (release) or one draw used twice (paper)."""
    n = shape[0]
    gen_device = generator.device if generator is not None else device
    if noise == "shared":
        z = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
        return z, z.clone()
    z = torch.randn((2 * n, *shape[1:]), generator=generator, device=gen_device, dtype=dtype).to(device)
    return z[:n], z[n:]


@torch.no_grad()
def sample_dual(
    model,
    *,
    fill_cond: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    img_ids: torch.Tensor,
    scheduler_config: dict,
    mode: Literal["bg2fg", "extract_fg"] = "bg2fg",
    comp_clean: torch.Tensor | None = None,
    steps: int = 50,
    guidance: float = 30.0,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    interrupt: InterruptCheck | None = None,
    cache_threshold: float = 0.0,
) -> DualSample:
    """Integrate the dual-branch flow with Euler steps from sigma = 1 to 0.

    Args:
        model: a `DualBranchFlux` (or anything with its call signature and `config.noise`, `dtype`, `device`).
        fill_cond: [N, L, 320] Fill conditioning; prompt_embeds [N, T, J]; pooled [N, P]; img_ids [L, 3].
        scheduler_config: a FlowMatchEulerDiscreteScheduler config (the shipped Flux-Fill one).
        mode: `bg2fg` or `extract_fg` (then `comp_clean` [N, L, 64], the packed clean composite latent, is required).
        steps, guidance: 50 and 30 as the paper.
        noise: explicit starting noise (comp, fg), else drawn from `generator` as `model.config.noise` says.
        callback: called as `callback(step_index, steps, DenoiseStep)` after every step (latents and x0 estimates).
        interrupt: called before every step; returning True (or raising) stops sampling.
        cache_threshold: step caching (`step_cache.py`: First-Block-Cache, both branches decide together); 0 = exact.

    Raises:
        NonFiniteInputError: an input holds NaN/inf (named).
        NonFiniteSamplingError: a branch became NaN/inf; the message names the step (1-based) and the branch.
    """
    if mode not in ("bg2fg", "extract_fg"):
        raise ValueError(f"`mode` must be 'bg2fg' or 'extract_fg' but got {mode!r}.")
    for name, value in (
        ("fill_cond", fill_cond),
        ("prompt_embeds", prompt_embeds),
        ("pooled", pooled),
        ("comp_clean", comp_clean),
    ):
        check_finite(name, value)
    for name, value in zip(("noise (comp)", "noise (fg)"), noise or ()):
        check_finite(name, value)
    n, length, _ = fill_cond.shape
    shape = (n, length, model.latent_channels)
    if mode == "extract_fg":
        if comp_clean is None or comp_clean.shape != shape:
            got = None if comp_clean is None else list(comp_clean.shape)
            raise ValueError(
                f"`comp_clean` (the packed composite latent) must be {list(shape)} in extract_fg mode but got {got}."
            )
    dtype, device = model.dtype, model.device
    if noise is None:
        noise = initial_noise(shape, model.config.noise, generator, device, dtype)
    comp, fg = (t.to(device=device, dtype=dtype) for t in noise)
    if mode == "extract_fg":
        comp = comp_clean.to(device=device, dtype=dtype)

    scheduler = make_scheduler(scheduler_config, steps, length, device)
    with step_cache(model, cache_threshold) as cache_stats:
        comp, fg = _denoise(
            model, scheduler, mode, comp, fg, fill_cond, prompt_embeds, pooled, img_ids, guidance, callback, interrupt
        )
    return DualSample(
        comp=comp, fg=fg, transformer_calls=cache_stats.calls, full_evaluations=cache_stats.full_evaluations
    )


def _denoise(
    model, scheduler, mode, comp, fg, fill_cond, prompt_embeds, pooled, img_ids, guidance, callback, interrupt
) -> tuple[torch.Tensor, torch.Tensor]:
    n, dtype = comp.shape[0], model.dtype
    total = len(scheduler.timesteps)
    latent_size = (2 * (int(img_ids[:, 1].max()) + 1), 2 * (int(img_ids[:, 2].max()) + 1))  # ids are packed (row, col)
    for i, t in enumerate(scheduler.timesteps):
        if interrupt is not None and interrupt():
            raise SamplingInterrupted(f"Sampling interrupted at step {i} of {total}.")
        # As FluxFillPipeline: sigma = t / 1000, rounded in the latent dtype.
        sigma = t.expand(n).to(dtype) / 1000
        step_sigma = float(scheduler.sigmas[i])  # the sigma the Euler step uses (float32, as the scheduler)
        if mode == "bg2fg":
            v_comp, v_fg = model(comp, fg, fill_cond, prompt_embeds, pooled, sigma, sigma, img_ids, guidance)
            comp_x0, fg_x0 = comp.float() - step_sigma * v_comp.float(), fg.float() - step_sigma * v_fg.float()
            both = scheduler.step(torch.cat([v_comp, v_fg]), t, torch.cat([comp, fg]), return_dict=False)[0]
            comp, fg = both[:n], both[n:]
            check_branch_finite("comp", comp, i + 1, total)
        else:
            _, v_fg = model(
                comp, fg, fill_cond, prompt_embeds, pooled, torch.zeros_like(sigma), sigma, img_ids, guidance
            )
            comp_x0, fg_x0 = comp.float(), fg.float() - step_sigma * v_fg.float()
            fg = scheduler.step(v_fg, t, fg, return_dict=False)[0]
        check_branch_finite("fg", fg, i + 1, total)
        if callback is not None:
            callback(i, total, DenoiseStep(comp, fg, comp_x0, fg_x0, step_sigma, latent_size))
    return comp, fg
