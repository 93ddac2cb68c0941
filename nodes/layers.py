"""RGBA Decode, Composite Layer, Box to Mask and Save Layers: everything chaining and export need."""

from __future__ import annotations

import os
import uuid
from enum import Enum

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from PIL import Image
from server import PromptServer
from typing_extensions import override

from ..bfs_core.atomic import atomic_path
from ..bfs_core.layer_math import composite_stack, over, resize_rgba
from ..bfs_core.layered_files import write_layered_file
from .common import (
    ComfyFluxVAE,
    box_region,
    combo_value,
    flux_latent,
    image_from_core,
    image_to_core,
    normalized_from_raw,
)
from .loaders import RGBA_VAE


CATEGORY = "BFS/layers"
MAX_LAYERS = 6


class LayeredFormat(str, Enum):
    PSD = "psd"
    ORA = "ora"
    BOTH = "psd+ora"


def match_batches(inputs: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """[B, ...] tensors named for the error -> all at one batch size: a batch of 1 is used for every item; any other
    mix (2 backgrounds and 3 layers) is refused, never cut to the shortest."""
    sizes = {name: t.shape[0] for name, t in inputs}
    batch = max(sizes.values())
    if any(size not in (1, batch) for size in sizes.values()):
        given = ", ".join(f"`{name}` has {size}" for name, size in sizes.items())
        raise ValueError(
            f"Batch sizes do not match: {given}. Give every input either 1 image (used for each item) "
            f"or the same number of images ({batch})."
        )
    return [t.expand(batch, *t.shape[1:]) for _, t in inputs]


def save_preview(rgba: torch.Tensor, index: int) -> dict:
    """A straight RGBA [4, H, W] image as a PNG in ComfyUI's temp folder -> the node UI's `images` entry."""
    name = f"bfs_layers_{uuid.uuid4().hex[:8]}_{index:05}_.png"
    array = (rgba.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # [4, H, W] -> [H, W, 4]
    with atomic_path(os.path.join(folder_paths.get_temp_directory(), name)) as tmp:
        Image.fromarray(array, "RGBA").save(tmp, compress_level=1)
    return {"filename": name, "subfolder": "", "type": "temp"}


def show_saved(previews: list[dict], saved: list[str], node_id) -> dict:
    """What Save Layers wrote, on the node: the merged previews and the file names (UI text under the node too)."""
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text("Saved:\n" + "\n".join(saved), node_id)
    return {"images": previews, "animated": (False,), "text": saved}


class RGBADecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSRGBADecode",
            display_name="RGBA Decode",
            category=CATEGORY,
            description="Foreground latent -> straight-alpha RGBA layer, pasted back at the input's resolution.",
            inputs=[
                RGBA_VAE.Input("rgba_vae", tooltip="From Load RGBA VAE."),
                io.Latent.Input("foreground", tooltip="The foreground LATENT of BG2FG Sample / Extract Foreground."),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="The Flux VAE: needed by LayerDiffuse's TransparentVAE "
                    "(it refines the ordinary RGB decode).",
                ),
                io.Boolean.Input(
                    "tta",
                    default=True,
                    tooltip="LayerDiffuse only: median of 8 flipped/rotated passes "
                    "(reference quality); off = one pass, 8× faster.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="rgba",
                    tooltip="RGBA image (4 channels, straight alpha) at the size of "
                    "the background the layer was made for.",
                ),
                io.Mask.Output(
                    display_name="alpha",
                    tooltip="Opacity α: 1 = opaque object/shadow, 0 = transparent. "
                    "Note: LoadImage's mask is 1 − α; use InvertMask to convert between them.",
                ),
            ],
        )

    @classmethod
    def execute(cls, rgba_vae, foreground, vae=None, tta=True) -> io.NodeOutput:
        latent = normalized_from_raw(flux_latent(foreground, "foreground").float())
        if rgba_vae.needs_rgb and vae is None:
            raise ValueError("This RGBA VAE (LayerDiffuse TransparentVAE) needs the Flux VAE: connect `vae`.")
        width, height = foreground.get("bfs_original_size", (latent.shape[-1] * 8, latent.shape[-2] * 8))
        bar = comfy.utils.ProgressBar(latent.shape[0])
        layers = []
        for i in range(latent.shape[0]):
            rgb = ComfyFluxVAE(vae).decode_latents(latent[i : i + 1]) if rgba_vae.needs_rgb else None
            rgba = rgba_vae.decode(latent[i : i + 1], rgb=rgb, tta=tta)
            layers.append(resize_rgba(rgba.float().cpu(), (height, width)))
            bar.update_absolute(i + 1)
        rgba = torch.cat(layers)
        return io.NodeOutput(image_from_core(rgba), rgba[:, 3].clone())


class CompositeLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSCompositeLayer",
            display_name="Composite Layer",
            category=CATEGORY,
            description="An RGBA layer over a background (eq. 1): the next addition's background when chaining.",
            inputs=[
                io.Image.Input("background", tooltip="RGB (or RGBA) image the layer goes over."),
                io.Image.Input("layer", tooltip="RGBA layer of the same size (RGBA Decode's output)."),
                io.Mask.Input(
                    "alpha",
                    optional=True,
                    tooltip="Opacity for an RGB `layer` (1 = opaque). Ignored "
                    "when the layer already has an alpha channel.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, background, layer, alpha=None) -> io.NodeOutput:
        bottom = image_to_core(background, "background", (3, 4))
        top = image_to_core(layer, "layer", (3, 4))
        if top.shape[1] == 3:
            if alpha is None:
                raise ValueError("`layer` is RGB without alpha: connect its `alpha` mask (RGBA Decode gives both).")
            mask = (alpha[:, None] if alpha.ndim == 3 else alpha[None, None]).float()
            if mask.shape[-2:] != top.shape[-2:]:
                raise ValueError(
                    f"`alpha` is {mask.shape[-1]}×{mask.shape[-2]} but `layer` is {top.shape[-1]}×"
                    f"{top.shape[-2]}: connect the mask that belongs to the layer."
                )
            top, mask = match_batches([("layer", top), ("alpha", mask)])
            top = torch.cat([top, mask], 1)
        bottom, top = match_batches([("background", bottom), ("layer", top)])
        if top.shape[-2:] != bottom.shape[-2:]:
            raise ValueError(
                f"`layer` is {top.shape[-1]}×{top.shape[-2]} but `background` is "
                f"{bottom.shape[-1]}×{bottom.shape[-2]}; they must match (RGBA Decode pastes the layer "
                f"back at its background's size)."
            )
        result = over(top, bottom)
        return io.NodeOutput(image_from_core(result[:, :3] if bottom.shape[1] == 3 else result))


class BoxToMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSBoxToMask",
            display_name="Box to Mask",
            category=CATEGORY,
            description="A rectangular region mask (white inside the box) at an image's size.",
            inputs=[
                io.Image.Input("image", tooltip="The image the box is drawn on (only its size is used)."),
                io.Int.Input("x0", default=0, min=0, max=16384, tooltip="Left edge in pixels (inclusive)."),
                io.Int.Input("y0", default=0, min=0, max=16384, tooltip="Top edge in pixels (inclusive)."),
                io.Int.Input("x1", default=256, min=1, max=16384, tooltip="Right edge in pixels (exclusive)."),
                io.Int.Input("y1", default=256, min=1, max=16384, tooltip="Bottom edge in pixels (exclusive)."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, image, x0, y0, x1, y1) -> io.NodeOutput:
        height, width = image.shape[1], image.shape[2]
        return io.NodeOutput(box_region((x0, y0, x1, y1), height, width)[None])


class SaveLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        layers = [
            io.Image.Input(
                f"layer_{i}", optional=i > 1, tooltip=f"RGBA layer {i} (bottom to top), at the background's size."
            )
            for i in range(1, MAX_LAYERS + 1)
        ]
        return io.Schema(
            node_id="BFSSaveLayers",
            display_name="Save Layers (PSD/ORA)",
            category=CATEGORY,
            is_output_node=True,
            description="Save the background and RGBA layers as a layered PSD and/or OpenRaster file in the output "
            "folder, every layer named (any language), with a merged preview. A batch saves one file per "
            "item: <prefix>_00001_.psd, <prefix>_00002_.psd, … (an input with one image is used for "
            "every item). The node shows the merged images and the file names.",
            inputs=[
                io.Image.Input("background", tooltip="The bottom layer."),
                *layers,
                io.String.Input(
                    "names",
                    default="",
                    tooltip="Layer names, comma-separated, bottom to top (e.g. "
                    "'vase, cat'). Missing names become 'Layer N'.",
                ),
                io.Combo.Input(
                    "format",
                    options=[f.value for f in LayeredFormat],
                    default=LayeredFormat.PSD.value,
                    tooltip="PSD (Photoshop, GIMP, Krita), ORA (Krita, MyPaint, GIMP 3) or both.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="bfs/scene",
                    tooltip="Output file prefix, in the output "
                    "folder; a counter follows (<prefix>_00001_.psd), one number per batch item.",
                ),
            ],
            outputs=[io.String.Output(display_name="paths", tooltip="The files written, one per line.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, background, names, format, filename_prefix, **layers) -> io.NodeOutput:
        fmt = combo_value(LayeredFormat, format, "format")
        slots = [f"layer_{i}" for i in range(1, MAX_LAYERS + 1) if layers.get(f"layer_{i}") is not None]
        given = [n.strip() for n in names.split(",")] if names.strip() else []
        labels = [given[i] if i < len(given) and given[i] else f"Layer {i + 1}" for i in range(len(slots))]
        inputs = [("background", background)] + [(f"{s} ({n!r})", layers[s]) for s, n in zip(slots, labels)]
        bottom, *tops = match_batches([(name, image_to_core(image, name, (3, 4))) for name, image in inputs])
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), bottom.shape[-1], bottom.shape[-2]
        )
        suffixes = {LayeredFormat.PSD: [".psd"], LayeredFormat.ORA: [".ora"], LayeredFormat.BOTH: [".psd", ".ora"]}
        written, previews = [], []
        for b in range(bottom.shape[0]):  # one file (per format) for every batch item, numbered on
            stem = f"{filename}_{counter + b:05}_"  # ComfyUI's numbering: the next run counts on, never overwrites
            named = [(label, top[b]) for label, top in zip(labels, tops)]
            for suffix in suffixes[fmt]:
                written.append(str(write_layered_file(os.path.join(folder, stem + suffix), bottom[b], named)))
            previews.append(save_preview(composite_stack([bottom[b], *(top[b] for top in tops)]), b))
        return io.NodeOutput("\n".join(written), ui=show_saved(previews, written, cls.hidden.unique_id))


class LayerNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [RGBADecode, CompositeLayer, BoxToMask, SaveLayers]
