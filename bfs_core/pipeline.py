"""BFS inference on images: resize to the processing size, encode, sample both branches, decode, map back.

Image convention in `bfs_core`: float tensors [B, C, H, W] in [0, 1] (ComfyUI's [B, H, W, C] IMAGE is converted by the
nodes). Masks: [B, 1, H, W], 1 = the region where the foreground goes; binarised at 0.5.
Latent convention: *normalised* Flux latents [B, 16, H/8, W/8] = (raw − shift_factor) · scaling_factor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .finite import check_finite
from .models.dual_flux import DualBranchFlux
from .sampling.flow_match import (
    InterruptCheck,
    StepCallback,
    fill_condition,
    latent_image_ids,
    pack_latents,
    sample_dual,
    unpack_latents,
)


logger = logging.getLogger(__name__)

# The RGBA decoders need sizes that are multiples of 64; Flux itself needs 16.
SIZE_MULTIPLE = 64


def processing_size(width: int, height: int, short_side: int = 512, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(W, H) the model runs at: short side -> `short_side` (never upscaled), each side rounded up to `multiple`.

    Follows the release's `resize_by_short_side`: the long side is scaled by the same factor and truncated, then both
    sides are rounded up independently (a slight non-uniform stretch that the final resize undoes). `short_side=0`
    keeps the input size (only rounding).
    """
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be positive but got {width}×{height}.")
    if short_side < 0 or (short_side and short_side % multiple):
        raise ValueError(f"`short_side` must be 0 or a multiple of {multiple} but got {short_side}.")
    short = min(width, height)
    if short_side and short > short_side:
        if width <= height:
            width, height = short_side, int(height * short_side / width)
        else:
            width, height = int(width * short_side / height), short_side
    return math.ceil(width / multiple) * multiple, math.ceil(height / multiple) * multiple


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of [B, C, H, W] to (W, H), clamped to [0, 1]."""
    width, height = size
    if images.shape[-2:] == (height, width):
        return images
    out = F.interpolate(images.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1).to(images.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    if mask.shape[-2:] == (height, width):
        return mask
    return F.interpolate(mask.float(), size=(height, width), mode="nearest-exact").to(mask.dtype)


def _check_images(name: str, images: torch.Tensor, channels: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"`{name}` must be a [B, {channels}, H, W] tensor but got shape {list(images.shape)}.")
    check_finite(name, images)
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"`{name}` values must be in [0, 1] but range over [{images.min():.3f}, {images.max():.3f}].")


class DiffusersFluxVAE:
    """The Flux VAE (a diffusers `AutoencoderKL`) as the pipeline's image codec.

    Any object with these two methods can stand in (the ComfyUI nodes wrap ComfyUI's own VAE this way):
    `encode_images([B, 3, H, W] in [0, 1]) -> normalised latents [B, 16, H/8, W/8]` and the inverse `decode_latents`.
    """

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Uses the posterior mean (the release draws a posterior sample from the global RNG instead): deterministic,
        so the seed drives only the sampling noise, and the best clean-latent estimate for extraction."""
        vae = self.vae
        x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
        raw = vae.encode(x).latent_dist.mode()
        return (raw - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        raw = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(raw).sample.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class LayerResult:
    """What one BG2FG or extraction call gives back.

    fg_latent / comp_latent: normalised Flux latents at the processing size, [N, 16, h, w].
    composite: the composite branch decoded with the Flux VAE and resized back to the input size, [N, 3, H0, W0].
    processing_size / original_size: (W, H) of the model run and of the inputs.
    transformer_calls / full_evaluations: transformer calls made, and how many ran every block (step caching).
    """

    fg_latent: torch.Tensor
    comp_latent: torch.Tensor
    composite: torch.Tensor
    processing_size: tuple[int, int]
    original_size: tuple[int, int]
    transformer_calls: int = 0
    full_evaluations: int = 0


class BFSPipeline:
    """BFS BG2FG synthesis and foreground extraction around a `DualBranchFlux` and the Flux VAE.

    Args:
        model: the dual-branch transformer.
        codec: the Flux VAE as an image codec (`DiffusersFluxVAE`, or the nodes' wrapper of ComfyUI's VAE).
        scheduler_config: FlowMatchEulerDiscreteScheduler config (the shipped Flux-Fill one).
        text_encoders: optional `FluxTextEncoders` for `encode_prompt`.
    """

    def __init__(self, model: DualBranchFlux, codec, scheduler_config: dict, text_encoders=None):
        self.model = model
        self.codec = codec
        self.scheduler_config = scheduler_config
        self.text_encoders = text_encoders

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised Flux latents [B, 16, H/8, W/8]."""
        return self.codec.encode_images(images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised Flux latents -> RGB [B, 3, H, W] in [0, 1]."""
        return self.codec.decode_latents(latents)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoders is None:
            raise ValueError("No text encoders were loaded; pass prompt embeddings, or load the pipeline with them.")
        return self.text_encoders.encode(prompts)

    # -- BFS ----------------------------------------------------------------------------------------------------------
    def _prepare(self, background, mask, prompt_embeds, pooled, short_side):
        _check_images("background", background, 3)
        _check_images("mask", mask, 1)
        n, _, height, width = background.shape
        if mask.shape[0] not in (1, n) or mask.shape[-2:] != background.shape[-2:]:
            raise ValueError(
                f"`mask` {list(mask.shape)} must match the background's size {height}×{width} (batch 1 or {n})."
            )
        if prompt_embeds.shape[0] not in (1, n) or pooled.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"Text conditioning batch {prompt_embeds.shape[0]} must be 1 or match the {n} images.")
        check_finite("prompt_embeds", prompt_embeds, "the text conditioning's tokens")
        check_finite("pooled", pooled, "the text conditioning's pooled vector")
        self.model.check_conditioning(prompt_embeds, pooled)
        size = processing_size(width, height, short_side)
        mask = (resize_mask(mask, size) >= 0.5).to(torch.float32).expand(n, -1, -1, -1)
        dev, dtype = self.model.device, self.model.dtype
        prompt_embeds = prompt_embeds.to(dev, dtype).expand(n, -1, -1)
        pooled = pooled.to(dev, dtype).expand(n, -1)
        return size, (width, height), mask, prompt_embeds, pooled

    def _run(
        self,
        mode,
        background,
        mask,
        prompt_embeds,
        pooled,
        composite,
        *,
        seed,
        steps,
        guidance,
        short_side,
        callback,
        interrupt,
        cache_threshold=0.0,
    ) -> LayerResult:
        size, original, mask, prompt_embeds, pooled = self._prepare(
            background, mask, prompt_embeds, pooled, short_side
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        dev, dtype = self.model.device, self.model.dtype
        bg_latents = self.encode_images(resize_images(background, size))
        h, w = bg_latents.shape[-2:]
        # The background is encoded unmasked, as the BFS release feeds it: it is the layer the object is added to.
        cond = fill_condition(bg_latents, mask.to(bg_latents.device)).to(dev, dtype)
        comp_clean = None
        if composite is not None:
            comp_clean = pack_latents(self.encode_images(resize_images(composite, size))).to(dev, dtype)
        result = sample_dual(
            self.model,
            fill_cond=cond,
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            img_ids=latent_image_ids(h, w, device=dev, dtype=dtype),
            scheduler_config=self.scheduler_config,
            mode=mode,
            comp_clean=comp_clean,
            steps=steps,
            guidance=guidance,
            generator=generator,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        comp_latent, fg_latent = unpack_latents(result.comp, h, w), unpack_latents(result.fg, h, w)
        composite_out = resize_images(self.decode_latents(comp_latent), original)
        return LayerResult(
            fg_latent=fg_latent,
            comp_latent=comp_latent,
            composite=composite_out,
            processing_size=size,
            original_size=original,
            transformer_calls=result.transformer_calls,
            full_evaluations=result.full_evaluations,
        )

    def generate(
        self,
        background: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance: float = 30.0,
        short_side: int = 512,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> LayerResult:
        """BG2FG: a foreground layer (latent) for the masked region of `background`, and the composite."""
        return self._run(
            "bg2fg",
            background,
            mask,
            prompt_embeds,
            pooled,
            None,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )

    def extract(
        self,
        composite: torch.Tensor,
        background: torch.Tensor,
        mask: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance: float = 30.0,
        short_side: int = 512,
        callback: StepCallback | None = None,
        interrupt: InterruptCheck | None = None,
        cache_threshold: float = 0.0,
    ) -> LayerResult:
        """Extract Foreground: the foreground layer (with its effects) of `composite` over `background`."""
        _check_images("composite", composite, 3)
        if composite.shape != background.shape:
            raise ValueError(
                f"`composite` {list(composite.shape)} and `background` {list(background.shape)} must "
                f"have the same shape: the composite is the background with the object added."
            )
        return self._run(
            "extract_fg",
            background,
            mask,
            prompt_embeds,
            pooled,
            composite,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} but got {name!r}.")
    return DTYPES[name]


def check_flux_vae_config(config, source: str) -> None:
    """The FLUX.1 VAE encodes RGB to 16 latent channels with a shift factor; say what a wrong VAE is instead."""
    problems = []
    if config.latent_channels != 16:
        problems.append(f"{config.latent_channels} latent channels (FLUX.1: 16)")
    if config.in_channels != 3 or config.out_channels != 3:
        problems.append(f"{config.in_channels}/{config.out_channels} in/out channels (FLUX.1: 3/3, RGB)")
    if config.get("shift_factor") is None:
        problems.append("no shift_factor (FLUX.1: 0.1159)")
    if not problems:
        return
    if config.latent_channels == 4:
        kind = "an SD1.5/SDXL-style VAE"
    elif config.in_channels == 4:
        kind = "an RGBA VAE (pass it as the RGBA VAE instead)"
    else:
        kind = "not the FLUX.1 VAE"
    from .errors import UserInputError

    raise UserInputError(
        f"{source} is {kind}: {'; '.join(problems)}. Pass the FLUX.1 VAE (the `vae/` folder of FLUX.1-Fill-dev)."
    )


def load_flux_vae(
    path: str, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", name: str = "vae"
):
    """The FLUX.1 VAE (diffusers `AutoencoderKL` folder), checked to be one; `name` is the input, named in errors."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    from .errors import UserInputError, reading_folder

    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "is a file" if folder.is_file() else "has no config.json"
        raise UserInputError(
            f"`{name}` must be the FLUX.1 VAE as a diffusers folder (config.json + diffusion_pytorch_model."
            f"safetensors) but {str(folder)!r} {what}. Pass the `vae/` folder of FLUX.1-Fill-dev."
        )
    with reading_folder(folder, name, "a diffusers AutoencoderKL folder (the FLUX.1 VAE)"):
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    check_flux_vae_config(vae.config, f"`{name}` folder {str(folder)!r}")
    return vae.to(device).eval()


def load_pipeline(
    base: str,
    bfs: str,
    *,
    vae: str | None = None,
    text_encoders: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    input_names: dict[str, str] | None = None,
) -> BFSPipeline:
    """Load everything from local files (nothing is downloaded).

    Args:
        base: FLUX.1-Fill-dev as a diffusers pipeline folder (or its `transformer/`), or a single BFL safetensors file
            (bf16 / fp8 / ComfyUI scaled fp8).
        bfs: BFS weights: the official `trained_weights.pt` (or its folder) or our `.safetensors`.
        vae: the Flux VAE folder (diffusers AutoencoderKL); defaults to `<base>/vae` when `base` is a folder.
        text_encoders: a folder with `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`; defaults to
            `base` when it holds them. Optional: without it, prompt embeddings must be given.
        input_names: how the caller names these inputs (e.g. `{"text_encoders": "--text-encoders"}`), used in every
            error message.
    """
    from pathlib import Path

    from .errors import UserInputError
    from .models.bfs_checkpoint import load_bfs
    from .models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config

    names = {"base": "base", "bfs": "bfs", "vae": "vae", "text_encoders": "text_encoders", **(input_names or {})}
    base_path = Path(base)
    for key, value in (("base", base), ("bfs", bfs), ("vae", vae), ("text_encoders", text_encoders)):
        if value is not None and not Path(value).exists():
            raise UserInputError(
                f"`{names[key]}` path {str(value)!r} does not exist; pass a local file or folder (nothing is fetched)."
            )
    vae = vae or (str(base_path / "vae") if (base_path / "vae").is_dir() else None)
    if vae is None:
        raise UserInputError(
            f"No Flux VAE given and `{names['base']}` {str(base)!r} has no `vae/` folder: pass the FLUX.1 VAE folder "
            f"as `{names['vae']}`."
        )
    if text_encoders is None and (base_path / "text_encoder_2").is_dir():
        text_encoders = base
    vae_model = load_flux_vae(vae, dtype=dtype, device=device, name=names["vae"])  # small: checked first
    transformer = load_flux_fill_transformer(base, torch_dtype=dtype, device=device, name=names["base"])
    model = load_bfs(transformer, bfs, name=names["bfs"])
    encoders = None
    if text_encoders is not None:
        from .text_encoders import FluxTextEncoders

        encoders = FluxTextEncoders.from_pretrained(
            text_encoders, torch_dtype=dtype, device=device, name=names["text_encoders"]
        )
    scheduler_file = base_path / "scheduler" / "scheduler_config.json"
    scheduler_config = load_shipped_config("flux_fill_scheduler")
    if scheduler_file.is_file():
        import json

        scheduler_config = {**scheduler_config, **json.loads(scheduler_file.read_text())}
    return BFSPipeline(model, DiffusersFluxVAE(vae_model), scheduler_config, encoders)
