"""Multi-modal latent fusion for decomposition (Perceiver-style, linear in the number of tokens).

Edge, segmentation and depth maps arrive as packed Flux-latent tokens; `MultiModalLatentFusion` summarises all of them
with a constant number of latent queries (read: latents <- all modality tokens; process: latent self-attention;
write: every image position <- the latents). `layer_decomposition.LayerDecomposition` owns one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


MODALITIES = ("edge", "segmentation", "depth")
LATENT_CHANNELS = 64  # packed: 16 latent channels × 2 × 2


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sine/cosine position embedding [L, dim] (half the channels for rows, half for columns)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=rows.device, dtype=torch.float32) / quarter)
    parts = []
    for pos in (rows, cols):
        angle = pos.float()[:, None] * freqs[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)


class _AttentionBlock(nn.Module):
    """Pre-norm multi-head attention of `x` [N, Q, d] over `context` [N, S, d], then an MLP; both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = self.norm_context(context)
        q, k, v = self.to_q(self.norm_x(x)), self.to_k(c), self.to_v(c)
        # [N, S, H*D] -> [N, H, S, D]; SDPA's memory is O(Q·S) at most, and Q or S is the constant latent count.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [N, H, Q, D] -> [N, Q, H*D]
        x = x + self.to_out(out)
        return x + self.mlp(self.norm_mlp(x))


class MultiModalLatentFusion(ModelMixin, ConfigMixin):
    """Summarise all modality tokens with a constant number of latent queries, then let each position read them.

    Cost: read O(K·M·L), process O(K²), write O(L·K) for K latents, M modalities and L tokens per map: linear in the
    number of tokens.

    Args:
        modalities: the modality names, in order (each gets a learned type embedding).
        token_channels: channels of a packed modality token (64: a packed Flux latent).
        dim: internal width.
        num_latents: K, the latent queries.
        heads: attention heads.
        out_channels: channels of the per-position output.
    """

    @register_to_config
    def __init__(
        self,
        *,
        modalities: tuple[str, ...] = MODALITIES,
        token_channels: int = LATENT_CHANNELS,
        dim: int = 256,
        num_latents: int = 32,
        heads: int = 4,
        out_channels: int = 64,
    ):
        super().__init__()
        self.modalities = tuple(modalities)
        self.token_in = nn.Linear(token_channels, dim)
        self.query_in = nn.Linear(token_channels, dim)
        self.modality_embed = nn.Parameter(torch.randn(len(self.modalities), dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.read = _AttentionBlock(dim, heads)
        self.process = _AttentionBlock(dim, heads)
        self.write = _AttentionBlock(dim, heads)
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_channels)

    def forward(
        self, modality_tokens: Mapping[str, torch.Tensor], query_tokens: torch.Tensor, img_ids: torch.Tensor
    ) -> torch.Tensor:
        """Fused context per position.

        Args:
            modality_tokens: name -> packed tokens [N, L, token_channels]; any subset of `modalities` (may be empty).
            query_tokens: packed tokens of the image itself, [N, L, token_channels] (what each position looks like).
            img_ids: [L, 3] position ids (0, row, col) of the packed grid.

        Returns:
            [N, L, out_channels]; exactly zero when no modality is given (the "w/o multi-modal" ablation).
        """
        n, length, _ = query_tokens.shape
        unknown = sorted(set(modality_tokens) - set(self.modalities))
        if unknown:
            raise ValueError(f"Unknown modalities {unknown}; this fusion module knows {list(self.modalities)}.")
        present = [m for m in self.modalities if m in modality_tokens]
        if not present:
            return query_tokens.new_zeros(n, length, self.config.out_channels)
        dtype = self.token_in.weight.dtype
        pos = sincos_2d(img_ids[:, 1], img_ids[:, 2], self.config.dim).to(dtype)  # [L, d]
        context = []
        for m in present:
            tokens = modality_tokens[m]
            if tokens.shape[:2] != (n, length):
                raise ValueError(f"Modality `{m}` tokens must be [{n}, {length}, C] but got {list(tokens.shape)}.")
            index = self.modalities.index(m)
            context.append(self.token_in(tokens.to(dtype)) + self.modality_embed[index] + pos)
        context = torch.cat(context, dim=1)  # [N, M·L, d]
        latents = self.latents.expand(n, -1, -1)  # [N, K, d]
        latents = self.read(latents, context)
        latents = self.process(latents, latents)
        out = self.write(self.query_in(query_tokens.to(dtype)) + pos, latents)  # [N, L, d]
        return self.proj_out(self.norm_out(out))


__all__ = ["LATENT_CHANNELS", "MODALITIES", "MultiModalLatentFusion", "sincos_2d"]
