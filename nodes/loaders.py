"""Load BFS (the dual-branch Flux-Fill model) and Load RGBA VAE."""

from __future__ import annotations

import os
from enum import Enum

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.errors import UserInputError, open_safetensors, sniff_file
from ..bfs_core.models.bfs_checkpoint import load_bfs
from ..bfs_core.models.dual_flux import store_weights_in_fp8
from ..bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from ..bfs_core.models.gguf import GGUF_SUFFIX
from ..bfs_core.models.rgba_vae import load_rgba_decoder
from ..bfs_core.offload import Offload
from .common import PatchedModel, combo_value


BFS_MODEL = io.Custom("BFS_MODEL")
RGBA_VAE = io.Custom("BFS_RGBA_VAE")
CATEGORY = "BFS/loaders"


def check_model_file(folder: str, filename: str, input_name: str) -> bool | str:
    """For `validate_inputs`: True, or why the file picked for `input_name` cannot be loaded (not in the folder any
    more, empty, a broken `.safetensors` header), so the graph is refused when queued rather than minutes later."""
    path = folder_paths.get_full_path(folder, filename) if isinstance(filename, str) else None
    if path is None or not os.path.isfile(path):
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
        return (
            f"`{input_name}`: {filename!r} is not in models/{folder} (searched {searched}). Put the file there, "
            "then press R in ComfyUI to refresh the lists."
        )
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            with open_safetensors(path, input_name) as f:
                f.metadata()
        elif (found := sniff_file(path)) is not None and "PyTorch" not in found:  # empty, an image, HTML, ...
            return f"`{input_name}` file {path!r} is not a weights file ({found}): re-download it."
    except UserInputError as err:
        return str(err)
    return True


def _gguf_folders() -> list[str]:
    """Where .gguf bases are: models/diffusion_models and models/unet, and ComfyUI-GGUF's `unet_gguf` when that pack
    registered it (its folders list only .gguf files; diffusion_models' extension filter hides them)."""
    folders = list(folder_paths.get_folder_paths("diffusion_models"))
    if "unet_gguf" in folder_paths.folder_names_and_paths:
        folders += [f for f in folder_paths.get_folder_paths("unet_gguf") if f not in folders]
    return folders


def base_model_files() -> list[str]:
    """Load BFS's `base_model` choices: models/diffusion_models (+ models/unet) files and every .gguf there."""
    names = list(folder_paths.get_filename_list("diffusion_models"))
    for folder in _gguf_folders():
        if os.path.isdir(folder):
            found = folder_paths.filter_files_extensions(folder_paths.recursive_search(folder)[0], {GGUF_SUFFIX})
            names += [n for n in found if n not in names]
    return sorted(names)


def base_model_path(name: str) -> str | None:
    if not name.lower().endswith(GGUF_SUFFIX):
        return folder_paths.get_full_path("diffusion_models", name)
    for folder in _gguf_folders():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def check_base_model(name: str) -> bool | str:
    """`check_model_file` for Load BFS's base, which can also be a .gguf (checked to start like one)."""
    if not isinstance(name, str) or not name.lower().endswith(GGUF_SUFFIX):
        return check_model_file("diffusion_models", name, "base_model")
    path = base_model_path(name)
    if path is None:
        searched = ", ".join(_gguf_folders())
        return (
            f"`base_model`: {name!r} is not in models/diffusion_models or models/unet (searched {searched}). Put "
            "the file there, then press R in ComfyUI to refresh the lists."
        )
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            found = sniff_file(path) or "it does not start with the GGUF magic bytes"
            return f"`base_model` file {path!r} is not a GGUF file ({found}): re-download it."
    return True


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
                io.Combo.Input(
                    "base_model",
                    options=base_model_files(),
                    tooltip="FLUX.1-Fill-dev from models/diffusion_models or models/unet: bf16, fp8, scaled fp8, or "
                    "a ComfyUI-GGUF .gguf (Q8_0 ... Q4_K, kept quantised, computed in bf16). FLUX.1-dev will not "
                    "do: BFS needs the Fill model's 384 input channels.",
                ),
                io.Combo.Input(
                    "bfs_weights",
                    options=folder_paths.get_filename_list("bfs"),
                    tooltip="BFS weights from models/bfs: the official trained_weights.pt or this "
                    "pack's .safetensors. The preset (release or paper) is read from the file.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=[d.value for d in WeightDtype],
                    default=WeightDtype.BF16.value,
                    tooltip="bf16: as released. fp8_e4m3fn: store the frozen Flux weights in fp8 "
                    "(about half the memory, computed in bf16). fp32: for CPU runs. A GGUF base stays in its "
                    "quantisation (bf16 and fp32 set the compute dtype).",
                ),
                io.Combo.Input(
                    "offload",
                    options=[m.value for m in Offload],
                    default=Offload.NONE.value,
                    optional=True,
                    tooltip="none / model: ComfyUI moves the whole model to the GPU for sampling and out when other "
                    "models need the room. block: the model stays in RAM and diffusers' group offloading streams one "
                    "transformer block at a time to the GPU (the least VRAM: the embedders plus two blocks; slower, "
                    "every weight crosses PCIe each step).",
                ),
            ],
            outputs=[BFS_MODEL.Output(display_name="bfs_model")],
        )

    @classmethod
    def validate_inputs(cls, base_model, bfs_weights) -> bool | str:
        ok = check_base_model(base_model)
        return check_model_file("bfs", bfs_weights, "bfs_weights") if ok is True else ok

    @classmethod
    def execute(cls, base_model, bfs_weights, weight_dtype, offload=Offload.NONE.value) -> io.NodeOutput:
        weight_dtype = combo_value(WeightDtype, weight_dtype, "weight_dtype")
        offload = combo_value(Offload, offload, "offload")
        compute = torch.float32 if weight_dtype == WeightDtype.FP32 else torch.bfloat16
        base_path = base_model_path(base_model) or folder_paths.get_full_path_or_raise("diffusion_models", base_model)
        if base_path.lower().endswith(GGUF_SUFFIX) and weight_dtype == WeightDtype.FP8:
            raise UserInputError(
                f"`weight_dtype` fp8_e4m3fn cannot apply to the GGUF base {base_model!r}: its weights stay in their "
                "GGUF quantisation. Pick bf16 (GPU) or fp32 (CPU runs) as the compute dtype."
            )
        bfs_path = folder_paths.get_full_path_or_raise("bfs", bfs_weights)
        transformer = load_flux_fill_transformer(base_path, torch_dtype=compute, device="cpu", name="base_model")
        dual = load_bfs(transformer, bfs_path, name="bfs_weights")
        if weight_dtype == WeightDtype.FP8:
            store_weights_in_fp8(transformer, compute_dtype=compute)
        scheduler = load_shipped_config("flux_fill_scheduler")
        model = PatchedModel.wrap(dual, scheduler, f"{base_model} + {bfs_weights}", offload=offload.value)
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
                io.Combo.Input(
                    "rgba_vae",
                    options=folder_paths.get_filename_list("bfs"),
                    tooltip="From models/bfs: TransparentVAE.pth/.safetensors (LayerDiffuse), a release "
                    "transparency-VAE .safetensors, or its folder's diffusion_pytorch_model file.",
                ),
            ],
            outputs=[RGBA_VAE.Output(display_name="rgba_vae")],
        )

    @classmethod
    def validate_inputs(cls, rgba_vae) -> bool | str:
        return check_model_file("bfs", rgba_vae, "rgba_vae")

    @classmethod
    def execute(cls, rgba_vae) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        return io.NodeOutput(load_rgba_decoder(_rgba_vae_path(rgba_vae), device=device, name="rgba_vae"))


class LoaderNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadBFS, LoadRGBAVAE]
