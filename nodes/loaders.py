"""Load BFS (the dual-branch Flux-Fill model) and Load RGBA VAE."""

from __future__ import annotations

import os
from enum import Enum

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.models.bfs_checkpoint import load_bfs
from ..bfs_core.models.dual_flux import store_weights_in_fp8
from ..bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from ..bfs_core.models.rgba_vae import load_rgba_decoder
from .common import PatchedModel


BFS_MODEL = io.Custom("BFS_MODEL")
RGBA_VAE = io.Custom("BFS_RGBA_VAE")
CATEGORY = "BFS/loaders"


class WeightDtype(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8_e4m3fn"
    FP32 = "fp32"


class LoadBFS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSLoadModel",
            display_name="Load BFS",
            category=CATEGORY,
            description="FLUX.1-Fill-dev turned into the BFS dual-branch model (composite + foreground branches).",
            inputs=[
                io.Combo.Input("base_model", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="FLUX.1-Fill-dev from models/diffusion_models (bf16, fp8 or scaled fp8). "
                                       "FLUX.1-dev will not do: BFS needs the Fill model's 384 input channels."),
                io.Combo.Input("bfs_weights", options=folder_paths.get_filename_list("bfs"),
                               tooltip="BFS weights from models/bfs: the official trained_weights.pt or this "
                                       "pack's .safetensors. The preset (release or paper) is read from the file."),
                io.Combo.Input("weight_dtype", options=[d.value for d in WeightDtype], default=WeightDtype.BF16.value,
                               tooltip="bf16: as released. fp8_e4m3fn: store the frozen Flux weights in fp8 "
                                       "(about half the memory, computed in bf16). fp32: for CPU runs."),
            ],
            outputs=[BFS_MODEL.Output(display_name="bfs_model")],
        )  # fmt: skip

    @classmethod
    def execute(cls, base_model, bfs_weights, weight_dtype) -> io.NodeOutput:
        weight_dtype = WeightDtype(weight_dtype)
        compute = torch.float32 if weight_dtype == WeightDtype.FP32 else torch.bfloat16
        base_path = folder_paths.get_full_path_or_raise("diffusion_models", base_model)
        bfs_path = folder_paths.get_full_path_or_raise("bfs", bfs_weights)
        transformer = load_flux_fill_transformer(base_path, torch_dtype=compute, device="cpu")
        dual = load_bfs(transformer, bfs_path)
        if weight_dtype == WeightDtype.FP8:
            store_weights_in_fp8(transformer, compute_dtype=compute)
        model = PatchedModel.wrap(dual, load_shipped_config("flux_fill_scheduler"), f"{base_model} + {bfs_weights}")
        return io.NodeOutput(model)


def _rgba_vae_path(name: str) -> str:
    """A file in models/bfs; a diffusers folder is picked through its weights file (its folder is loaded)."""
    path = folder_paths.get_full_path_or_raise("bfs", name)
    folder = os.path.dirname(path)
    if os.path.basename(path).startswith("diffusion_pytorch_model") and os.path.isfile(
        os.path.join(folder, "config.json")
    ):
        return folder
    return path


class LoadRGBAVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSLoadRGBAVAE",
            display_name="Load RGBA VAE",
            category=CATEGORY,
            description="An RGBA decoder for Flux latents: the BFS release transparency VAE or LayerDiffuse-Flux's "
                        "TransparentVAE (detected from the file).",
            inputs=[
                io.Combo.Input("rgba_vae", options=folder_paths.get_filename_list("bfs"),
                               tooltip="From models/bfs: TransparentVAE.pth/.safetensors (LayerDiffuse), a release "
                                       "transparency-VAE .safetensors, or its folder's diffusion_pytorch_model file."),
            ],
            outputs=[RGBA_VAE.Output(display_name="rgba_vae")],
        )  # fmt: skip

    @classmethod
    def execute(cls, rgba_vae) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        return io.NodeOutput(load_rgba_decoder(_rgba_vae_path(rgba_vae), device=device))


class LoaderNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadBFS, LoadRGBAVAE]
