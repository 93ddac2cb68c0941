"""BG2FG Sample and Extract Foreground."""

from __future__ import annotations

import comfy.model_management
from comfy_api.latest import ComfyExtension, io
from server import PromptServer
from typing_extensions import override

from ..bfs_core.layer_math import bounding_box_masks
from ..bfs_core.pipelines.bfs import BFSPipeline
from ..bfs_core.toy.guard import run_toy
from .common import (
    ComfyFluxVAE,
    background_preview,
    box_input,
    cache_threshold_input,
    flux_text,
    image_from_core,
    image_to_core,
    progress,
    raw_from_normalized,
    region_from_inputs,
)
from .loaders import BFS_MODEL
from .toy import ToyModelHandle


CATEGORY = "BFS/sampling"


def _common_inputs() -> list:
    return [
        io.Conditioning.Input(
            "positive",
            tooltip="What the foreground is: Flux CLIPTextEncode (DualCLIPLoader, type "
            "flux), or a Redux reference (StyleModelApply) for reference-guided layers.",
        ),
        io.Vae.Input("vae", tooltip="The native Flux VAE (ae.safetensors)."),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=0xFFFFFFFFFFFFFFFF,
            control_after_generate=True,
            tooltip="Seed of the sampling noise.",
        ),
        io.Int.Input("steps", default=50, min=1, max=200, tooltip="Euler steps (the paper uses 50)."),
        io.Float.Input(
            "guidance",
            default=30.0,
            min=0.0,
            max=100.0,
            step=0.5,
            tooltip="Flux-Fill distilled guidance (the paper uses 30).",
        ),
        io.Int.Input(
            "short_side",
            default=512,
            min=0,
            max=2048,
            step=64,
            tooltip="Processing size: the short side is resized to this (never upscaled; 512 as trained), "
            "sides rounded up to multiples of 64. 0 keeps the input size. Results are mapped back.",
        ),
        cache_threshold_input(),
        box_input(),
    ]


def _outputs() -> list:
    return [
        io.Latent.Output(display_name="foreground", tooltip="Foreground latent (with its effects): RGBA Decode it."),
        io.Image.Output(display_name="composite", tooltip="The composite branch at the input's size."),
        io.Mask.Output(
            display_name="region", tooltip="The region used: the bounding box of the mask, or the drawn box."
        ),
    ]


def _run(model, vae, positive, background, mask, box, composite=None, node_id=None, **sampling):
    """`sampling`: the widgets of `_common_inputs` (seed, steps, guidance, short_side, cache_threshold when given).
    The region is the connected `mask` or else the `box` drawn on the node."""
    background_ui = background
    background = image_to_core(background, "background")
    preview = background_preview(background_ui)  # the box editor draws on it after the run
    size = (background.shape[-1], background.shape[-2])
    region, notes = region_from_inputs(mask, box, size)
    region = bounding_box_masks(region)
    composite = None if composite is None else image_to_core(composite, "composite")
    embeds, pooled = flux_text(positive)
    pipe = BFSPipeline(model.load(), ComfyFluxVAE(vae), model.scheduler_config)
    callback, interrupt = progress(sampling["steps"])
    common = dict(sampling, callback=callback, interrupt=interrupt)
    messages = notes
    if isinstance(model, ToyModelHandle):  # the toy maps any image into its 64×64 world and back, and warns
        run = run_toy(pipe, background, region, embeds, pooled, composite, **common)
        result, messages = run.result, notes + [f"Warning: {w}" for w in run.warnings] + run.notes
    elif composite is None:
        result = pipe.generate(background, region, embeds, pooled, **common)
    else:
        result = pipe.extract(composite, background, region, embeds, pooled, **common)
    samples = raw_from_normalized(result.fg_latent.float()).to(comfy.model_management.intermediate_device())
    latent = {"samples": samples, "bfs_original_size": result.original_size}
    ui = _show(messages, node_id) | {"bfs_background": preview}
    return io.NodeOutput(latent, image_from_core(result.composite), region[:, 0].cpu(), ui=ui)


def _show(messages: list[str], node_id) -> dict:
    """Messages on the node in the UI (progress text under the node) and in its `text` output (/history, API)."""
    if not messages:
        return {}
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text("\n".join(messages), node_id)
    return {"text": messages}


class BG2FGSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSBG2FGSample",
            display_name="BG2FG Sample",
            category=CATEGORY,
            description="Generate a foreground layer (with its shadow/reflection) for a region of a background; the "
            "composite branch is generated with it.",
            inputs=[
                BFS_MODEL.Input("bfs_model", tooltip="From Load BFS."),
                io.Image.Input("background", tooltip="The background layer the object is added to."),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Where the object goes (white = region). Any shape: its bounding box is used, as in the "
                    "paper. Optional: without it the box drawn on the node is the region; when connected it wins.",
                ),
                *_common_inputs(),
            ],
            outputs=_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, bfs_model, background, positive, vae, mask=None, box="", **sampling) -> io.NodeOutput:
        return _run(bfs_model, vae, positive, background, mask, box, node_id=cls.hidden.unique_id, **sampling)


class ExtractForeground(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSExtractForeground",
            display_name="Extract Foreground",
            category=CATEGORY,
            description="Pull the foreground layer, with its shadows and reflections, out of a composite given its "
            "background (the composite branch is held clean at t = 0).",
            inputs=[
                BFS_MODEL.Input("bfs_model", tooltip="From Load BFS."),
                io.Image.Input("composite", tooltip="The image with the object in it."),
                io.Image.Input("background", tooltip="The same image without the object (same size)."),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Region of the object and its effects (white); its bounding box is used. Optional: "
                    "without it the box drawn on the node is the region; when connected it wins.",
                ),
                *_common_inputs(),
            ],
            outputs=_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, bfs_model, composite, background, positive, vae, mask=None, box="", **sampling) -> io.NodeOutput:
        if composite.shape != background.shape:
            raise ValueError(
                f"`composite` {list(composite.shape)} and `background` {list(background.shape)} must "
                "have the same size: the composite is the background with the object added."
            )
        return _run(bfs_model, vae, positive, background, mask, box, composite, cls.hidden.unique_id, **sampling)


class SamplingNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [BG2FGSample, ExtractForeground]
