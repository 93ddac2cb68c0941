"""What the BFS nodes share: ComfyUI <-> bfs_core conversions, the model handle, progress and interrupt."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..bfs_core.finite import check_finite
from ..bfs_core.layer_math import clamp_box, mask_from_box
from ..bfs_core.sampling.step_cache import FAST_THRESHOLD


logger = logging.getLogger(__name__)

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # Flux latent normalisation (ComfyUI LATENTs hold raw VAE latents)


# -- tensors -------------------------------------------------------------------------------------------------------
def image_to_core(image: torch.Tensor, name: str, channels: tuple[int, ...] = (3,)) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, C, H, W] float in [0, 1]."""
    if image.ndim != 4 or image.shape[-1] not in channels:
        raise ValueError(
            f"`{name}` must be an IMAGE with {' or '.join(map(str, channels))} channels "
            f"([batch, height, width, channels]) but got shape {list(image.shape)}."
        )
    check_finite(name, image)  # before the clamp, which would keep NaN and hide ±inf
    return image.movedim(-1, 1).float().clamp(0, 1)


def image_from_core(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1).float().cpu()  # [B, C, H, W] -> [B, H, W, C]


def mask_to_core(mask: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """ComfyUI MASK [B, H, W] (or [H, W]) -> [B, 1, H, W]; must match the image size (W, H)."""
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or (mask.shape[2], mask.shape[1]) != tuple(size):
        raise ValueError(
            f"`{name}` must be a MASK of the image's size {size[0]}×{size[1]} but got shape "
            f"{list(mask.shape)}. Resize the mask (or draw it on this image)."
        )
    check_finite(name, mask)
    return mask[:, None].float()


# -- the region: a connected mask, or the box drawn on the node -------------------------------------------------------
def box_region(box: tuple[int, int, int, int], height: int, width: int) -> torch.Tensor:
    """(x0, y0, x1, y1) in pixels -> [H, W] mask, the box clipped to the image (Box to Mask and the box widgets)."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"The box ({x0}, {y0}, {x1}, {y1}) is empty: x1 must exceed x0 and y1 must exceed y0.")
    return mask_from_box(clamp_box(box, height, width), height, width)


def parse_box(text: str, name: str = "box") -> tuple[int, int, int, int] | None:
    """A box widget's value "x,y,w,h" (image pixels, what the node's box editor stores) -> (x0, y0, x1, y1).

    "" (nothing drawn yet) -> None."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"`{name}` must be 'x,y,w,h' (four whole numbers, image pixels) but got {text!r}. Drag a box on the "
            "node's background or type the four numbers."
        ) from None
    return x, y, x + w, y + h


def region_from_inputs(mask, box: str, size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """The region as [B, 1, H, W] masks and notes for the node: a connected `mask` wins over the drawn `box`."""
    if mask is not None:
        drawn = isinstance(box, str) and box.strip()
        note = ["A mask is connected, so it is the region: the drawn box is not used."] if drawn else []
        return mask_to_core(mask, "mask", size), note
    drawn = parse_box(box)
    if drawn is None:
        raise ValueError("No region: connect a `mask` or drag a box on the node's background (the `box` widget).")
    width, height = size
    region = box_region(drawn, height, width)
    kept = clamp_box(drawn, height, width)
    note = [] if kept == drawn else [f"The box {drawn} reaches past the {width}x{height} image: clipped to {kept}."]
    return region[None, None], note


def box_input():
    from comfy_api.latest import io  # here, not at the top, as in cache_threshold_input

    return io.String.Input(
        "box",
        default="",
        optional=True,
        tooltip="The region as 'x,y,w,h' in image pixels: drag it on the background shown in the node (move it, "
        "pull its corners) or type the numbers. Used when no mask is connected; a connected mask wins.",
    )


def background_preview(image: torch.Tensor) -> list[dict]:
    """The first background image as a temp PNG, for the box editor to draw on after a run ("the last run's input")."""
    from comfy_api.latest import io, ui

    return ui.ImageSaveHelper.save_images(image[:1], "bfs_box_background", io.FolderType.temp, None, compress_level=1)


def raw_from_normalized(latent: torch.Tensor) -> torch.Tensor:
    return latent / FLUX_SCALE + FLUX_SHIFT


def normalized_from_raw(latent: torch.Tensor) -> torch.Tensor:
    return (latent - FLUX_SHIFT) * FLUX_SCALE


def flux_latent(latent: dict, name: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4 or samples.shape[1] != 16:
        got = None if samples is None else list(samples.shape)
        raise ValueError(
            f"`{name}` must be a Flux LATENT with 16 channels ([batch, 16, height/8, width/8]) but got "
            f"{got}. Connect the foreground latent of BG2FG Sample or Extract Foreground."
        )
    check_finite(name, samples, "its samples")
    return samples


# -- conditioning --------------------------------------------------------------------------------------------------
def flux_text(conditioning, name: str = "positive") -> tuple[torch.Tensor, torch.Tensor]:
    """CONDITIONING from CLIPTextEncode (+ StyleModelApply for Redux) -> (prompt_embeds [1, T, W], pooled [1, P])."""
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise ValueError(f"`{name}` must be a CONDITIONING (e.g. from CLIPTextEncode) but got {type(conditioning)}.")
    if len(conditioning) > 1:
        raise ValueError(
            f"`{name}` holds {len(conditioning)} conditioning entries (e.g. from Conditioning Combine); "
            f"BFS takes one. Use Conditioning (Concat) to join text and reference tokens."
        )
    embeds, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise ValueError(
            f"`{name}` has no pooled output: encode the prompt with Flux's DualCLIPLoader (clip_l + "
            f"t5xxl, type flux) and CLIPTextEncode."
        )
    if extra.get("attention_mask") is not None:
        raise ValueError(
            f"`{name}` carries an attention mask (StyleModelApply with strength_type 'attn_bias'); BFS "
            f"does not support it: set strength_type to 'multiply'."
        )
    check_finite(name, embeds, "its tokens")
    check_finite(name, pooled, "its pooled output")
    return embeds, pooled


# -- the Flux VAE as the pipeline's image codec -----------------------------------------------------------------------
class ComfyFluxVAE:
    """ComfyUI's VAE object (the native Flux VAE) with the `encode_images` / `decode_latents` codec interface."""

    def __init__(self, vae):
        channels = getattr(vae, "latent_channels", None)
        if channels != 16:
            raise ValueError(
                f"`vae` must be the Flux VAE (16 latent channels, ae.safetensors) but has {channels} "
                f"latent channels. Load FLUX.1's ae.safetensors with Load VAE."
            )
        self.vae = vae

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(images.movedim(1, -1)[..., :3])  # [B, 3, H, W] -> [B, H, W, 3]
        return normalized_from_raw(raw.float())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(raw_from_normalized(latents.float())).movedim(-1, 1).float()


# -- the model handle ---------------------------------------------------------------------------------------------
class _PatcherModule(torch.nn.Module):
    """A plain container ComfyUI's ModelPatcher can move and annotate (it sets `.device` and a few counters)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.device = None


@dataclass
class PatchedModel:
    """What flows through a BFS_MODEL or BFS_DECOMPOSITION_MODEL socket: the model inside a ModelPatcher (so ComfyUI's
    memory management loads and offloads it like any other) and its scheduler config. Nodes read it, never modify it.
    """

    patcher: comfy.model_patcher.ModelPatcher
    scheduler_config: dict
    name: str
    block_offload: bool = False

    @classmethod
    def wrap(cls, inner: torch.nn.Module, scheduler_config: dict, name: str, offload: str = "none") -> PatchedModel:
        """`offload="block"` (Load BFS): diffusers' group offloading streams the transformer's blocks to the device as
        it runs, so ComfyUI keeps the model on the CPU and, before each run, frees what the blocks need on the device.
        `none` / `model`: ComfyUI itself moves the whole model in for sampling and out when other models need the
        room (its own model-level offloading), at the model's real size (quantised GGUF blocks count as their bytes).
        """
        mm = comfy.model_management
        block = offload == "block"
        if block:
            from ..bfs_core.offload import apply_offload

            apply_offload(inner.transformer, "block", mm.get_torch_device(), offload_device=mm.unet_offload_device())
        load_device = mm.unet_offload_device() if block else mm.get_torch_device()
        patcher = comfy.model_patcher.ModelPatcher(
            _PatcherModule(inner), load_device=load_device, offload_device=mm.unet_offload_device()
        )
        return cls(patcher=patcher, scheduler_config=scheduler_config, name=name, block_offload=block)

    def load(self) -> torch.nn.Module:
        """Ask ComfyUI's memory management to put the model on the compute device (offloading others if needed)."""
        if self.block_offload:  # the hooks bring blocks in one at a time: free what they need, keep the rest here
            from ..bfs_core.offload import device_weight_bytes

            inner = self.patcher.model.inner
            device = comfy.model_management.get_torch_device()
            if device.type != "cpu":
                comfy.model_management.free_memory(device_weight_bytes(inner.transformer, "block"), device)
            return inner
        # force_full_load: ComfyUI's partial loading moves only modules whose parameters are all their own and casts
        # only comfy.ops layers on the fly. The BFS Linears carry per-branch adapter children, so a partial load would
        # leave them on the CPU and fail later with a device mismatch: the model is loaded whole (freeing other models
        # first), or fails plainly with out-of-memory.
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.patcher.model.inner


# -- inputs shared by the samplers ---------------------------------------------------------------------------------
def combo_value(enum_cls, value, name: str):
    """A combo input's value as its Enum. ComfyUI does not check V3 combo values sent through the API, so a value the
    widget never offers gets a clear message here, not a raw "'x' is not a valid ..."."""
    try:
        return enum_cls(value)
    except ValueError:
        options = ", ".join(repr(e.value) for e in enum_cls)
        raise ValueError(f"`{name}` must be one of {options} but got {value!r}. Pick one in the widget.") from None


def cache_threshold_input():
    from comfy_api.latest import io  # here, not at the top: bfs_core-level tests import this module without ComfyUI

    return io.Float.Input(
        "cache_threshold",
        default=0.0,
        min=0.0,
        max=1.0,
        step=0.01,
        optional=True,
        tooltip=f"Step caching (First-Block-Cache, both branches together): 0 = exact (default). {FAST_THRESHOLD} is "
        "the documented fast setting (fewer full transformer evaluations; see the README's 'Step caching'). Higher "
        "= faster and less exact.",
    )


# -- progress ------------------------------------------------------------------------------------------------------
def progress(steps: int):
    """(callback, interrupt) for bfs_core: a ComfyUI progress bar with the live preview, and the interrupt button."""
    bar = comfy.utils.ProgressBar(steps)
    previewer = latent_previewer()

    def callback(step: int, total: int, state) -> None:
        if previewer is None:  # previews off
            bar.update_absolute(step + 1, total)
            return
        latent = preview_latent(state).to(comfy.model_management.get_torch_device())  # where a TAESD previewer is
        bar.update_absolute(step + 1, total, previewer.decode_latent_to_preview_image("JPEG", latent))

    def interrupt() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    return callback, interrupt


def latent_previewer():
    """ComfyUI's latent previewer for Flux latents (its --preview-method: Latent2RGB, or TAESD when installed), or
    None when previews are off (`--preview-method none`, ComfyUI's default)."""
    try:
        import latent_preview
        from comfy import latent_formats
    except ImportError:  # not inside ComfyUI (the core tests import this module with stubs)
        return None
    return latent_preview.get_previewer(comfy.model_management.get_torch_device(), latent_formats.Flux())


def preview_latent(state) -> torch.Tensor:
    """A sampler step's preview: the composite branch's clean estimate | the layer's, side by side, first item.

    [1, 16, h, 2w] in normalised Flux latent space, what ComfyUI's previewers take (they show a sampler's x0)."""
    comp, fg = state.unpacked_x0()  # [N, 16, h, w] each
    return torch.cat([comp[:1], fg[:1]], dim=-1)
