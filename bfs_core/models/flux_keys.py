"""FLUX transformer state dicts: the BFL <-> diffusers key table, in both directions.

BFL layout: `flux1-fill-dev.safetensors` (and ComfyUI's `models/diffusion_models`, optionally prefixed
`model.diffusion_model.` / `diffusion_model.`). diffusers layout: `FluxTransformer2DModel`.
"""

import re
from dataclasses import dataclass

import torch


_DIFFUSION_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


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
