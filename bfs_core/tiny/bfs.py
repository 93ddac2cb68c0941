"""Tiny BFS weights: random tensors in the release's `trained_weights.pt` layout, random adapters for our format."""

from __future__ import annotations

import torch

from ..models.dual_flux import parameter_group


TINY_BFS = dict(content_rank=4, joint_rank=4)  # bfs_overrides for the paper preset at width 64


def official_release_state_dict(
    num_double: int,
    num_single: int,
    dim: int,
    rank: int = 4,
    *,
    include_double: bool = True,
    seed: int = 0,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the release's `trained_weights.pt` key layout (spec §1.3): joint LoRAs
    `attn1n.{to_q,to_k,to_v[,to_out.0]}.lora_{A,B}.{xy_lora,yx_lora}.weight` and `conv1n.weight`, per block."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [(f"transformer_blocks.{i}", True) for i in range(num_double if include_double else 0)]
    blocks += [(f"single_transformer_blocks.{j}", False) for j in range(num_single)]
    sd = {}
    for prefix, is_double in blocks:
        for proj in ("to_q", "to_k", "to_v") + (("to_out.0",) if is_double else ()):
            for direction in ("xy_lora", "yx_lora"):
                sd[f"{prefix}.attn1n.{proj}.lora_A.{direction}.weight"] = torch.randn(rank, dim, generator=gen) * std
                sd[f"{prefix}.attn1n.{proj}.lora_B.{direction}.weight"] = torch.randn(dim, rank, generator=gen) * std
        sd[f"{prefix}.conv1n.weight"] = torch.randn(dim, dim, generator=gen) * std
    return sd


def randomize_bfs_parameters(
    transformer, seed: int = 1, std: float = 0.02, groups: tuple[str, ...] = ("comp", "fg", "joint")
) -> None:
    """Fill every BFS parameter of `groups` with N(0, std²) values (fresh adapters are exact no-ops, which makes a
    random model useless for checking that weights load and act)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if parameter_group(name) in groups:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
