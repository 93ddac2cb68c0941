"""fp8 FLUX checkpoints as ComfyUI stores them: dequantisation to a float dtype, and the writer used for test files."""

import json

import torch

from .flux_keys import _strip_key_prefix


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SUPPORTED_COMFY_QUANT_FORMATS = {"float8_e4m3fn", "float8_e5m2"}


# ---------------------------------------------------------------------------------------------------------------
# fp8: plain, ComfyUI legacy scaled fp8, ComfyUI comfy_quant
# Conventions read from ComfyUI comfy/ops.py (scaled_fp8_ops.Linear: weight * scale_weight; mixed_precision_ops),
# comfy/quant_ops.py (TensorCoreFP8Layout: dequantize = qdata.to(dtype) * scale, quantize scale = amax / fp8 max),
# comfy/utils.py (convert_old_quants: scale_weight -> weight_scale, scale_input -> input_scale) and
# comfy/model_base.py (the marker is saved as `scaled_fp8` = torch.tensor([], dtype=fp8 dtype)).
# ---------------------------------------------------------------------------------------------------------------


def _decode_comfy_quant(tensor: torch.Tensor, key: str, source: str) -> dict:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"`{key}` in `{source}` must hold a JSON quantization config but could not be read: {err}."
        ) from err


def _layer_quant_formats(sd: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> dict[str, str]:
    """Layer name -> ComfyUI quant format, from `<layer>.comfy_quant` tensors and `_quantization_metadata`."""
    formats = {}
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(
                f"`_quantization_metadata` in `{source}` must be a JSON object but is not: {err}."
            ) from err
        for layer, conf in layers.items():
            formats[_strip_key_prefix(layer)] = conf.get("format") if isinstance(conf, dict) else str(conf)
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        formats[key[: -len(".comfy_quant")]] = _decode_comfy_quant(sd.pop(key), key, source).get("format")
    return formats


def _apply_scale(weight: torch.Tensor, scale: torch.Tensor, key: str, source: str) -> torch.Tensor:
    if weight.dtype not in _FP8_DTYPES:
        raise ValueError(
            f"`{key}` in `{source}` must be stored as fp8 when it has a scale, but is {weight.dtype}. "
            "Only fp8 quantized checkpoints (plain, scaled or comfy_quant float8) are supported."
        )
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == weight.shape[0]:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))  # one scale per output row
    else:
        raise ValueError(
            f"The scale of `{key}` in `{source}` must be a scalar or have one value per output row, but has shape "
            f"{tuple(scale.shape)} for a weight of shape {tuple(weight.shape)}."
        )
    # weight_real = weight_fp8 * scale, in float32 (ComfyUI multiplies in the compute dtype; fp32 is exact here).
    return weight.to(torch.float32) * scale


def _dequantize_(sd: dict[str, torch.Tensor], dtype: torch.dtype, metadata: dict[str, str], source: str):
    """`dequantize_state_dict` that empties `sd` as it goes, so each source tensor is freed once converted."""
    for key in [k for k in sd if k == "scaled_fp8" or k.endswith(".scaled_fp8")]:
        del sd[key]
    formats = _layer_quant_formats(sd, metadata, source)
    unsupported = {layer: fmt for layer, fmt in formats.items() if fmt not in _SUPPORTED_COMFY_QUANT_FORMATS}
    if unsupported:
        layer, fmt = next(iter(unsupported.items()))
        raise ValueError(
            f"`{source}` uses ComfyUI quantization format {fmt!r} (layer `{layer}` and {len(unsupported) - 1} more), "
            f"but only {sorted(_SUPPORTED_COMFY_QUANT_FORMATS)} and legacy scaled fp8 can be loaded. "
            "Use a bf16 or fp8 FLUX.1-Fill-dev checkpoint."
        )
    for key in [k for k in sd if k.endswith((".scale_input", ".input_scale"))]:
        del sd[key]  # activation scales only matter for fp8 matmuls

    out: dict[str, torch.Tensor] = {}
    n_scaled = 0
    for key in [k for k in sd if k.endswith((".scale_weight", ".weight_scale"))]:
        weight_key = f"{key.rsplit('.', 1)[0]}.weight"
        if weight_key not in sd:
            raise ValueError(f"`{source}` has the scale `{key}` but no `{weight_key}`. The checkpoint is incomplete.")
        out[weight_key] = _apply_scale(sd.pop(weight_key), sd.pop(key), weight_key, source).to(dtype)
        n_scaled += 1
    for key in list(sd):
        tensor = sd.pop(key)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out, n_scaled


def dequantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, str] | None = None,
    source: str = "state_dict",
) -> tuple[dict[str, torch.Tensor], int]:
    """Dequantise ComfyUI fp8 layers and cast every floating tensor to `dtype`.

    Handles plain fp8 (a cast), legacy scaled fp8 (`scaled_fp8` marker, `<layer>.scale_weight`, optional
    `<layer>.scale_input`) and the newer `<layer>.comfy_quant` / `_quantization_metadata` float8 layers
    (`<layer>.weight_scale`, optional `<layer>.input_scale`): weight = fp8 weight * scale, computed in float32.
    Input scales only matter for fp8 matmuls and are dropped. Layer names are left as they are.

    Returns:
        The converted state dict (quantization keys removed) and the number of scaled layers.
    """
    return _dequantize_(dict(state_dict), dtype, metadata or {}, source)


def quantize_state_dict_fp8(
    state_dict: dict[str, torch.Tensor], scaled: bool, *, comfy_quant: bool = False
) -> dict[str, torch.Tensor]:
    """Write a state dict the way ComfyUI stores fp8 diffusion models (used to make tiny test files).

    - `scaled=False`: plain `float8_e4m3fn`; every floating tensor is cast (what `model.to(fp8)` + save gives).
    - `scaled=True`: ComfyUI's legacy scaled fp8. Every 2-D `.weight` (the Linear layers, which is what
      `scaled_fp8_ops` replaces) becomes `weight / scale` in fp8 with a float32 scalar `<layer>.scale_weight`,
      scale = amax / 448; other tensors keep their dtype; the marker `scaled_fp8` is an empty fp8 tensor.
    - `scaled=True, comfy_quant=True`: the newer layout: `<layer>.weight_scale` plus a `<layer>.comfy_quant` uint8
      JSON tensor `{"format": "float8_e4m3fn"}`, no marker.
    """
    if comfy_quant and not scaled:
        raise ValueError("`comfy_quant` must be used with `scaled=True` but got scaled=False. Set scaled=True.")
    fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(fp8).max
    out = {}
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            out[key] = tensor
        elif not scaled:
            out[key] = tensor.to(fp8)
        elif key.endswith(".weight") and tensor.ndim == 2:
            layer = key[: -len(".weight")]
            weight = tensor.to(torch.float32)
            amax = weight.abs().max()
            scale = (amax / fp8_max if amax > 0 else torch.tensor(1.0)).to(torch.float32)
            out[key] = (weight / scale).clamp(-fp8_max, fp8_max).to(fp8)
            if comfy_quant:
                out[f"{layer}.weight_scale"] = scale
                conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
                out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
            else:
                out[f"{layer}.scale_weight"] = scale
        else:
            out[key] = tensor
    if scaled and not comfy_quant:
        out["scaled_fp8"] = torch.tensor([], dtype=fp8)
    return out
