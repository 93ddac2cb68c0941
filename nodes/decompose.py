"""Load Decomposition Model and Decompose Layers (Outpaint-and-Remove)."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from ..bfs_core.models.layer_decomposition import DEFAULT_SHORT_SIDE, apply_decomposition_weights
from ..bfs_core.pipelines.decomposition import DecompositionPipeline
from .common import (
    ComfyFluxVAE,
    PatchedModel,
    background_preview,
    box_input,
    cache_threshold_input,
    combo_value,
    flux_text,
    image_from_core,
    image_to_core,
    progress,
    region_from_inputs,
)
from .loaders import RGBA_VAE, WeightDtype, check_model_file


DECOMPOSITION_MODEL = io.Custom("BFS_DECOMPOSITION_MODEL")
CATEGORY = "BFS/decomposition"


class LoadDecomposition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSLoadDecomposition",
            display_name="Load Decomposition Model",
            category=CATEGORY,
            description="FLUX.1-Fill-dev + Outpaint-and-Remove weights: splits an image into an object layer and "
            "the background behind it.",
            inputs=[
                io.Combo.Input(
                    "base_model",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="FLUX.1-Fill-dev from models/diffusion_models (bf16, fp8 or scaled fp8).",
                ),
                io.Combo.Input(
                    "weights",
                    options=folder_paths.get_filename_list("bfs"),
                    tooltip="Decomposition weights (.safetensors) from models/bfs.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=[WeightDtype.BF16.value, WeightDtype.FP32.value],
                    default=WeightDtype.BF16.value,
                    tooltip="bf16 on GPU; fp32 for CPU runs.",
                ),
            ],
            outputs=[DECOMPOSITION_MODEL.Output(display_name="decomposition_model")],
        )

    @classmethod
    def validate_inputs(cls, base_model, weights) -> bool | str:
        ok = check_model_file("diffusion_models", base_model, "base_model")
        return check_model_file("bfs", weights, "weights") if ok is True else ok

    @classmethod
    def execute(cls, base_model, weights, weight_dtype) -> io.NodeOutput:
        fp32 = combo_value(WeightDtype, weight_dtype, "weight_dtype") == WeightDtype.FP32
        dtype = torch.float32 if fp32 else torch.bfloat16
        base_path = folder_paths.get_full_path_or_raise("diffusion_models", base_model)
        weights_path = folder_paths.get_full_path_or_raise("bfs", weights)
        transformer = load_flux_fill_transformer(base_path, torch_dtype=dtype, device="cpu", name="base_model")
        model = apply_decomposition_weights(transformer, weights_path, name="weights")
        scheduler = load_shipped_config("flux_fill_scheduler")
        return io.NodeOutput(PatchedModel.wrap(model, scheduler, f"{base_model} + {weights}"))


class DecomposeLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSDecomposeLayers",
            display_name="Decompose Layers",
            category=CATEGORY,
            description="Outpaint-and-Remove: the masked object as an RGBA layer (occluded parts completed) and the "
            "background with the object removed.",
            inputs=[
                DECOMPOSITION_MODEL.Input("decomposition_model", tooltip="From Load Decomposition Model."),
                io.Image.Input("image", tooltip="The photo to decompose."),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="The object to pull out (white). A rough mask is fine. Optional: without it the box "
                    "drawn on the node is the region; when connected it wins.",
                ),
                io.Conditioning.Input("positive", tooltip="Flux CLIPTextEncode; an empty prompt is fine."),
                io.Vae.Input("vae", tooltip="The native Flux VAE (ae.safetensors)."),
                RGBA_VAE.Input("rgba_vae", tooltip="From Load RGBA VAE: decodes the foreground layer."),
                io.Image.Input("edge", optional=True, tooltip="Edge map; default: Canny computed here."),
                io.Image.Input("segmentation", optional=True, tooltip="Segmentation map (a preprocessor node)."),
                io.Image.Input("depth", optional=True, tooltip="Depth map (e.g. Depth Anything V2 preprocessor)."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the sampling noise.",
                ),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Euler steps."),
                io.Float.Input(
                    "guidance", default=30.0, min=0.0, max=100.0, step=0.5, tooltip="Flux-Fill distilled guidance."
                ),
                io.Int.Input(
                    "short_side",
                    default=DEFAULT_SHORT_SIDE,
                    min=0,
                    max=4096,
                    step=64,
                    tooltip="Processing size (short side, never upscaled; 0 = input size). The background "
                    "keeps the input's own pixels outside the mask; the layers are mapped back.",
                ),
                cache_threshold_input(),
                box_input(),
            ],
            outputs=[
                io.Image.Output(display_name="foreground", tooltip="The object as RGBA (4-channel IMAGE)."),
                io.Mask.Output(display_name="alpha", tooltip="The object's alpha."),
                io.Image.Output(display_name="background", tooltip="The background with the object removed."),
                io.Mask.Output(display_name="region", tooltip="The region used: the mask, or the drawn box."),
            ],
        )

    @classmethod
    def execute(
        cls,
        decomposition_model,
        image,
        positive,
        vae,
        rgba_vae,
        seed,
        steps,
        guidance,
        short_side,
        mask=None,
        box="",
        edge=None,
        segmentation=None,
        depth=None,
        cache_threshold=0.0,
    ) -> io.NodeOutput:
        image, preview = image_to_core(image, "image"), background_preview(image)  # the box editor draws on it
        mask, notes = region_from_inputs(mask, box, (image.shape[-1], image.shape[-2]))
        maps = {
            k: None if v is None else image_to_core(v, k)
            for k, v in (("edge", edge), ("segmentation", segmentation), ("depth", depth))
        }
        embeds, pooled = flux_text(positive)
        pipe = DecompositionPipeline(
            decomposition_model.load(), ComfyFluxVAE(vae), rgba_vae, decomposition_model.scheduler_config
        )
        callback, interrupt = progress(steps)
        result = pipe.decompose(
            image,
            mask,
            embeds,
            pooled,
            **maps,
            seed=seed,
            steps=steps,
            guidance=guidance,
            short_side=short_side,
            callback=callback,
            interrupt=interrupt,
            cache_threshold=cache_threshold,
        )
        fg = image_from_core(result.foreground)
        ui = {"bfs_background": preview} | ({"text": notes} if notes else {})
        return io.NodeOutput(fg, fg[..., 3].clone(), image_from_core(result.background), mask[:, 0].cpu(), ui=ui)


class DecomposeNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDecomposition, DecomposeLayers]
