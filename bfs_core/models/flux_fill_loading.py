"""Offline loading of the FLUX.1-Fill-dev transformer from every on-disk layout the pack reads.

Layouts:
- a diffusers folder (the pipeline root with ``transformer/``, or the transformer folder itself);
- a single safetensors file with BFL keys (``flux1-fill-dev.safetensors``, ComfyUI ``models/diffusion_models``),
  optionally prefixed ``model.diffusion_model.`` / ``diffusion_model.``, or with diffusers keys;
- stored as bf16/fp16/fp32, plain ``float8_e4m3fn``/``float8_e5m2`` (upcast), ComfyUI's legacy *scaled fp8*
  (``scaled_fp8`` marker + ``<layer>.scale_weight``) or its newer per-layer ``<layer>.comfy_quant`` fp8 format
  (``<layer>.weight_scale``, or the ``_quantization_metadata`` safetensors header entry).

Nothing here downloads anything: configs come from the caller, the file, or ``bfs_core/configs``.
"""

import json
import logging
import math
import os
import pathlib
import re
from collections import Counter
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from ..atomic import atomic_dir, atomic_path
from ..errors import UserInputError, read_safetensors, reading_folder


logger = logging.getLogger(__name__)

_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_DIFFUSION_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_FILL_IN_CHANNELS = 384  # [noisy latent 64 | masked-image latent 64 | mask 256], packed 2x2
_FILL_OUT_CHANNELS = 64
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SUPPORTED_COMFY_QUANT_FORMATS = {"float8_e4m3fn", "float8_e5m2"}
# Config fields that the tensor shapes determine; everything else (axes_dims_rope) must come from a config.
_SHAPE_CONFIG_KEYS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
)


# ---------------------------------------------------------------------------------------------------------------
# The BFL <-> diffusers key table. Written once, used in both directions.
# Follows the layout of diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
# (diffusers@0.42.1), but sizes come from the tensors instead of a hard-coded hidden size of 3072.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    bfl: str  # one parameter in the BFL layout, relative to its block
    diffusers: tuple[str, ...]  # the diffusers parameter(s) it holds, in row order
    how: str  # "copy" | "split" (fused rows: hidden, hidden, ..., rest) | "swap" (the two row halves swapped)


def _linear(bfl: str, *diffusers: str, how: str = "copy") -> list[_Rule]:
    return [
        _Rule(f"{bfl}.{param}", tuple(f"{name}.{param}" for name in diffusers), how) for param in ("weight", "bias")
    ]


_GLOBAL_RULES = [
    *_linear("img_in", "x_embedder"),
    *_linear("txt_in", "context_embedder"),
    *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    *_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    *_linear("final_layer.linear", "proj_out"),
    # BFL emits (shift, scale); diffusers' AdaLayerNormContinuous chunks (scale, shift).
    *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", how="swap"),
]
_DOUBLE_RULES = [
    *_linear("img_mod.lin", "norm1.linear"),
    *_linear("txt_mod.lin", "norm1_context.linear"),
    *_linear("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v", how="split"),
    _Rule("img_attn.norm.query_norm.scale", ("attn.norm_q.weight",), "copy"),
    _Rule("img_attn.norm.key_norm.scale", ("attn.norm_k.weight",), "copy"),
    *_linear("img_attn.proj", "attn.to_out.0"),
    *_linear("img_mlp.0", "ff.net.0.proj"),
    *_linear("img_mlp.2", "ff.net.2"),
    *_linear("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", how="split"),
    _Rule("txt_attn.norm.query_norm.scale", ("attn.norm_added_q.weight",), "copy"),
    _Rule("txt_attn.norm.key_norm.scale", ("attn.norm_added_k.weight",), "copy"),
    *_linear("txt_attn.proj", "attn.to_add_out"),
    *_linear("txt_mlp.0", "ff_context.net.0.proj"),
    *_linear("txt_mlp.2", "ff_context.net.2"),
]
_SINGLE_RULES = [
    # linear1 rows are [q (D) | k (D) | v (D) | mlp (4D)]
    *_linear("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", how="split"),
    *_linear("linear2", "proj_out"),
    _Rule("norm.query_norm.scale", ("attn.norm_q.weight",), "copy"),
    _Rule("norm.key_norm.scale", ("attn.norm_k.weight",), "copy"),
    *_linear("modulation.lin", "norm.linear"),
]
# (BFL block prefix, diffusers block prefix, rules); "{}" is the block index.
_SCOPES = (
    ("double_blocks.{}.", "transformer_blocks.{}.", _DOUBLE_RULES),
    ("single_blocks.{}.", "single_transformer_blocks.{}.", _SINGLE_RULES),
)
_BLOCK_INDEX = {
    "bfl": [re.compile(r"^double_blocks\.(\d+)\."), re.compile(r"^single_blocks\.(\d+)\.")],
    "diffusers": [re.compile(r"^transformer_blocks\.(\d+)\."), re.compile(r"^single_transformer_blocks\.(\d+)\.")],
}


def _expanded_rules(keys: list[str], layout: str) -> list[_Rule]:
    """The rule table with full key names, for every block index that appears in `keys`."""
    rules = list(_GLOBAL_RULES)
    for (bfl_prefix, diffusers_prefix, block_rules), pattern in zip(_SCOPES, _BLOCK_INDEX[layout]):
        indices = sorted({int(m.group(1)) for m in map(pattern.match, keys) if m})
        for i in indices:
            bp, dp = bfl_prefix.format(i), diffusers_prefix.format(i)
            rules += [_Rule(bp + r.bfl, tuple(dp + d for d in r.diffusers), r.how) for r in block_rules]
    return rules


def _unknown_keys_error(unknown: list[str], layout: str, source: str) -> ValueError:
    return ValueError(
        f"`{source}` has {len(unknown)} key(s) that are not FLUX transformer keys in the {layout} layout "
        f"(first few: {sorted(unknown)[:8]}). Pass a FLUX.1-Fill-dev transformer checkpoint "
        "(flux1-fill-dev.safetensors or a diffusers `transformer/` folder), not a LoRA, VAE, text encoder "
        "or other model."
    )


def _strip_key_prefix(key: str) -> str:
    for prefix in _DIFFUSION_MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _strip_diffusion_model_prefix(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop ComfyUI's `model.diffusion_model.` / `diffusion_model.` prefix.

    In an all-in-one checkpoint the unprefixed keys belong to the VAE and text encoders; they are dropped and
    counted.
    """
    for prefix in _DIFFUSION_MODEL_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            kept = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            return kept, len(state_dict) - len(kept)
    return dict(state_dict), 0


def _bfl_hidden_size(state_dict: dict[str, torch.Tensor], source: str) -> int:
    if "img_in.weight" in state_dict:
        return int(state_dict["img_in.weight"].shape[0])  # [hidden, in_channels]
    fused = re.compile(r"^(single_blocks\.\d+\.linear1|double_blocks\.\d+\.(img|txt)_attn\.qkv)\.weight$")
    for key, tensor in state_dict.items():
        if fused.match(key):
            return int(tensor.shape[1])  # fused projections read the hidden state: [rows, hidden]
    raise ValueError(
        f"`{source}` must contain `img_in.weight` or a block weight to tell the hidden size, but has neither. "
        "Pass a complete FLUX transformer checkpoint."
    )


def _split_rows(tensor: torch.Tensor, parts: int, hidden: int, key: str, source: str) -> tuple[torch.Tensor, ...]:
    rest = tensor.shape[0] - (parts - 1) * hidden
    if rest <= 0 or (parts == 3 and rest != hidden):
        raise ValueError(
            f"`{key}` in `{source}` must have {parts - 1} blocks of {hidden} rows plus the rest, but has shape "
            f"{tuple(tensor.shape)}. The checkpoint is damaged or not a FLUX transformer."
        )
    # Chunks along dim 0 of a contiguous tensor are contiguous views: no copy.
    return torch.split(tensor, [hidden] * (parts - 1) + [rest], dim=0)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Key conversion (public)
# ---------------------------------------------------------------------------------------------------------------


def bfl_to_diffusers(state_dict: dict[str, torch.Tensor], *, source: str = "state_dict") -> dict[str, torch.Tensor]:
    """Convert a BFL-layout FLUX transformer state dict to `FluxTransformer2DModel` keys.

    Hidden size and block counts come from the tensors, so tiny test models convert too. The prefixes
    `model.diffusion_model.` and `diffusion_model.` are stripped. Keys that are not FLUX transformer keys raise a
    `ValueError` that lists them and names `source`.
    """
    sd, _ = _strip_diffusion_model_prefix(state_dict)
    hidden = _bfl_hidden_size(sd, source)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for rule in _expanded_rules(list(sd), "bfl"):
        if rule.bfl not in sd:
            continue
        tensor = sd[rule.bfl]
        consumed.add(rule.bfl)
        if rule.how == "split":
            out.update(zip(rule.diffusers, _split_rows(tensor, len(rule.diffusers), hidden, rule.bfl, source)))
        elif rule.how == "swap":
            out[rule.diffusers[0]] = _swap_halves(tensor)
        else:
            out[rule.diffusers[0]] = tensor
    unknown = [k for k in sd if k not in consumed]
    if unknown:
        raise _unknown_keys_error(unknown, "BFL", source)
    return out


def diffusers_to_bfl(state_dict: dict[str, torch.Tensor], *, source: str = "state_dict") -> dict[str, torch.Tensor]:
    """Convert `FluxTransformer2DModel` keys to the BFL layout (the inverse of `bfl_to_diffusers`)."""
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for rule in _expanded_rules(list(sd), "diffusers"):
        present = [k for k in rule.diffusers if k in sd]
        if not present:
            continue
        if len(present) != len(rule.diffusers):
            missing = [k for k in rule.diffusers if k not in sd]
            raise ValueError(
                f"`{source}` must contain all of {list(rule.diffusers)} to build `{rule.bfl}`, but lacks {missing}. "
                "Pass a complete transformer state dict."
            )
        consumed.update(present)
        if rule.how == "split":
            out[rule.bfl] = torch.cat([sd[k] for k in rule.diffusers], dim=0)
        elif rule.how == "swap":
            out[rule.bfl] = _swap_halves(sd[rule.diffusers[0]])
        else:
            out[rule.bfl] = sd[rule.diffusers[0]]
    unknown = [k for k in sd if k not in consumed]
    if unknown:
        raise _unknown_keys_error(unknown, "diffusers", source)
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Config and loading helpers
# ---------------------------------------------------------------------------------------------------------------


def load_shipped_config(name: str) -> dict:
    """A config shipped in `bfs_core/configs`: `flux_fill_transformer` or `flux_fill_scheduler` (".json" optional)."""
    path = _CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        available = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))
        raise ValueError(f"`name` must be one of {available} but got {name!r}.")
    return json.loads(path.read_text(encoding="utf-8"))


def _default_axes_dims_rope(head_dim: int) -> list[int] | None:
    # FLUX splits each head as (t, h, w) = (1/8, 7/16, 7/16); every part must be even for the rotary pairs.
    if head_dim % 32 != 0:
        return None
    return [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]


def _infer_config(sd: dict[str, torch.Tensor], source: str) -> dict:
    """FluxTransformer2DModel config fields from diffusers-key tensor shapes (axes_dims_rope is a guess)."""
    required = (
        "x_embedder.weight",
        "context_embedder.weight",
        "proj_out.weight",
        "time_text_embed.text_embedder.linear_1.weight",
    )
    missing = [k for k in required if k not in sd]
    norm_q = next((k for k in sd if re.match(r"^(single_)?transformer_blocks\.\d+\.attn\.norm_q\.weight$", k)), None)
    if missing or norm_q is None:
        raise ValueError(
            f"`{source}` must contain {list(required)} and at least one block, but lacks "
            f"{missing or ['transformer blocks']}. Pass a complete FLUX transformer checkpoint."
        )
    inner, in_channels = sd["x_embedder.weight"].shape
    head_dim = sd[norm_q].shape[0]
    double = {int(m.group(1)) for m in map(re.compile(r"^transformer_blocks\.(\d+)\.").match, sd) if m}
    single = {int(m.group(1)) for m in map(re.compile(r"^single_transformer_blocks\.(\d+)\.").match, sd) if m}
    mlp = sd.get("single_transformer_blocks.0.proj_mlp.weight", sd.get("transformer_blocks.0.ff.net.0.proj.weight"))
    if inner % head_dim != 0 or (mlp is not None and mlp.shape[0] != 4 * inner):
        raise ValueError(
            f"`{source}` must have a hidden size divisible by the head dim and an MLP of 4x hidden, but has hidden "
            f"{inner}, head dim {head_dim}, MLP {None if mlp is None else mlp.shape[0]}. It is not a FLUX transformer."
        )
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(sd["proj_out.weight"].shape[0]),
        "num_layers": len(double),
        "num_single_layers": len(single),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": _default_axes_dims_rope(int(head_dim)),
    }


def _check_is_fill(in_channels: int, out_channels: int, source: str) -> None:
    if in_channels == _FILL_IN_CHANNELS and out_channels == _FILL_OUT_CHANNELS:
        return
    kind = {
        64: "a FLUX.1-dev / FLUX.1-schnell style text-to-image model (64 input channels)",
        128: "a FLUX.1-Depth/Canny-dev style control model (128 input channels)",
    }.get(in_channels, f"a FLUX-architecture model with {in_channels} input channels")
    raise ValueError(
        f"`{source}` is {kind}, but BFS needs FLUX.1-Fill-dev ({_FILL_IN_CHANNELS} input and {_FILL_OUT_CHANNELS} "
        f"output channels; got {in_channels} and {out_channels}). Select flux1-fill-dev.safetensors (bf16 or fp8) "
        "or the black-forest-labs/FLUX.1-Fill-dev diffusers folder."
    )


def _resolve_config_arg(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = pathlib.Path(config)
    for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise ValueError(
        f"`config` must be a dict, a config.json file, or a folder holding config.json (or transformer/config.json), "
        f"but got {str(config)!r}, which has none. Pass a local path; nothing is downloaded."
    )


def _choose_config(inferred: dict, config: dict | str | os.PathLike | None, source: str) -> dict:
    if config is not None:
        given = _resolve_config_arg(config)
        wrong = {
            k: (given.get(k), inferred[k]) for k in _SHAPE_CONFIG_KEYS if given.get(k, inferred[k]) != inferred[k]
        }
        if wrong:
            raise ValueError(
                f"`config` must match the tensors in `{source}`, but these fields differ (config, file): {wrong}. "
                "Pass the config that belongs to this checkpoint, or none to infer it."
            )
        chosen = {**inferred, **{k: v for k, v in given.items() if v is not None or k != "axes_dims_rope"}}
    else:
        shipped = load_shipped_config("flux_fill_transformer")
        if all(shipped[k] == inferred[k] for k in _SHAPE_CONFIG_KEYS):
            return shipped
        chosen = inferred
    if chosen["axes_dims_rope"] is None:
        raise ValueError(
            f"`{source}` has head dim {inferred['attention_head_dim']}, which is not a multiple of 32, so "
            "`axes_dims_rope` cannot be inferred. Pass `config=` with `axes_dims_rope` (three even ints summing to "
            "the head dim)."
        )
    return chosen


def _find_diffusers_transformer_folder(path: pathlib.Path) -> pathlib.Path | None:
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    return None


def _load_from_diffusers_folder(
    folder: pathlib.Path, torch_dtype: torch.dtype, device: str | torch.device, name: str = "path"
):
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(
            f"`{name}` folder {str(folder)!r} has a config.json that is not valid JSON ({err}): re-download it."
        ) from err
    if config.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ValueError(
            f"`{folder}` must hold a FluxTransformer2DModel but its config.json says {config.get('_class_name')!r}. "
            "Point to the FLUX.1-Fill-dev folder or its `transformer/` subfolder."
        )
    _check_is_fill(
        config.get("in_channels", 64), config.get("out_channels") or config.get("in_channels", 64), str(folder)
    )
    with reading_folder(folder, name, "a diffusers FluxTransformer2DModel folder"):
        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval()


def _load_from_single_file(
    path: pathlib.Path,
    torch_dtype: torch.dtype,
    device: str | torch.device,
    config: dict | str | None,
    name: str = "path",
) -> tuple[FluxTransformer2DModel, str]:
    source = str(path)
    raw, metadata = read_safetensors(path, name)
    stored = Counter(str(t.dtype).replace("torch.", "") for t in raw.values())
    raw, n_other = _strip_diffusion_model_prefix(raw)
    if n_other:
        logger.info(
            "Ignoring %d non-transformer tensors (VAE / text encoders) in all-in-one checkpoint %s", n_other, path
        )
    if "img_in.weight" in raw or any(k.startswith(("double_blocks.", "single_blocks.")) for k in raw):
        layout = "BFL"
    elif "x_embedder.weight" in raw or any(k.startswith("transformer_blocks.") for k in raw):
        layout = "diffusers"
    else:
        raise ValueError(
            f"`{source}` is not a FLUX transformer checkpoint: it has neither `img_in.weight` (BFL layout) nor "
            f"`x_embedder.weight` (diffusers layout); first keys: {sorted(raw)[:6]}. BFS needs FLUX.1-Fill-dev "
            "(flux1-fill-dev.safetensors in models/diffusion_models, or the diffusers folder)."
        )
    in_weight = raw.get("img_in.weight", raw.get("x_embedder.weight"))
    out_weight = raw.get("final_layer.linear.weight", raw.get("proj_out.weight"))
    if in_weight is not None and out_weight is not None:  # fail before dequantising a whole wrong model
        _check_is_fill(in_weight.shape[1], out_weight.shape[0], source)
    sd, n_scaled = _dequantize_(raw, torch_dtype, metadata, source)
    sd = bfl_to_diffusers(sd, source=source) if layout == "BFL" else sd
    inferred = _infer_config(sd, source)
    _check_is_fill(inferred["in_channels"], inferred["out_channels"], source)
    chosen = _choose_config(inferred, config, source)

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(chosen)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"`{source}` must provide exactly the FluxTransformer2DModel weights for its config, but "
            f"{len(missing)} are missing (first: {missing[:5]}), {len(unexpected)} are unexpected (first: "
            f"{unexpected[:5]}) and {len(wrong_shape)} have the wrong shape (first: {wrong_shape[:3]}). "
            "The file is incomplete or does not match `config`."
        )
    model.load_state_dict(sd, strict=True, assign=True)
    fmt = f"{layout} single file, stored {dict(stored)}" + (
        f", {n_scaled} scaled fp8 layers dequantised" if n_scaled else ""
    )
    return model.to(device).eval(), fmt


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def load_flux_fill_transformer(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: dict | str | None = None,
    name: str = "path",
) -> FluxTransformer2DModel:
    """Load the FLUX.1-Fill-dev transformer offline from a diffusers folder or a single safetensors file.

    Args:
        path: a diffusers pipeline root (with `transformer/`), a transformer folder (with `config.json`), or a
            `.safetensors` file in the BFL or diffusers key layout, bf16/fp16/fp32, plain fp8 or ComfyUI scaled fp8.
        torch_dtype: dtype of the returned weights; fp8 weights are dequantised to it.
        device: where the model ends up (it is assembled on the CPU).
        config: single files only: a config dict, a `config.json` path, or a folder holding one. Without it the
            shipped FLUX.1-Fill-dev config is used when the shapes match it, else a config inferred from the shapes.
        name: the input as the user knows it (`base_model`, `--base`), named in every error message.

    Raises:
        ValueError: the path does not exist, the file is not a FLUX transformer, the model is not Fill
            (e.g. FLUX.1-dev with 64 input channels), or keys are missing/unexpected.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UserInputError(
            f"`{name}` must be an existing file or folder but got {str(path)!r}, which does not exist. Pass "
            "FLUX.1-Fill-dev as a diffusers folder or a single .safetensors file on this machine."
        )
    if path.is_dir():
        folder = _find_diffusers_transformer_folder(path)
        if folder is None:
            raise UserInputError(
                f"`{name}` must be a diffusers folder with `config.json` or `transformer/config.json`, but "
                f"{str(path)!r} has neither. Pass the FLUX.1-Fill-dev folder or a single .safetensors file."
            )
        if config is not None:
            raise ValueError(
                "`config` must be None for a diffusers folder (it has its own config.json) but was given."
            )
        model = _load_from_diffusers_folder(folder, torch_dtype, device, name)
        fmt = f"diffusers folder {folder}"
    elif path.suffix.lower() in (".safetensors", ".sft"):
        try:
            model, fmt = _load_from_single_file(path, torch_dtype, device, config, name)
        except UserInputError:
            raise
        except ValueError as err:  # the file's own checks (not Fill, not FLUX, keys): say which input it was
            raise UserInputError(f"`{name}`: {err}") from err
    else:
        raise UserInputError(
            f"`{name}` must be a folder or a .safetensors file but got {str(path)!r}. Convert other formats to "
            "safetensors first; pickled checkpoints are not loaded."
        )
    n_params = sum(p.numel() for p in model.parameters())
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
    logger.info(
        "Loaded FLUX.1-Fill transformer from %s (%s): %d double + %d single blocks, %.1f M params as %s on %s",
        path,
        fmt,
        model.config.num_layers,
        model.config.num_single_layers,
        n_params / 1e6,
        dict(dtypes),
        device,
    )
    return model


def _random_flux(config: dict, seed: int) -> FluxTransformer2DModel:
    """A bf16 FluxTransformer2DModel with non-trivial random weights (fan-in scaled Linears, norm scales near 1)."""
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    generator = torch.Generator("cpu").manual_seed(seed)
    sd = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 2:
            sd[name] = noise / math.sqrt(param.shape[1])
        elif re.search(r"norm_(added_)?[qk]\.weight$", name):
            sd[name] = 1.0 + 0.1 * noise
        else:
            sd[name] = 0.05 * noise
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def _tiny_fill_config(in_channels: int = _FILL_IN_CHANNELS) -> dict:
    return {
        **load_shipped_config("flux_fill_transformer"),
        "in_channels": in_channels,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": [4, 14, 14],
    }


def write_tiny_flux_fill(out_dir: pathlib.Path, *, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write a tiny random Fill-shaped transformer in every layout the loader reads.

    Returns paths by name: `diffusers` (pipeline root holding `transformer/`), `bfl_bf16`, `bfl_fp8`,
    `bfl_fp8_scaled` (ComfyUI legacy scaled fp8), `bfl_fp8_comfy_quant` (newer per-layer format) and
    `bfl_non_fill` (a 64-input-channel FLUX.1-dev-shaped model, for the error path).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _random_flux(_tiny_fill_config(), seed)
    paths = {"diffusers": out_dir / "flux-fill-diffusers"}
    paths["diffusers"].mkdir(exist_ok=True)
    with atomic_dir(paths["diffusers"] / "transformer") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)

    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}
    files = {
        "bfl_bf16": ("flux1-fill-tiny-bf16.safetensors", bfl),
        "bfl_fp8": ("flux1-fill-tiny-fp8_e4m3fn.safetensors", quantize_state_dict_fp8(bfl, scaled=False)),
        "bfl_fp8_scaled": ("flux1-fill-tiny-fp8_scaled.safetensors", quantize_state_dict_fp8(bfl, scaled=True)),
        "bfl_fp8_comfy_quant": (
            "flux1-fill-tiny-fp8_comfy_quant.safetensors",
            quantize_state_dict_fp8(bfl, scaled=True, comfy_quant=True),
        ),
    }
    other = _random_flux(_tiny_fill_config(in_channels=64), seed + 1)
    other_bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(other.state_dict()).items()}
    files["bfl_non_fill"] = ("flux1-dev-tiny-bf16.safetensors", other_bfl)
    for name, (filename, sd) in files.items():
        paths[name] = out_dir / filename
        with atomic_path(paths[name]) as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
    return paths
