"""Load Decomposition Model and Decompose Layers (Outpaint-and-Remove, or Fill removal + BFS extraction), and the
toy decomposition nodes: Load Toy Decomposition Model and Toy Decomposition Scene (the embedded toy, no downloads)."""

from __future__ import annotations

from enum import Enum

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from ..bfs_core.models.layer_decomposition import DEFAULT_SHORT_SIDE, apply_decomposition_weights
from ..bfs_core.pipelines.decomposition import FILL_DILATION, DecompositionPipeline, FillThenExtractPipeline
from ..bfs_core.toy.decomposition import HELDOUT_SEEDS, load_toy_decomposition, make_decomposition_scene
from ..bfs_core.toy.models import encode_toy_prompt
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
from .loaders import BFS_MODEL, RGBA_VAE, WeightDtype, check_model_file
from .toy import TOY_TEXT_ENCODER, ToyVAE


DECOMPOSITION_MODEL = io.Custom("BFS_DECOMPOSITION_MODEL")
CATEGORY = "BFS/decomposition"
TOY_CATEGORY = "BFS/toy"


class Method(str, Enum):
    OUTPAINT_AND_REMOVE = "outpaint_and_remove"  # the decomposition model (Load Decomposition Model)
    FILL_THEN_EXTRACT = "fill_then_extract"  # Flux-Fill removal + BFS extraction (Load BFS): public weights


# Which model input each method runs, and the inputs only Outpaint-and-Remove reads (refused with the other method).
METHOD_MODEL = {Method.OUTPAINT_AND_REMOVE: "decomposition_model", Method.FILL_THEN_EXTRACT: "bfs_model"}
MAPS = ("edge", "segmentation", "depth")


def check_method_inputs(method: Method, models: dict, maps: dict, fill_positive) -> list[str]:
    """The chosen method's model is connected and nothing only the other method reads is; returns notes for the node
    (a connected model the method does not use)."""
    name = METHOD_MODEL[method]
    if models[name] is None:
        source = "Load Decomposition Model" if method == Method.OUTPAINT_AND_REMOVE else "Load BFS (or the toy loader)"
        raise ValueError(f"method {method.value!r} needs `{name}`: connect {source} to it, or pick the other method.")
    other = [k for k, v in maps.items() if v is not None] if method == Method.FILL_THEN_EXTRACT else []
    if method == Method.OUTPAINT_AND_REMOVE and fill_positive is not None:
        other.append("fill_positive")
    if other:
        owner = "fill_then_extract" if method == Method.OUTPAINT_AND_REMOVE else "outpaint_and_remove"
        raise ValueError(
            f"{', '.join(f'`{k}`' for k in other)} is only read by method {owner!r} but the method is "
            f"{method.value!r}: disconnect it, or pick {owner!r}."
        )
    return [f"`{k}` is connected but not used by {method.value}." for k, v in models.items() if k != name and v]


def _outpaint_and_remove(model, vae, rgba_vae, image, mask, positive, maps, sampling):
    maps = {k: None if v is None else image_to_core(v, k) for k, v in maps.items()}
    pipe = DecompositionPipeline(model.load(), ComfyFluxVAE(vae), rgba_vae, model.scheduler_config)
    callback, interrupt = progress(sampling["steps"])
    return pipe.decompose(
        image, mask, *flux_text(positive), **maps, **sampling, callback=callback, interrupt=interrupt
    )


def _fill_then_extract(model, vae, rgba_vae, image, mask, positive, fill_positive, dilation, sampling):
    fill = {} if fill_positive is None else dict(zip(("fill_prompt_embeds", "fill_pooled"), flux_text(fill_positive)))
    pipe = FillThenExtractPipeline(model.load(), ComfyFluxVAE(vae), rgba_vae, model.scheduler_config)
    callback, interrupt = progress(2 * sampling["steps"])  # the fill's steps, then the extraction's
    return pipe.decompose(
        image,
        mask,
        *flux_text(positive),
        **fill,
        dilation=dilation,
        **sampling,
        callback=callback,
        interrupt=interrupt,
    )


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
            description="The masked object as an RGBA layer and the background with the object removed. Method "
            "outpaint_and_remove: the Outpaint-and-Remove model (occluded parts completed). Method fill_then_extract: "
            "FLUX.1-Fill-dev fills the (grown) mask, then BFS Extract Foreground pulls the object with its shadow out "
            "against that background (only Load BFS is needed: public weights).",
            inputs=[
                DECOMPOSITION_MODEL.Input(
                    "decomposition_model",
                    optional=True,
                    tooltip="From Load Decomposition Model; method outpaint_and_remove.",
                ),
                BFS_MODEL.Input(
                    "bfs_model",
                    optional=True,
                    tooltip="From Load BFS (its Flux-Fill base does the fill step); method fill_then_extract.",
                ),
                io.Image.Input("image", tooltip="The photo to decompose."),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="The object to pull out (white). A rough mask is fine. Optional: without it the box "
                    "drawn on the node is the region; when connected it wins.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Flux CLIPTextEncode; an empty prompt is fine. fill_then_extract: the object, for the "
                    "extraction.",
                ),
                io.Conditioning.Input(
                    "fill_positive",
                    optional=True,
                    tooltip="fill_then_extract: what Flux-Fill paints where the object was (an empty prompt or the "
                    "background's description). Default: `positive`.",
                ),
                io.Vae.Input("vae", tooltip="The native Flux VAE (ae.safetensors)."),
                RGBA_VAE.Input("rgba_vae", tooltip="From Load RGBA VAE: decodes the foreground layer."),
                io.Image.Input(
                    "edge", optional=True, tooltip="outpaint_and_remove: edge map; default: Canny computed here."
                ),
                io.Image.Input(
                    "segmentation", optional=True, tooltip="outpaint_and_remove: segmentation map (a preprocessor)."
                ),
                io.Image.Input(
                    "depth", optional=True, tooltip="outpaint_and_remove: depth map (e.g. Depth Anything)."
                ),
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
                # method and dilation are optional widgets, so they come last and workflows saved before them load
                io.Combo.Input(
                    "method",
                    options=[m.value for m in Method],
                    default=Method.OUTPAINT_AND_REMOVE.value,
                    optional=True,
                    tooltip="outpaint_and_remove: needs decomposition_model (Outpaint-and-Remove weights). "
                    "fill_then_extract: needs bfs_model (FLUX.1-Fill-dev + the BFS release, downloadable today).",
                ),
                io.Int.Input(
                    "dilation",
                    default=FILL_DILATION,
                    optional=True,
                    min=0,
                    max=512,
                    tooltip="fill_then_extract: pixels the mask grows by before the fill; the background keeps the "
                    "image's own pixels outside the grown mask. Grow it over the shadow to remove that too.",
                ),
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
        decomposition_model=None,  # first, as before `method`: the order callers of the node already use
        image=None,
        positive=None,
        vae=None,
        rgba_vae=None,
        seed=0,
        steps=28,
        guidance=30.0,
        short_side=DEFAULT_SHORT_SIDE,
        bfs_model=None,
        fill_positive=None,
        mask=None,
        box="",
        edge=None,
        segmentation=None,
        depth=None,
        cache_threshold=0.0,
        method=Method.OUTPAINT_AND_REMOVE.value,
        dilation=FILL_DILATION,
    ) -> io.NodeOutput:
        method = combo_value(Method, method, "method")
        maps = {"edge": edge, "segmentation": segmentation, "depth": depth}
        models = {"decomposition_model": decomposition_model, "bfs_model": bfs_model}
        notes = check_method_inputs(method, models, maps, fill_positive)
        image, preview = image_to_core(image, "image"), background_preview(image)  # the box editor draws on it
        mask, region_notes = region_from_inputs(mask, box, (image.shape[-1], image.shape[-2]))
        sampling = dict(
            seed=seed, steps=steps, guidance=guidance, short_side=short_side, cache_threshold=cache_threshold
        )
        if method == Method.FILL_THEN_EXTRACT:
            result = _fill_then_extract(
                bfs_model, vae, rgba_vae, image, mask, positive, fill_positive, dilation, sampling
            )
        else:
            result = _outpaint_and_remove(decomposition_model, vae, rgba_vae, image, mask, positive, maps, sampling)
        fg = image_from_core(result.foreground)
        notes = region_notes + notes
        ui = {"bfs_background": preview} | ({"text": notes} if notes else {})
        return io.NodeOutput(fg, fg[..., 3].clone(), image_from_core(result.background), mask[:, 0].cpu(), ui=ui)


# -- the embedded toy models (no downloads) ----------------------------------------------------------------------
class LoadToyDecomposition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSLoadToyDecomposition",
            display_name="Load Toy Decomposition Model",
            category=TOY_CATEGORY,
            description="The tiny Outpaint-and-Remove model shipped inside this pack (trained by training/ on toy "
            "scenes where objects hide each other): for Decompose Layers' outpaint_and_remove method, on CPU in "
            "seconds. Use it with Toy Decomposition Scene.",
            inputs=[],
            outputs=[
                DECOMPOSITION_MODEL.Output(display_name="decomposition_model", tooltip="For Decompose Layers."),
                io.Vae.Output(display_name="vae", tooltip="The toy Flux-VAE stand-in (the BFS toy model's)."),
                RGBA_VAE.Output(display_name="rgba_vae", tooltip="The toy RGBA decoder of the foreground layer."),
                TOY_TEXT_ENCODER.Output(display_name="text_encoder", tooltip="For Toy Text Encode."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        toy = load_toy_decomposition()
        model = PatchedModel.wrap(toy.model, toy.scheduler_config, "BFS toy decomposition model")
        return io.NodeOutput(model, ToyVAE(toy.codec), toy.rgba_decoder, toy.text_encoders)


class ToyDecompositionScene(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSToyDecompositionScene",
            display_name="Toy Decomposition Scene",
            category=TOY_CATEGORY,
            description="A held-out toy scene to decompose: 1-3 objects with shadows, the target often partly "
            "hidden by another, a rough mask of what shows of it (as a user draws one), its caption as CONDITIONING, "
            "and the toy segmentation and depth maps.",
            inputs=[
                TOY_TEXT_ENCODER.Input("text_encoder", tooltip="From Load BFS Toy Model or Load Toy Decomposition."),
                io.Int.Input("scene", default=7, min=0, max=999_999, tooltip="Which held-out scene."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The scene (the composite to decompose)."),
                io.Mask.Output(display_name="mask", tooltip="A rough mask of the target (slightly off, as drawn)."),
                io.Conditioning.Output(display_name="positive", tooltip="The target's caption, toy-encoded."),
                io.Image.Output(display_name="segmentation", tooltip="Toy segmentation map."),
                io.Image.Output(display_name="depth", tooltip="Toy depth map."),
                io.String.Output(display_name="caption", tooltip="The target's caption."),
            ],
        )

    @classmethod
    def execute(cls, text_encoder, scene) -> io.NodeOutput:
        toy = make_decomposition_scene(HELDOUT_SEEDS[0] + scene)
        embeds, pooled = encode_toy_prompt(text_encoder, toy.caption)
        hwc = [torch.from_numpy(x).float()[None] for x in (toy.composite, toy.segmentation, toy.depth)]
        conditioning = [[embeds.float(), {"pooled_output": pooled.float()}]]
        mask = torch.from_numpy(toy.mask).float()[None]
        return io.NodeOutput(hwc[0], mask, conditioning, hwc[1], hwc[2], toy.caption)


class DecomposeNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDecomposition, DecomposeLayers, LoadToyDecomposition, ToyDecompositionScene]
