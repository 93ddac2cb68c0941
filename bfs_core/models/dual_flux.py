"""Dual-branch FLUX.1-Fill-dev: the BFS transformer (composite branch + foreground branch in one batch).

Batch layout (the one convention every part of this pack follows):
    for N samples the transformer batch holds 2N rows: rows [0, N) are the **composite** branch (`comp`),
    rows [N, 2N) are the **foreground** branch (`fg`). Row k of `comp` and row N + k of `fg` are one sample.

What patching adds to a diffusers `FluxTransformer2DModel` instance (never to its class):
- per-branch *content LoRA* on chosen Linears (paper: rank 64 on all blocks): the Linear's class is swapped, in this
  instance only, to `BranchLoRALinear`, which adds `comp` deltas to rows [0, N) and `fg` deltas to rows [N, 2N);
- the *joint module* (paper eq. 2–4; release `attn1n` + `conv1n`) in the chosen blocks, registered as `<block>.joint`
  and run by the block's attention processor (`JointAttnProcessor`, installed with `attn.set_processor`; the blocks
  keep their diffusers classes): the stock attention maths plus cross-branch attention whose queries come from the
  row's own branch and keys/values from the other branch. Q/K/V use the block's frozen
  projections plus direction-specific LoRAs, then the block's q/k RMSNorm and rotary embedding. The result goes through
  a post projection (`linear`: the release's bias-free zero-initialised D×D `conv1n`; `mlp`: the paper's g) and is
  added to the block's attention output (single blocks: before `proj_out`; double blocks: image tokens only, after
  `to_out`, before the gate), exactly where the release adds it.

LoRA adapter naming: `comp` adapters act on composite-branch tokens and `fg` adapters on foreground-branch tokens.
In the joint module that makes the two directions use disjoint matrices (comp<-fg: q=comp, k=fg, v=fg; fg<-comp: q=fg,
k=comp, v=comp), as the release's `xy_lora` (= `comp`) / `yx_lora` (= `fg`) masks do.

Fast path: the joint module's base Q/K/V are the block's own frozen weights, so the processor computes each base
projection once, adds the content-LoRA delta for self-attention and the joint-LoRA delta for the joint attention, and
swaps branch halves for K/V. `JointAttention.forward(..., base_qkv=None)` is the plain reference path with separate
projections. RoPE is one complex multiply (`apply_rope`), and in eager fp32 CPU inference each q/k RMSNorm + RoPE runs
in place in one buffer (`rms_norm`, `_norm_rope`; double blocks write text and image tokens into it, no cat): bitwise
diffusers' own results, with fewer passes over memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel, FluxTransformerBlock
from torch import nn


BRANCHES = ("comp", "fg")

# Linears that get a content LoRA, as suffixes of the module path inside a block. The AdaLN modulation Linears and
# the model's embedders/final layer are left alone, as diffusers' Flux LoRA trainers do.
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
SINGLE_BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


@dataclass(frozen=True)
class DualBranchConfig:
    """How a Flux-Fill transformer is turned into the BFS dual-branch model.

    Args:
        content_rank: rank of each branch's content LoRA on the block Linears (0 = no content LoRA).
        content_alpha: LoRA alpha of the content adapters (scale = alpha / rank); `None` means alpha = rank.
        joint_rank: rank of the direction-specific LoRAs on the joint module's Q/K/V (and `to_out` in double blocks).
        joint_alpha: LoRA alpha of the joint adapters; `None` means alpha = rank (the release: 4 / 4 = 1).
        joint_placement: `"single"` = the 38 single-stream blocks (paper), `"all"` = all 57 blocks (release).
        joint_post: `"linear"` = one bias-free zero-initialised D×D Linear applied to each direction (release
            `conv1n`); `"mlp"` = the paper's g: concat of both messages -> Linear -> GELU -> Linear (zero-init)
            -> split.
        joint_mlp_ratio: hidden width of the `mlp` post projection as a fraction of 2·D.
        noise: `"independent"` = one draw of shape [2N, ...] (release), `"shared"` = the same noise tensor in both
            branches (paper: "two same random noise tensors").
    """

    content_rank: int = 0
    content_alpha: float | None = None
    joint_rank: int = 4
    joint_alpha: float | None = None
    joint_placement: Literal["single", "all"] = "all"
    joint_post: Literal["linear", "mlp"] = "linear"
    joint_mlp_ratio: float = 0.125
    noise: Literal["independent", "shared"] = "independent"

    def __post_init__(self):
        checks = [
            ("content_rank", self.content_rank >= 0, "an integer >= 0"),
            ("joint_rank", self.joint_rank >= 1, "an integer >= 1"),
            ("joint_placement", self.joint_placement in ("single", "all"), "'single' or 'all'"),
            ("joint_post", self.joint_post in ("linear", "mlp"), "'linear' or 'mlp'"),
            ("joint_mlp_ratio", 0 < self.joint_mlp_ratio <= 4, "a number in (0, 4]"),
            ("noise", self.noise in ("independent", "shared"), "'independent' or 'shared'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"DualBranchConfig `{name}` must be {expected} but got {getattr(self, name)!r}.")

    @classmethod
    def release(cls) -> DualBranchConfig:
        """The official release: no content LoRA, joint r=4 in all 57 blocks, linear post, independent noise."""
        return cls(content_rank=0, joint_rank=4, joint_placement="all", joint_post="linear", noise="independent")

    @classmethod
    def paper(cls) -> DualBranchConfig:
        """The paper: content LoRA r=64, joint module in the single blocks, MLP post g, shared noise."""
        return cls(content_rank=64, joint_rank=4, joint_placement="single", joint_post="mlp", noise="shared")

    @classmethod
    def preset(cls, name: str) -> DualBranchConfig:
        presets = {"release": cls.release, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"Unknown BFS preset {name!r}; choose one of {sorted(presets)}.")
        return presets[name]()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DualBranchConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BFS config has unknown fields {unknown}; this pack knows {sorted(known)}.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------------
# Per-branch LoRA


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _param_dtype(like: torch.Tensor) -> torch.dtype:
    """New BFS parameters take the base weights' dtype, except fp8 and GGUF storage: adapters are kept in bf16 (GGUF:
    its compute dtype)."""
    if getattr(like, "quant_type", None) is not None:  # a GGUF-quantised base weight (see models/gguf.py)
        return getattr(like, "compute_dtype", torch.bfloat16)
    return torch.bfloat16 if like.dtype in _FP8 else like.dtype


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base weight as a plain `dtype` tensor: upcast from fp8, or dequantised from GGUF blocks (models/gguf.py)."""
    if getattr(weight, "quant_type", None) is not None:
        from .gguf import dequantize_weight

        return dequantize_weight(weight, dtype)
    return weight.to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear that upcasts weights stored in another dtype (fp8 storage, see `store_weights_in_fp8`; GGUF blocks)."""
    if weight.dtype != x.dtype:
        weight = _dense(weight, x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _split_branches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] % 2:
        raise ValueError(
            f"The dual-branch transformer needs an even batch (N composite rows then N foreground rows) but got "
            f"{x.shape[0]} rows."
        )
    n = x.shape[0] // 2
    return x[:n], x[n:]


class _BranchLoRAMixin:
    """Holds `lora_A` / `lora_B` ModuleDicts keyed by branch; rows [0, N) use `comp`, rows [N, 2N) use `fg`."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_scale: float

    def _init_branch_lora(self, in_features: int, out_features: int, rank: int, alpha: float | None, like: Any):
        factory = {"device": like.device, "dtype": _param_dtype(like)}
        self.lora_A = nn.ModuleDict({b: nn.Linear(in_features, rank, bias=False, **factory) for b in BRANCHES})
        self.lora_B = nn.ModuleDict({b: nn.Linear(rank, out_features, bias=False, **factory) for b in BRANCHES})
        self.lora_scale = (alpha if alpha is not None else rank) / rank
        for b in BRANCHES:
            # peft's default init: A Kaiming-uniform, B zero, so a fresh adapter adds exactly nothing.
            nn.init.kaiming_uniform_(self.lora_A[b].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[b].weight)

    # The batch layout makes the two halves contiguous: [2N, S, C] reshapes (no copy) to [2, N·S, C], so both
    # branches' adapters run as one batched matmul and the add fuses into it (baddbmm) — no per-branch copies.
    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """A_branch(x) for each half: [2N, S, in] -> [2, N·S, r]."""
        if x.shape[0] % 2:
            _split_branches(x)  # raises the batch-layout error
        a = torch.stack([self.lora_A[b].weight for b in BRANCHES]).to(x.dtype)  # [2, r, in]
        return torch.bmm(x.reshape(2, -1, x.shape[-1]), a.transpose(1, 2))

    def lora_add(self, y: torch.Tensor, down: torch.Tensor, lora_B: dict[str, torch.Tensor] | None = None):
        """y + scale · B_branch(down) for each half: y [2N, S, out], down [2, N·S, r] -> [2N, S, out]."""
        weights = [self.lora_B[b].weight if lora_B is None else lora_B[b] for b in BRANCHES]
        b = torch.stack(weights).to(y.dtype)  # [2, out, r]
        out = torch.baddbmm(y.reshape(2, -1, y.shape[-1]), down, b.transpose(1, 2), alpha=self.lora_scale)
        return out.view(y.shape)


class BranchLoRALinear(nn.Linear, _BranchLoRAMixin):
    """An `nn.Linear` (class swapped in place) with one LoRA per branch. Keys stay `<name>.weight`/`<name>.bias`.

    A layer of ours rather than peft: peft's per-row adapter selection (`adapter_names=` mixed batches) refuses
    training mode, and BFS trains both branches' adapters in one batch.
    """

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_add(self.base_forward(x), self.lora_down(x))


class BranchLoRA(nn.Module, _BranchLoRAMixin):
    """A standalone per-branch adapter pair (the joint module's direction-specific LoRAs)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None, like: torch.Tensor):
        super().__init__()
        self._init_branch_lora(in_features, out_features, rank, alpha, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta alone: B_branch(A_branch(x)) · scale, [2N, S, in] -> [2N, S, out]."""
        return self.lora_add(x.new_zeros(*x.shape[:-1], self.lora_B["comp"].weight.shape[0]), self.lora_down(x))


def _base_and_content(linear: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen base projection, base + content-LoRA delta): the fast path shares the base with the joint module."""
    base = _linear(x, linear.weight, linear.bias)
    if isinstance(linear, BranchLoRALinear):
        return base, linear.lora_add(base, linear.lora_down(x))
    return base, base


# ---------------------------------------------------------------------------------------------------------------------
# The joint (information-sharing) module


def _attention(attn: nn.Module, q, k, v) -> torch.Tensor:
    """SDPA on the [B, S, H, D] layout through diffusers' dispatcher, honouring the block's attention backend."""
    backend = getattr(attn.processor, "_attention_backend", None)
    parallel = getattr(attn.processor, "_parallel_config", None)
    # diffusers 0.35 has no context parallelism: its dispatcher takes no `parallel_config`, so pass it only when set.
    extra = {} if parallel is None else {"parallel_config": parallel}
    return dispatch_attention_fn(q, k, v, backend=backend, **extra)


def rope_table(rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """Flux's rotary (cos, sin) table, [S, D] each with every value repeated for a channel pair, as one complex
    table [S, D/2]: rotating a pair (x0, x1) by the angle is then the complex product (x0 + i·x1)·(cos + i·sin)."""
    if rope is None:
        return None
    cos, sin = rope
    # Checked where it is free (on the CPU, eager): on an accelerator the comparison would synchronise every block.
    checkable = cos.device.type == "cpu" and not torch.compiler.is_compiling()
    if checkable and not (torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2])):
        raise ValueError(
            "The rotary table must repeat each (cos, sin) value for both channels of a pair, as diffusers' "
            "FluxPosEmbed builds it (repeat_interleave_real=True)."
        )
    return torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())


def _in_place_ok(x: torch.Tensor) -> bool:
    """Eager fp32 CPU inference: where the in-place forms below are used. Autograd needs the out-of-place ops, a
    compiler fuses them itself, and on an accelerator torch's fused RMSNorm kernel is already one pass."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def rms_norm(norm: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`norm(x)` for the blocks' q/k `torch.nn.RMSNorm`, optionally written into `out` (a slice of a larger buffer,
    which saves the `torch.cat` of text and image tokens). In eager fp32 CPU inference it runs torch's own CPU
    formula, x · rsqrt(mean(x²) + eps) · weight, in one buffer instead of three: bitwise the same (tested)."""
    fits = isinstance(norm, nn.RMSNorm) and norm.weight is not None and norm.weight.dtype == x.dtype
    if not (fits and _in_place_ok(x)):
        y = norm(x)
        return y if out is None else out.copy_(y)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    squares = x.pow(2)
    scale = squares.mean(-1, keepdim=True).add_(eps).rsqrt_()
    return torch.mul(x, scale, out=squares if out is None else out).mul_(norm.weight)


def apply_rope(x: torch.Tensor, table: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """diffusers' `apply_rotary_emb(x, rope, sequence_dim=1)` for x [B, S, H, D] in one complex multiply instead of
    its unbind/negate/stack/two multiplies/add (about 6× less CPU time). The same float32 products and sum per
    output, so the result is bitwise the same on the CPU (tested); `table` from `rope_table`. `in_place`: x is a
    fresh buffer of the caller's and may be overwritten (only taken in eager fp32 CPU inference)."""
    if in_place and _in_place_ok(x) and x.is_contiguous():
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(table[:, None, :])
        return x
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))  # no copy for the fresh q/k the callers pass
    rotated = torch.view_as_complex(pairs) * table[:, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def _norm_rope(norms_and_tokens: list[tuple[nn.Module, torch.Tensor]], head_dim: int, table) -> torch.Tensor:
    """RMSNorm of each [B, S_i, H*D] segment with its own norm, the segments joined along the sequence (text then
    image tokens in double blocks), then RoPE: [B, ΣS_i, H, D]. The norms write straight into one buffer."""
    segments = [(norm, tokens.unflatten(-1, (-1, head_dim))) for norm, tokens in norms_and_tokens]
    if len(segments) == 1:
        x = rms_norm(*segments[0])
    else:
        first = segments[0][1]
        x = first.new_empty(first.shape[0], sum(t.shape[1] for _, t in segments), *first.shape[2:])
        start = 0
        for norm, tokens in segments:
            rms_norm(norm, tokens, out=x[:, start : start + tokens.shape[1]])
            start += tokens.shape[1]
    if table is None:
        return x
    # In place only into a buffer of our own (a norm that returned its input must not have that input overwritten).
    own = _in_place_ok(x) and (
        len(segments) > 1 or x.untyped_storage().data_ptr() != segments[0][1].untyped_storage().data_ptr()
    )
    return apply_rope(x, table, in_place=own)


def _heads_norm_rope(x: torch.Tensor, head_dim: int, norm: nn.Module | None, table) -> torch.Tensor:
    if norm is not None:
        return _norm_rope([(norm, x)], head_dim, table)
    x = x.unflatten(-1, (-1, head_dim))  # [B, S, H*D] -> [B, S, H, D]
    return x if table is None else apply_rope(x, table)


def _cross_attention(attn: nn.Module, q, k, v) -> torch.Tensor:
    """Each half of the queries attends to the *other* half's keys/values (views, no swapped copies)."""
    (q_comp, q_fg), (k_comp, k_fg), (v_comp, v_fg) = _split_branches(q), _split_branches(k), _split_branches(v)
    return torch.cat([_attention(attn, q_comp, k_fg, v_fg), _attention(attn, q_fg, k_comp, v_comp)], dim=0)


class JointPostMLP(nn.Module):
    """The paper's g: [Z_{F->C}, Z_{C->F}] (channel concat) -> Linear -> GELU -> Linear (zero-init) -> split."""

    def __init__(self, dim: int, hidden: int, like: torch.Tensor):
        super().__init__()
        factory = {"device": like.device, "dtype": _param_dtype(like)}
        self.fc1 = nn.Linear(2 * dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, 2 * dim, **factory)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, messages: torch.Tensor) -> torch.Tensor:
        to_comp, to_fg = _split_branches(messages)  # [N, S, D] each
        out = self.fc2(F.gelu(self.fc1(torch.cat([to_comp, to_fg], dim=-1)), approximate="tanh"))
        delta_comp, delta_fg = out.chunk(2, dim=-1)
        return torch.cat([delta_comp, delta_fg], dim=0)


_FOLDED_BUFFERS = ("folded_weight", "folded_bias", "folded_lora_B_comp", "folded_lora_B_fg")


class JointAttention(nn.Module):
    """Cross-branch attention of one block: each branch's queries attend to the other branch's keys/values.

    Args:
        dim: model width D.
        head_dim: attention head width.
        rank: rank of the direction-specific LoRAs.
        alpha: LoRA alpha (`None` = rank).
        has_out: double blocks project the message with the block's `to_out` (+ its own LoRA); single blocks do not.
        post: `"linear"` or `"mlp"` (see `DualBranchConfig`).
        mlp_hidden: hidden width of the `mlp` post projection.
        like: a tensor whose device/dtype the new parameters take.
    """

    def __init__(
        self,
        *,
        dim: int,
        head_dim: int,
        rank: int,
        alpha: float | None,
        has_out: bool,
        post: str,
        mlp_hidden: int,
        like: torch.Tensor,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = BranchLoRA(dim, dim, rank, alpha, like)
        self.to_k = BranchLoRA(dim, dim, rank, alpha, like)
        self.to_v = BranchLoRA(dim, dim, rank, alpha, like)
        self.to_out = BranchLoRA(dim, dim, rank, alpha, like) if has_out else None
        if post == "linear":
            self.post = nn.Linear(dim, dim, bias=False, device=like.device, dtype=_param_dtype(like))
            nn.init.zeros_(self.post.weight)
        else:
            self.post = JointPostMLP(dim, mlp_hidden, like)
        # `base` holds private copies of the frozen projections only when a checkpoint supplied base weights that
        # differ from the block's own (release `attn1n.*.base_layer`). Normally it is None and the block's own
        # weights are used, which is what lets the block share its projections with this module.
        self.base: nn.ModuleDict | None = None
        # Inference-only cache: the linear post folded into `to_out` (double blocks), see `fold_post`. Buffers, not a
        # dict of tensors, so that every move of the model (ComfyUI's ModelPatcher, `.to(device/dtype)`) moves them
        # too; not persistent, so they are never saved and the weight formats are unchanged.
        for name in _FOLDED_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        # False when the post projection is exactly zero: the module then adds exactly nothing and is skipped.
        self.active = True
        # True: reuse the block's base Q/K/V projections (fast path). False: recompute them (reference path).
        self.share_base_projections = True

    # -- base weights ------------------------------------------------------------------------------------------------
    def detach_base(self, attn: nn.Module) -> None:
        """Give this module private copies of the block's current projections/norms (before the block's change)."""
        names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"] + (["to_out"] if self.to_out is not None else [])
        copies = {}
        for name in names:
            src = attn.to_out[0] if name == "to_out" else getattr(attn, name)
            if isinstance(src, nn.Linear):
                dst = nn.Linear(
                    src.in_features,
                    src.out_features,
                    bias=src.bias is not None,
                    device=src.weight.device,
                    dtype=src.weight.dtype,
                )
            else:
                dst = nn.RMSNorm(src.normalized_shape, eps=src.eps, device=src.weight.device, dtype=src.weight.dtype)
            dst.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()})
            dst.requires_grad_(False)
            copies[name] = dst
        self.base = nn.ModuleDict(copies)

    def _base_linear(self, attn: nn.Module, name: str) -> nn.Linear:
        if self.base is not None:
            return self.base[name]
        return attn.to_out[0] if name == "to_out" else getattr(attn, name)

    def _norm(self, attn: nn.Module, name: str) -> nn.Module:
        return self.base[name] if self.base is not None else getattr(attn, name)

    # -- post projection ---------------------------------------------------------------------------------------------
    def fold_post(self, attn: nn.Module) -> None:
        """Fold the bias-free linear post into `to_out` (double blocks): W_c(W_o o + b_o + B A o) = (W_c W_o) o +
        W_c b_o + (W_c B) A o. Saves one D×D matmul per image token; exact up to float rounding. Inference only."""
        if self.to_out is None or not isinstance(self.post, nn.Linear):
            return
        out = self._base_linear(attn, "to_out")
        w_post = self.post.weight.float()
        dtype, device = self.post.weight.dtype, self.post.weight.device
        with torch.no_grad():
            self.folded_weight = (w_post @ _dense(out.weight, torch.float32).to(device)).to(dtype)
            self.folded_bias = None if out.bias is None else (w_post @ out.bias.float().to(device)).to(dtype)
            self.folded_lora_B_comp = (w_post @ self.to_out.lora_B["comp"].weight.float()).to(dtype)
            self.folded_lora_B_fg = (w_post @ self.to_out.lora_B["fg"].weight.float()).to(dtype)

    def unfold_post(self) -> None:
        for name in _FOLDED_BUFFERS:
            setattr(self, name, None)

    @property
    def folded(self) -> bool:
        """True while the post projection is folded into `to_out` (see `fold_post`)."""
        return self.folded_weight is not None

    def _project_out_and_post(self, attn: nn.Module, messages: torch.Tensor) -> torch.Tensor:
        if self.to_out is not None:
            down = self.to_out.lora_down(messages)
            if self.folded:
                lora_b = {"comp": self.folded_lora_B_comp, "fg": self.folded_lora_B_fg}
                return self.to_out.lora_add(_linear(messages, self.folded_weight, self.folded_bias), down, lora_b)
            out = self._base_linear(attn, "to_out")
            messages = self.to_out.lora_add(_linear(messages, out.weight, out.bias), down)
        return self.post(messages)

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(
        self,
        normed: torch.Tensor,
        attn: nn.Module,
        rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
        base_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Cross-branch messages for one block.

        Args:
            normed: the block's modulated input tokens, [2N, S, D] (comp rows then fg rows).
            attn: the block's `FluxAttention` (frozen base projections and q/k norms).
            rope: the (cos, sin) table for these S tokens (or its complex form, `rope_table`), shared by both
                branches so positions align.
            base_qkv: the block's base projections of `normed` ([2N, S, D] each), already computed for its
                self-attention (fast path). `None` recomputes them (reference path).

        Returns:
            [2N, S, D]: rows [0, N) are added to the composite branch, rows [N, 2N) to the foreground branch.
        """
        if base_qkv is None or self.base is not None or not self.share_base_projections:
            base_qkv = tuple(
                _linear(normed, lin.weight, lin.bias)
                for lin in (self._base_linear(attn, n) for n in ("to_q", "to_k", "to_v"))
            )
        base_q, base_k, base_v = base_qkv
        # Each token is projected with the adapter of its own branch (one fused down-projection for q, k, v); the
        # queries of each branch then attend to the other branch's keys and values.
        rank = self.to_q.lora_A["comp"].weight.shape[0]
        a_qkv = torch.cat(
            [torch.stack([lora.lora_A[b].weight for b in BRANCHES]) for lora in (self.to_q, self.to_k, self.to_v)],
            dim=1,
        ).to(normed.dtype)  # [2, 3r, D]
        down = torch.bmm(normed.reshape(2, -1, normed.shape[-1]), a_qkv.transpose(1, 2))  # [2, N·S, 3r]
        q, k, v = (
            lora.lora_add(base, down[..., i * rank : (i + 1) * rank])
            for i, (lora, base) in enumerate(zip((self.to_q, self.to_k, self.to_v), base_qkv))
        )
        table = rope if rope is None or isinstance(rope, torch.Tensor) else rope_table(rope)
        q = _heads_norm_rope(q, self.head_dim, self._norm(attn, "norm_q"), table)
        k = _heads_norm_rope(k, self.head_dim, self._norm(attn, "norm_k"), table)
        v = v.unflatten(-1, (-1, self.head_dim))
        messages = _cross_attention(attn, q, k, v).flatten(2, 3).to(q.dtype)  # [2N, S, H, D] -> [2N, S, H*D]
        return self._project_out_and_post(attn, messages)


# ---------------------------------------------------------------------------------------------------------------------
# The joint module as an attention processor on the stock diffusers blocks


class JointAttnProcessor:
    """Flux attention plus the block's joint module, in the style of diffusers' `FluxIPAdapterAttnProcessor`.

    Installed on a block's `FluxAttention` with `attn.set_processor(JointAttnProcessor(block.joint, attn.processor))`
    and removed by restoring `original`; the block keeps its class, so diffusers' own tools (regional compile, cache
    hooks, group offloading) treat it as any Flux block. The maths is `FluxAttnProcessor`'s, except that each base
    Q/K/V projection is computed once and shared: self-attention adds the content-LoRA delta to it, the joint module
    its own direction-specific LoRA delta. The joint message is added where the release adds it: in single blocks to
    the attention output (before `proj_out`), in double blocks to the image stream after `to_out` (before the gate).

    Not an `nn.Module` on purpose: the joint module's parameters stay registered on the block (`<block>.joint.*`, the
    key layout of both weight formats), and this object only points at it.
    """

    _attention_backend = None  # set by diffusers' `set_attention_backend`, honoured by `_attention`
    _parallel_config = None

    def __init__(self, joint: JointAttention, original: Any):
        self.joint = joint
        self.original = original

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError(
                "The dual-branch Flux blocks take no attention mask (e.g. Redux 'attn_bias' strength): use "
                "StyleModelApply's strength_type 'multiply'."
            )
        (base_q, q), (base_k, k), (base_v, v) = (
            _base_and_content(lin, hidden_states) for lin in (attn.to_q, attn.to_k, attn.to_v)
        )
        table = rope_table(image_rotary_emb)
        text_len = 0
        if encoder_hidden_states is None:
            q = _norm_rope([(attn.norm_q, q)], attn.head_dim, table)
            k = _norm_rope([(attn.norm_k, k)], attn.head_dim, table)
        else:  # double block: text tokens first, as FluxAttnProcessor (the norms write into one buffer, no cat)
            text_len = encoder_hidden_states.shape[1]
            eq, ek, ev = (proj(encoder_hidden_states) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = _norm_rope([(attn.norm_added_q, eq), (attn.norm_q, q)], attn.head_dim, table)
            k = _norm_rope([(attn.norm_added_k, ek), (attn.norm_k, k)], attn.head_dim, table)
            v = torch.cat([ev, v], dim=1)
        v = v.unflatten(-1, (-1, attn.head_dim))
        out = _attention(attn, q, k, v).flatten(2, 3).to(q.dtype)
        base_qkv = (base_q, base_k, base_v)
        if encoder_hidden_states is None:  # single block: text and image tokens in one sequence
            if self.joint.active:
                out = out + self.joint(hidden_states, attn, table, base_qkv)
            return out
        context, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        context = attn.to_add_out(context.contiguous())
        if self.joint.active:
            # Image tokens only; the image part of the rotary table equals a table built from img_ids alone.
            image = image + self.joint(hidden_states, attn, None if table is None else table[text_len:], base_qkv)
        return image, context


# ---------------------------------------------------------------------------------------------------------------------
# Patching (instance-local and reversible)


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _joint_blocks(transformer: FluxTransformer2DModel, placement: str) -> list[tuple[str, nn.Module]]:
    blocks = [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    if placement == "all":
        blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)] + blocks
    return blocks


def _content_targets(transformer: FluxTransformer2DModel) -> list[str]:
    paths = [
        f"transformer_blocks.{i}.{t}" for i in range(len(transformer.transformer_blocks)) for t in DOUBLE_BLOCK_TARGETS
    ]
    paths += [
        f"single_transformer_blocks.{i}.{t}"
        for i in range(len(transformer.single_transformer_blocks))
        for t in SINGLE_BLOCK_TARGETS
    ]
    return paths


def patch_dual_branch(transformer: FluxTransformer2DModel, config: DualBranchConfig) -> FluxTransformer2DModel:
    """Turn this transformer instance into the BFS dual-branch model in place (see the module docstring).

    New parameters start at values that leave the model's output unchanged (LoRA B = 0, post projection = 0).
    They are created in the dtype/device of the weights they sit beside. Returns the same instance.
    """
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(f"`transformer` must be a diffusers FluxTransformer2DModel but got {type(transformer)}.")
    if getattr(transformer, "_bfs_config", None) is not None:
        raise ValueError("This transformer is already patched for BFS; call `unpatch_dual_branch` first.")
    dim = transformer.inner_dim
    head_dim = transformer.config.attention_head_dim
    mlp_hidden = max(1, round(config.joint_mlp_ratio * 2 * dim))

    if config.content_rank > 0:
        for path in _content_targets(transformer):
            linear = _module(transformer, path)
            gguf = isinstance(linear, nn.Linear) and getattr(linear.weight, "quant_type", None) is not None
            if type(linear) is not nn.Linear and not gguf:
                raise ValueError(f"Expected a plain nn.Linear at `{path}` but found {type(linear).__name__}.")
            linear._bfs_base_class = type(linear)  # nn.Linear, or diffusers' GGUFLinear on a GGUF base
            linear.__class__ = BranchLoRALinear
            linear._init_branch_lora(
                linear.in_features, linear.out_features, config.content_rank, config.content_alpha, linear.weight
            )

    for name, block in _joint_blocks(transformer, config.joint_placement):
        is_double = isinstance(block, FluxTransformerBlock)
        block.joint = JointAttention(
            dim=dim,
            head_dim=head_dim,
            rank=config.joint_rank,
            alpha=config.joint_alpha,
            has_out=is_double,
            post=config.joint_post,
            mlp_hidden=mlp_hidden,
            like=block.attn.to_q.weight,
        )
        block.attn.set_processor(JointAttnProcessor(block.joint, block.attn.get_processor()))
    transformer._bfs_config = config
    return transformer


def unpatch_dual_branch(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Undo `patch_dual_branch`: restore the blocks' attention processors and the Linears' class, and drop every BFS
    parameter."""
    if getattr(transformer, "_bfs_config", None) is None:
        raise ValueError("This transformer is not patched for BFS; nothing to undo.")
    for module in transformer.modules():
        if isinstance(module, BranchLoRALinear):
            del module.lora_A, module.lora_B, module.lora_scale
            module.__class__ = module.__dict__.pop("_bfs_base_class", nn.Linear)
    for _, block in _joint_blocks(transformer, "all"):
        if hasattr(block, "joint"):
            processor = block.attn.get_processor()
            if isinstance(processor, JointAttnProcessor):
                block.attn.set_processor(processor.original)
            del block.joint
    transformer._bfs_config = None
    return transformer


def dual_branch_config(transformer: FluxTransformer2DModel) -> DualBranchConfig | None:
    return getattr(transformer, "_bfs_config", None)


def parameter_group(name: str) -> Literal["comp", "fg", "joint", "base"]:
    """The trainable group of a transformer parameter: content LoRA `comp`/`fg`, `joint`, or frozen `base`."""
    parts = name.split(".")
    if "joint" in parts:
        return "base" if ".joint.base." in f".{name}" else "joint"
    for branch in BRANCHES:
        if f"lora_A.{branch}.weight" in name or f"lora_B.{branch}.weight" in name:
            return branch
    return "base"


def bfs_state_dict(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """Every parameter patching added (content LoRAs, joint modules, private base copies), transformer-relative."""
    return {k: v for k, v in transformer.state_dict().items() if parameter_group(k) != "base" or ".joint.base." in k}


def set_trainable(transformer: FluxTransformer2DModel, groups: set[str] | frozenset[str]) -> list[nn.Parameter]:
    """Freeze everything, then make exactly the parameters of `groups` (subset of {comp, fg, joint}) trainable."""
    unknown = set(groups) - {"comp", "fg", "joint"}
    if unknown:
        raise ValueError(f"Trainable groups must be among 'comp', 'fg', 'joint' but got {sorted(unknown)}.")
    trainable = []
    for name, param in transformer.named_parameters():
        param.requires_grad_(parameter_group(name) in groups)
        if param.requires_grad:
            trainable.append(param)
    return trainable


def prepare_for_inference(transformer: FluxTransformer2DModel, fold: bool = True) -> dict[str, int]:
    """Skip joint modules whose post projection is exactly zero (identical numerics) and fold linear posts.

    Call again after changing weights. Returns counts of active/skipped joint modules.
    """
    counts = {"active": 0, "skipped": 0}
    for _, block in _joint_blocks(transformer, "all"):
        joint = getattr(block, "joint", None)
        if joint is None:
            continue
        last = joint.post if isinstance(joint.post, nn.Linear) else joint.post.fc2
        zero = not torch.any(last.weight) and (getattr(last, "bias", None) is None or not torch.any(last.bias))
        joint.active = not zero
        counts["active" if joint.active else "skipped"] += 1
        joint.unfold_post()
        if fold and joint.active:
            joint.fold_post(block.attn)
    return counts


def reset_inference_state(transformer: FluxTransformer2DModel) -> None:
    """Undo `prepare_for_inference` (every joint module active, nothing folded): use before training."""
    for _, block in _joint_blocks(transformer, "all"):
        joint = getattr(block, "joint", None)
        if joint is not None:
            joint.active = True
            joint.unfold_post()


# ---------------------------------------------------------------------------------------------------------------------
# Public model


def _as_rows(value: torch.Tensor | float, n: int, name: str, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=like.device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"`{name}` must be a number or a tensor of shape [{n}] but got shape {list(t.shape)}.")
    return t


def run_two_branches(
    transformer: FluxTransformer2DModel,
    comp_hidden: torch.Tensor,
    fg_hidden: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    timestep_comp: torch.Tensor | float,
    timestep_fg: torch.Tensor | float,
    img_ids: torch.Tensor,
    guidance: torch.Tensor | float = 30.0,
    txt_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One transformer call over both branches in the pack's batch layout (N comp rows, then N fg rows).

    comp_hidden / fg_hidden: full transformer inputs [N, L, in_channels]; the text conditioning [N, T, J] / [N, P] is
    shared by both branches; timesteps (sigma) and guidance are numbers or [N]. Returns the two halves of the output.
    """
    n = comp_hidden.shape[0]
    hidden = torch.cat([comp_hidden, fg_hidden], dim=0)
    if txt_ids is None:
        txt_ids = prompt_embeds.new_zeros(prompt_embeds.shape[1], 3)
    timestep = torch.cat(
        [_as_rows(timestep_comp, n, "timestep_comp", hidden), _as_rows(timestep_fg, n, "timestep_fg", hidden)]
    )
    guidance_rows = _as_rows(guidance, n, "guidance", hidden).repeat(2)
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=prompt_embeds.to(hidden.dtype).repeat(2, 1, 1),
        pooled_projections=pooled.to(hidden.dtype).repeat(2, 1),
        timestep=timestep.to(hidden.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance_rows if transformer.config.guidance_embeds else None,
        return_dict=False,
    )[0]
    return out[:n], out[n:]


class DualBranchFlux(nn.Module):
    """BFS: a FluxTransformer2DModel (FLUX.1-Fill-dev) patched for a composite and a foreground branch.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` with the Fill input layout (384 channels). It is patched in
            place (see `patch_dual_branch`) unless it is already patched with the same config.
        config: a `DualBranchConfig` (e.g. `DualBranchConfig.release()` or `.paper()`).
    """

    def __init__(self, transformer: FluxTransformer2DModel, config: DualBranchConfig):
        super().__init__()
        current = dual_branch_config(transformer)
        if current is None:
            patch_dual_branch(transformer, config)
        elif current != config:
            raise ValueError(f"The transformer is already patched with {current}, not {config}.")
        self.transformer = transformer
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (with fp8 weight storage the embedders stay in it; GGUF weights carry it)."""
        return _param_dtype(self.transformer.x_embedder.weight)

    @property
    def device(self) -> torch.device:
        """Where the model computes: with offloading (`bfs_core.offload`) its weights wait on the CPU between calls."""
        from ..offload import Offload, execution_device, offload_mode

        if offload_mode(self.transformer) != Offload.NONE:
            return execution_device(self.transformer)
        return self.transformer.x_embedder.weight.device

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels  # packed: 16 latent channels × 2 × 2

    def check_conditioning(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        cfg = self.transformer.config
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"Text conditioning must be [batch, tokens, {cfg.joint_attention_dim}] (Flux T5-XXL embeddings) but "
                f"got {list(prompt_embeds.shape)}. Encode the prompt with Flux's text encoders (T5-XXL + CLIP-L)."
            )
        if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(
                f"Pooled conditioning must be [batch, {cfg.pooled_projection_dim}] (CLIP-L pooled output) but got "
                f"{list(pooled.shape)}. Encode the prompt with Flux's text encoders (T5-XXL + CLIP-L)."
            )

    def forward(
        self,
        comp_latents: torch.Tensor,
        fg_latents: torch.Tensor,
        fill_cond: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        timestep_comp: torch.Tensor | float,
        timestep_fg: torch.Tensor | float,
        img_ids: torch.Tensor,
        guidance: torch.Tensor | float = 30.0,
        txt_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities of both branches in one transformer call.

        Args:
            comp_latents, fg_latents: packed noisy latents, [N, L, 64] each (L = (H/16)·(W/16)).
            fill_cond: Flux-Fill conditioning shared by both branches, [N, L, 320] = image latent 64 | mask 256.
            prompt_embeds: [N, T, joint_dim]; pooled: [N, pooled_dim] (the same for both branches).
            timestep_comp, timestep_fg: sigma in [0, 1] per branch (number or [N]); e.g. comp 0 for extraction.
            img_ids: [L, 3] image position ids; txt_ids: [T, 3] (zeros when None).
            guidance: distilled guidance (30 for Fill), number or [N].

        Returns:
            (v_comp, v_fg), each [N, L, 64].
        """
        n, length, channels = comp_latents.shape
        if fg_latents.shape != comp_latents.shape:
            raise ValueError(
                f"`fg_latents` {list(fg_latents.shape)} must match `comp_latents` {list(comp_latents.shape)}."
            )
        cond_channels = self.transformer.config.in_channels - channels
        if fill_cond.shape != (n, length, cond_channels):
            raise ValueError(f"`fill_cond` must be [{n}, {length}, {cond_channels}] but got {list(fill_cond.shape)}.")
        self.check_conditioning(prompt_embeds, pooled)
        if prompt_embeds.shape[0] != n or pooled.shape[0] != n:
            raise ValueError(f"Text conditioning has batch {prompt_embeds.shape[0]}/{pooled.shape[0]}, expected {n}.")
        # [N, L, 64] ×2 -> [N, L, 384] per branch, each with the shared Fill conditioning.
        return run_two_branches(
            self.transformer,
            torch.cat([comp_latents, fill_cond], -1),
            torch.cat([fg_latents, fill_cond], -1),
            prompt_embeds,
            pooled,
            timestep_comp,
            timestep_fg,
            img_ids,
            guidance,
            txt_ids,
        )


# Module paths `store_weights_in_fp8` keeps in the compute dtype (searched like diffusers' layerwise casting does, in
# every module path on the way down). "norm" keeps every AdaLN modulation Linear in bf16, as diffusers' Flux model
# asks itself (its _skip_layerwise_casting_patterns). "^proj_out$" is the final output projection only: unanchored,
# it also matched every single block's 5D->D projection (1.8 B parameters kept in bf16 for nothing).
FP8_SKIP_PATTERNS = ("pos_embed", "norm", "joint", "time_text_embed", "x_embedder", "^proj_out$")


def store_weights_in_fp8(transformer: FluxTransformer2DModel, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Keep the frozen Flux Linears in float8_e4m3fn and compute in `compute_dtype` (about half the memory).

    Stock modules use diffusers' layerwise casting; Linears carrying a content LoRA keep their adapters in
    `compute_dtype` and store only their own weight in fp8 (their forward upcasts it, as the dual-branch blocks do
    for every weight they read directly). The AdaLN modulation Linears (as diffusers' Flux model asks), the embedders,
    the final `proj_out` and all BFS parameters stay in `compute_dtype`; the single blocks' `proj_out` is fp8.
    Call after the BFS weights are loaded; inference only.
    """
    transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute_dtype,
        skip_modules_pattern=FP8_SKIP_PATTERNS,
        skip_modules_classes=(BranchLoRALinear, BranchLoRA, JointAttention),
    )
    for module in transformer.modules():
        if isinstance(module, BranchLoRALinear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
