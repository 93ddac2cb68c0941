"""BFS weight files: the official release's `trained_weights.pt` and this pack's safetensors format.

Our format (`*.safetensors`), documented once here:
- tensors, keyed relative to the FluxTransformer2DModel:
  - content LoRAs: `<block>.<linear>.lora_A.{comp,fg}.weight` [r, in] and `...lora_B.{comp,fg}.weight` [out, r];
  - joint module: `<block>.joint.{to_q,to_k,to_v,to_out}.lora_{A,B}.{comp,fg}.weight` (to_out in double blocks only),
    `<block>.joint.post.weight` (linear post, [D, D]) or `<block>.joint.post.fc{1,2}.{weight,bias}` (mlp post);
  - optional `<block>.joint.base.{to_q,to_k,to_v,to_out,norm_q,norm_k}.*`: private frozen base copies, present only
    when the source checkpoint's joint base weights differ from Flux-Fill's;
  - optional `base_override.<flux key>`: Flux-Fill weights the checkpoint replaces (applied after the joint module took
    its copies of the originals, as the release does).
- metadata: `format` = "bfs-dual-flux", `format_version` = "1", `bfs_config` = `DualBranchConfig` as JSON,
  `base_model` = "FLUX.1-Fill-dev".
`<block>` is `transformer_blocks.{i}` or `single_transformer_blocks.{j}`.

The official `.pt` (spec bfs-official-release.md §1) is read with `torch.load(weights_only=True)` and mapped:
`attn1n.<p>.lora_{A,B}.xy_lora` -> `joint.<p>.lora_{A,B}.comp`, `yx_lora` -> `fg` (to_out.0 -> to_out),
`conv1n.weight` -> `joint.post.weight`, `attn1n.<p>.base_layer.*` / `attn1n.norm_{q,k}.weight` -> `joint.base.*`,
plain Flux keys -> `base_override.*`. Every key that cannot be placed is reported per block type, as the release
would have dropped it silently. Double-block joint modules absent from the file are not created: their output would
be exactly zero (conv1n stays zero), so skipping them leaves the numerics identical.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import UserInputError, load_torch_tensors, open_safetensors
from .dual_flux import DualBranchConfig, DualBranchFlux, bfs_state_dict, dual_branch_config, prepare_for_inference


logger = logging.getLogger(__name__)

FORMAT_NAME = "bfs-dual-flux"
FORMAT_VERSION = "1"
_BLOCK = r"(?P<block>(?:transformer_blocks|single_transformer_blocks)\.\d+)"
_OFFICIAL_LORA = re.compile(
    _BLOCK + r"\.attn1n\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.lora_(?P<ab>A|B)\."
    r"(?P<dir>xy_lora|yx_lora)\.weight$"
)
_OFFICIAL_POST = re.compile(_BLOCK + r"\.conv1n\.weight$")
_OFFICIAL_BASE = re.compile(_BLOCK + r"\.attn1n\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.base_layer\.(?P<p>weight|bias)$")
_OFFICIAL_NORM = re.compile(_BLOCK + r"\.attn1n\.norm_(?P<qk>q|k)\.weight$")
_DIRECTION = {"xy_lora": "comp", "yx_lora": "fg"}


@dataclass
class BFSCheckpoint:
    """A BFS checkpoint in our key space, whatever file it came from."""

    config: DualBranchConfig
    tensors: dict[str, torch.Tensor]
    source: str
    unplaced: dict[str, list[str]] = field(default_factory=dict)  # block type -> keys that could not be placed


def _block_type(key: str) -> str:
    if key.startswith("transformer_blocks."):
        return "double"
    if key.startswith("single_transformer_blocks."):
        return "single"
    return "other"


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_official_checkpoint(
    path: str | os.PathLike, flux_keys: set[str] | None = None, name: str = "bfs_weights"
) -> BFSCheckpoint:
    """Read the release's `trained_weights.pt` (a file, or a folder holding it) into our key space.

    Args:
        path: the `.pt` file or its folder.
        flux_keys: the base transformer's parameter names; keys among them become `base_override.*`. Without it,
            such keys are reported as unplaced.
        name: the input as the user knows it (`bfs_weights`, `--bfs`), named in every error message.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "trained_weights.pt"
    if not path.is_file():
        raise UserInputError(
            f"`{name}`: BFS checkpoint {str(path)!r} not found. Pass the official trained_weights.pt or its folder."
        )
    raw = load_torch_tensors(path, name)

    tensors, unplaced, ranks = {}, {}, set()
    for key, value in raw.items():
        new_key = None
        if m := _OFFICIAL_LORA.match(key):
            proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
            new_key = f"{m['block']}.joint.{proj}.lora_{m['ab']}.{_DIRECTION[m['dir']]}.weight"
            ranks.add(value.shape[0] if m["ab"] == "A" else value.shape[1])
        elif (m := _OFFICIAL_POST.match(key)) and value.ndim == 2 and value.shape[0] == value.shape[1]:
            new_key = f"{m['block']}.joint.post.weight"
        elif m := _OFFICIAL_BASE.match(key):
            proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
            new_key = f"{m['block']}.joint.base.{proj}.{m['p']}"
        elif m := _OFFICIAL_NORM.match(key):
            new_key = f"{m['block']}.joint.base.norm_{m['qk']}.weight"
        elif flux_keys is not None and key in flux_keys:
            new_key = f"base_override.{key}"
        if new_key is None:
            unplaced.setdefault(_block_type(key), []).append(key)
            continue
        tensors[new_key] = value
    # Double-block joint modules exist only if the file gives their post projection; without it their output is
    # exactly zero, so any other double-block joint tensors (e.g. base copies) have nowhere to go.
    has_double = any(k.startswith("transformer_blocks.") and k.endswith(".joint.post.weight") for k in tensors)
    if not has_double:
        for key in [k for k in tensors if k.startswith("transformer_blocks.") and ".joint." in k]:
            unplaced.setdefault("double", []).append(key)
            del tensors[key]
    post_keys = [k for k in tensors if k.endswith(".joint.post.weight")]
    if not post_keys:
        raise UserInputError(
            f"`{name}` file {str(path)!r} holds no BFS joint-module weights (`*.conv1n.weight` with a square [D, D] "
            "shape): it is not a BFS release checkpoint. Pass the release's trained_weights.pt."
        )
    if len(ranks) != 1:
        raise ValueError(f"{path}: the joint LoRAs must share one rank but ranks {sorted(ranks)} were found.")
    config = DualBranchConfig(
        content_rank=0,
        joint_rank=ranks.pop(),
        joint_placement="all" if has_double else "single",
        joint_post="linear",
        noise="independent",
    )
    return BFSCheckpoint(config=config, tensors=tensors, source=str(path), unplaced=unplaced)


def read_bfs_safetensors(path: str | os.PathLike, name: str = "bfs_weights") -> BFSCheckpoint:
    """Read our safetensors format (see the module docstring)."""
    path = Path(path)
    with open_safetensors(path, name) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise UserInputError(
                f"`{name}` file {str(path)!r} is not a BFS weights file (metadata `format` is "
                f"{metadata.get('format')!r}, "
                f"expected {FORMAT_NAME!r}). Official .pt files load directly; see `python -m bfs_core "
                f"convert`."
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise UserInputError(
                f"`{name}` file {str(path)!r} has BFS format version {metadata.get('format_version')!r}; this pack "
                f"reads version {FORMAT_VERSION}. Update the pack."
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = DualBranchConfig.from_json(metadata["bfs_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(
            f"`{name}` file {str(path)!r} has no readable `bfs_config` metadata ({err!r}): re-download it or "
            "re-convert it with `python -m bfs_core convert`."
        ) from err
    return BFSCheckpoint(config=config, tensors=tensors, source=str(path))


def read_bfs_checkpoint(
    path: str | os.PathLike, flux_keys: set[str] | None = None, name: str = "bfs_weights"
) -> BFSCheckpoint:
    """Either format, chosen by file type (a folder means the official layout)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_bfs_safetensors(path, name)
    if path.is_dir() or path.suffix in (".pt", ".pth", ".bin"):
        return read_official_checkpoint(path, flux_keys, name)
    raise UserInputError(
        f"`{name}` file {str(path)!r} has an unknown type {path.suffix!r}: expected this pack's .safetensors or the "
        "official trained_weights.pt."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def save_bfs_weights(model: DualBranchFlux, path: str | os.PathLike, overrides: dict[str, torch.Tensor] | None = None):
    """Write the model's BFS parameters (and optional base overrides) in our safetensors format."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in bfs_state_dict(model.transformer).items()}
    for key, value in (overrides or {}).items():
        tensors[f"base_override.{key}"] = value.detach().contiguous().cpu()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bfs_config": model.config.to_json(),
        "base_model": "FLUX.1-Fill-dev",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def convert_official_to_safetensors(
    pt_path: str | os.PathLike, out_path: str | os.PathLike, name: str = "input"
) -> BFSCheckpoint:
    """Convert the release's `.pt` to our format without a base model: joint base copies and keys that look like
    Flux parameters are carried as-is (`joint.base.*`, `base_override.*`), so loading either file gives the same model.
    """
    ckpt = read_official_checkpoint(pt_path, flux_keys=_looks_like_flux_keys(pt_path, name), name=name)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bfs_config": ckpt.config.to_json(),
        "base_model": "FLUX.1-Fill-dev",
        "converted_from": Path(pt_path).name,
    }
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in ckpt.tensors.items()}, str(tmp), metadata=metadata)
    return ckpt


def _looks_like_flux_keys(pt_path, name: str) -> set[str]:
    path = Path(pt_path)
    raw = load_torch_tensors(path / "trained_weights.pt" if path.is_dir() else path, name)
    pattern = re.compile(
        r"^(?:(?:transformer_blocks|single_transformer_blocks)\.\d+\.(?!attn1n\.|conv1n\.)"
        r"[\w.]+\.(?:weight|bias|scale)|(?:x_embedder|context_embedder|proj_out|norm_out|"
        r"time_text_embed)\.[\w.]+)$"
    )
    return {k for k in raw if pattern.match(k) and "lora_" not in k}


# ---------------------------------------------------------------------------------------------------------------------
# Applying


def _describe_unplaced(ckpt: BFSCheckpoint) -> str:
    return ", ".join(f"{kind}: {len(keys)} (e.g. {keys[0]})" for kind, keys in sorted(ckpt.unplaced.items()))


def apply_bfs_checkpoint(transformer, ckpt: BFSCheckpoint) -> DualBranchFlux:
    """Patch `transformer` (in place) with the checkpoint's config and load its tensors, strictly.

    Returns the `DualBranchFlux`. Joint modules the checkpoint leaves at zero are skipped at inference (identical
    numerics); linear post projections are folded into `to_out` where they follow it.
    """
    if dual_branch_config(transformer) is not None:
        raise ValueError("The transformer is already patched for BFS; load BFS weights into a fresh Flux-Fill model.")
    base_state = transformer.state_dict()
    overrides = {
        k.removeprefix("base_override."): v for k, v in ckpt.tensors.items() if k.startswith("base_override.")
    }
    bad = sorted(set(overrides) - set(base_state))
    if bad:
        raise ValueError(f"{ckpt.source}: base overrides name parameters Flux-Fill does not have: {bad[:5]}.")
    model = DualBranchFlux(transformer, ckpt.config)
    bfs_keys = {k: v for k, v in ckpt.tensors.items() if not k.startswith("base_override.")}

    # Blocks whose joint module needs private base copies: the file gives joint base weights that differ from
    # Flux-Fill's, or overrides the block's attention weights (the release copied attn1n before loading).
    needs_copy = set()
    for key, value in bfs_keys.items():
        if ".joint.base." in key:
            block, rest = key.split(".joint.base.")
            own = base_state.get(f"{block}.attn.{rest.replace('to_out.', 'to_out.0.')}")
            if own is None or own.shape != value.shape or not torch.equal(own, value.to(own.dtype)):
                needs_copy.add(block)
    for key in overrides:
        block = ".".join(key.split(".")[:2])
        if ".attn." in key and hasattr(transformer.get_submodule(block), "joint"):
            needs_copy.add(block)
    for block in sorted(needs_copy):
        transformer.get_submodule(block).joint.detach_base(transformer.get_submodule(block).attn)
    expected = bfs_state_dict(transformer)
    bfs_keys = {
        k: v for k, v in bfs_keys.items() if ".joint.base." not in k or k.split(".joint.base.")[0] in needs_copy
    }

    missing = sorted(k for k in expected if k not in bfs_keys and ".joint.base." not in k)
    unexpected = sorted(k for k in bfs_keys if k not in expected)
    wrong = sorted(k for k in bfs_keys if k in expected and bfs_keys[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {keys[:3]}{' …' if len(keys) > 3 else ''} ({len(keys)})"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise ValueError(
            f"{ckpt.source} does not fit a Flux-Fill model patched with {ckpt.config}: {detail}. "
            f"Check that the base model is FLUX.1-Fill-dev and the file is a BFS checkpoint."
        )
    transformer.load_state_dict(bfs_keys, strict=False)
    if overrides:
        transformer.load_state_dict(overrides, strict=False)
    transformer._bfs_base_overrides = sorted(overrides)  # its base is no longer plain Flux-Fill when non-empty
    counts = prepare_for_inference(transformer)
    kinds = Counter(_block_type(k) for k in bfs_keys)
    logger.info(
        "Loaded BFS weights %s: %s; placed %d tensors (double %d, single %d), %d base overrides, %d private base "
        "copies; joint modules active %d, skipped (exactly zero) %d%s",
        ckpt.source,
        ckpt.config,
        len(bfs_keys),
        kinds["double"],
        kinds["single"],
        len(overrides),
        len(needs_copy),
        counts["active"],
        counts["skipped"],
        f"; NOT PLACED (ignored, as the release ignores them) — {_describe_unplaced(ckpt)}" if ckpt.unplaced else "",
    )
    if ckpt.unplaced:
        logger.warning(
            "%s: %d keys could not be placed and were ignored: %s",
            ckpt.source,
            sum(len(v) for v in ckpt.unplaced.values()),
            _describe_unplaced(ckpt),
        )
    return model


def load_bfs(transformer, path: str | os.PathLike, name: str = "bfs_weights") -> DualBranchFlux:
    """One call: read either BFS format and patch + load it into a fresh Flux-Fill transformer.

    `name` is the input as the user knows it (`bfs_weights`, `--bfs`), named in every read error."""
    flux_keys = set(transformer.state_dict())
    return apply_bfs_checkpoint(transformer, read_bfs_checkpoint(path, flux_keys, name))


def checkpoint_summary(ckpt: BFSCheckpoint) -> str:
    return json.dumps(
        {
            "config": json.loads(ckpt.config.to_json()),
            "tensors": len(ckpt.tensors),
            "unplaced": {k: len(v) for k, v in ckpt.unplaced.items()},
        },
        sort_keys=True,
    )
