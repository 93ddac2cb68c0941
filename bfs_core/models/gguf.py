"""GGUF-quantised FLUX.1-Fill-dev transformers (city96's ComfyUI-GGUF files: Q8_0 ... Q4_K) through diffusers' GGUF
support.

The file is read with diffusers' `load_gguf_checkpoint` (quantised tensors become `GGUFParameter`s holding the raw GGML
blocks), converted from the BFL key layout ComfyUI-GGUF files use with `flux_keys.bfl_to_diffusers` (diffusers' own
converter hard-codes a hidden size of 3072, so tiny test models would not convert; GGML quantises each row on its own,
so splitting fused rows of the raw blocks is exact), and built with `FluxTransformer2DModel.from_single_file(...,
quantization_config=GGUFQuantizationConfig(compute_dtype))`: every quantised Linear becomes diffusers' `GGUFLinear`,
whose forward dequantises its weight to the compute dtype. The BFS content LoRAs wrap these Linears (dual_flux reads
their weights through `dequantize_weight`), so the base stays quantised in memory and everything computes in bf16.
"""

from __future__ import annotations

import json
import logging
import pathlib
import tempfile
from collections import Counter

import torch

from ..errors import UserInputError, check_file


logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
_UNQUANTISED = ("F32", "F16")  # read as plain torch tensors; every other type stays GGML blocks


def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A `GGUFParameter` (GGML blocks) as a plain `dtype` tensor of its logical shape, with diffusers' dequantiser."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(weight).to(dtype)


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a tensor has once dequantised (GGML blocks are stored as [rows, bytes per row])."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def quant_type_name(tensor: torch.Tensor) -> str:
    quant_type = getattr(tensor, "quant_type", None)
    if quant_type is not None:
        return getattr(quant_type, "name", str(quant_type))
    return str(tensor.dtype).replace("torch.", "")


def logical_numel(tensor: torch.Tensor) -> int:
    return int(torch.Size(logical_shape(tensor)).numel())


def _require_gguf(name: str, path: pathlib.Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise UserInputError(
            f"`{name}` {str(path)!r} is a GGUF file, and reading it needs the `gguf` package, which is not installed: "
            "`pip install 'gguf>=0.10.0'` in ComfyUI's Python (it is in this pack's requirements.txt)."
        ) from err


def read_gguf_state_dict(path: str | pathlib.Path, name: str = "path") -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file: F32/F16 as torch tensors, quantised (and BF16) ones as diffusers `GGUFParameter`s.

    Raises `UserInputError` naming the file when it is not a GGUF file (truncated, another format) or holds a
    quantisation type diffusers cannot dequantise.
    """
    path = check_file(path, name, "a .gguf file")
    _require_gguf(name, path)
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        from ..errors import sniff_file

        what = sniff_file(path) or f"it starts with {magic!r}, not b'GGUF'"
        raise UserInputError(
            f"`{name}` file {str(path)!r} is not a GGUF file ({what}): re-download it, or pick the right file."
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct.error/IndexError on damaged files; report them all alike
        raise UserInputError(
            f"`{name}` file {str(path)!r} is not a complete GGUF file ({type(err).__name__}: {err}): re-download it."
        ) from err
    supported = set(SUPPORTED_GGUF_QUANT_TYPES) | {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    unsupported = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type not in supported)
    if unsupported:
        names = sorted(q.name for q in supported)
        raise UserInputError(
            f"`{name}` file {str(path)!r} holds tensors in GGUF quantisation types this loader cannot dequantise: "
            f"{dict(unsupported)}. Supported: {names}. Use a Q8_0, Q6_K, Q5_K, Q4_K, Q5_0/Q4_0 ... file of "
            "FLUX.1-Fill-dev (e.g. from city96's conversions)."
        )
    sd = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(tensor.data.copy())
        if tensor.tensor_type.name in _UNQUANTISED:
            sd[tensor.name] = data
        else:
            sd[tensor.name] = GGUFParameter(data, quant_type=tensor.tensor_type)
    if not sd:
        raise UserInputError(f"`{name}` file {str(path)!r} is a GGUF file without tensors: re-download it.")
    return sd


def _meta_like(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Empty tensors of the logical shapes, for the shape checks and config inference of flux_fill_loading."""
    return {k: torch.empty(logical_shape(v), device="meta") for k, v in sd.items()}


def _dequantize_non_linear(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers swaps in GGUFLinear for Linears only: quantised (or BF16) biases and norm scales are dequantised."""
    return {k: dequantize_weight(v, dtype) if hasattr(v, "quant_type") and v.ndim != 2 else v for k, v in sd.items()}


def load_gguf_flux_fill(
    path: pathlib.Path,
    sd: dict[str, torch.Tensor],
    config: dict,
    *,
    compute_dtype: torch.dtype,
    device: str | torch.device,
):
    """`sd` (diffusers keys, from `read_gguf_state_dict` + key conversion) as a quantised FluxTransformer2DModel."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    sd = _dequantize_non_linear(sd, compute_dtype)
    with tempfile.TemporaryDirectory(prefix="bfs-gguf-config-") as folder:
        # from_single_file takes its config from a (local) diffusers folder; nothing is downloaded.
        (pathlib.Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        model = FluxTransformer2DModel.from_single_file(
            sd,
            config=folder,
            local_files_only=True,
            torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        )
    for param in model.parameters():
        if hasattr(param, "quant_type"):
            param.compute_dtype = compute_dtype  # dual_flux creates adapters beside it in this dtype
    return model.to(device).eval()


def quant_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many parameters of each storage type (Q8_0, Q4_K, F16, bf16 ...) the model holds."""
    return dict(Counter(quant_type_name(p) for p in model.parameters()))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take as stored (quantised blocks count as their bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
