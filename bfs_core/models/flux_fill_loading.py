"""Offline loading of the FLUX.1-Fill-dev transformer from every on-disk layout the pack reads.

Layouts:
- a diffusers folder (the pipeline root with ``transformer/``, or the transformer folder itself);
- a single safetensors file with BFL keys (``flux1-fill-dev.safetensors``, ComfyUI ``models/diffusion_models``),
  optionally prefixed ``model.diffusion_model.`` / ``diffusion_model.``, or with diffusers keys;
- a GGUF file (city96's ComfyUI-GGUF conversions, BFL keys; Q8_0 ... Q4_K kept quantised, `gguf.py`);
- stored as bf16/fp16/fp32, plain ``float8_e4m3fn``/``float8_e5m2`` (upcast), ComfyUI's legacy *scaled fp8*
  (``scaled_fp8`` marker + ``<layer>.scale_weight``) or its newer per-layer ``<layer>.comfy_quant`` fp8 format
  (``<layer>.weight_scale``, or the ``_quantization_metadata`` safetensors header entry).

Nothing here downloads anything: configs come from the caller, the file, or ``bfs_core/configs``. The BFL <-> diffusers
key table is `flux_keys.py`, the fp8 dequantisation `fp8.py`.
"""

import json
import logging
import os
import pathlib
import re
from collections import Counter

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel

from ..errors import UserInputError, read_safetensors, reading_folder
from .flux_keys import _strip_diffusion_model_prefix, bfl_to_diffusers
from .fp8 import _dequantize_
from .gguf import GGUF_SUFFIX, logical_numel, quant_type_name


logger = logging.getLogger(__name__)

_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_FILL_IN_CHANNELS = 384  # [noisy latent 64 | masked-image latent 64 | mask 256], packed 2x2
_FILL_OUT_CHANNELS = 64
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
    layout = _key_layout(raw, source)
    _check_is_fill_early(raw, source)
    sd, n_scaled = _dequantize_(raw, torch_dtype, metadata, source)
    sd = bfl_to_diffusers(sd, source=source) if layout == "BFL" else sd
    chosen = _config_for(sd, config, source)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(chosen)
    _check_keys_and_shapes(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    fmt = f"{layout} single file, stored {dict(stored)}" + (
        f", {n_scaled} scaled fp8 layers dequantised" if n_scaled else ""
    )
    return model.to(device).eval(), fmt


def _load_from_gguf(
    path: pathlib.Path, torch_dtype: torch.dtype, device: str | torch.device, config: dict | str | None, name: str
) -> tuple[FluxTransformer2DModel, str]:
    """A GGUF file (ComfyUI-GGUF, BFL keys): the Linears stay quantised and dequantise per call (see `gguf.py`)."""
    from .gguf import load_gguf_flux_fill, logical_shape, quant_type_name, read_gguf_state_dict

    source = str(path)
    raw = read_gguf_state_dict(path, name)
    stored = Counter(quant_type_name(t) for t in raw.values())
    raw, _ = _strip_diffusion_model_prefix(raw)
    layout = _key_layout(raw, source)
    shapes = {k: torch.empty(logical_shape(v), device="meta") for k, v in raw.items()}
    _check_is_fill_early(shapes, source)
    sd = bfl_to_diffusers(raw, source=source) if layout == "BFL" else raw
    shapes = {k: torch.empty(logical_shape(v), device="meta") for k, v in sd.items()}
    chosen = _config_for(shapes, config, source)
    with init_empty_weights():
        _check_keys_and_shapes(FluxTransformer2DModel.from_config(chosen), shapes, source)
    model = load_gguf_flux_fill(path, sd, chosen, compute_dtype=torch_dtype, device=device)
    return model, f"{layout} GGUF file, stored {dict(stored)}, computed in {str(torch_dtype).replace('torch.', '')}"


def _key_layout(raw: dict[str, torch.Tensor], source: str) -> str:
    if "img_in.weight" in raw or any(k.startswith(("double_blocks.", "single_blocks.")) for k in raw):
        return "BFL"
    if "x_embedder.weight" in raw or any(k.startswith("transformer_blocks.") for k in raw):
        return "diffusers"
    raise ValueError(
        f"`{source}` is not a FLUX transformer checkpoint: it has neither `img_in.weight` (BFL layout) nor "
        f"`x_embedder.weight` (diffusers layout); first keys: {sorted(raw)[:6]}. BFS needs FLUX.1-Fill-dev "
        "(flux1-fill-dev.safetensors or a .gguf in models/diffusion_models, or the diffusers folder)."
    )


def _check_is_fill_early(raw: dict[str, torch.Tensor], source: str) -> None:
    """Fail before dequantising a whole wrong model."""
    in_weight = raw.get("img_in.weight", raw.get("x_embedder.weight"))
    out_weight = raw.get("final_layer.linear.weight", raw.get("proj_out.weight"))
    if in_weight is not None and out_weight is not None:
        _check_is_fill(in_weight.shape[1], out_weight.shape[0], source)


def _config_for(sd: dict[str, torch.Tensor], config: dict | str | None, source: str) -> dict:
    inferred = _infer_config(sd, source)
    _check_is_fill(inferred["in_channels"], inferred["out_channels"], source)
    return _choose_config(inferred, config, source)


def _check_keys_and_shapes(model: FluxTransformer2DModel, sd: dict[str, torch.Tensor], source: str) -> None:
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
            `.safetensors` file in the BFL or diffusers key layout, bf16/fp16/fp32, plain fp8 or ComfyUI scaled fp8,
            or a `.gguf` file (ComfyUI-GGUF: Q8_0 ... Q4_K; its Linears stay quantised, see `gguf.py`).
        torch_dtype: dtype of the returned weights; fp8 weights are dequantised to it. GGUF: the compute dtype.
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
    elif path.suffix.lower() in (".safetensors", ".sft", GGUF_SUFFIX):
        load = _load_from_gguf if path.suffix.lower() == GGUF_SUFFIX else _load_from_single_file
        try:
            model, fmt = load(path, torch_dtype, device, config, name)
        except UserInputError:
            raise
        except ValueError as err:  # the file's own checks (not Fill, not FLUX, keys): say which input it was
            raise UserInputError(f"`{name}`: {err}") from err
    else:
        raise UserInputError(
            f"`{name}` must be a folder, a .safetensors or a .gguf file but got {str(path)!r}. Convert other formats "
            "to safetensors first; pickled checkpoints are not loaded."
        )
    n_params = sum(logical_numel(p) for p in model.parameters())
    dtypes = Counter(quant_type_name(p) for p in model.parameters())
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
