"""Memory model of one dual-branch BFS step: weight bytes per format and offload mode, activation peak, total.

Everything is counted from the transformer config (`bfs_core/configs/flux_fill_transformer.json` for the real
FLUX.1-Fill-dev) and the BFS preset; nothing is instantiated. `tests/test_memory_model.py` checks the parameter
inventory against a real (meta-device) model, the weight bytes against tiny models in each format, and the
activation formula against peaks measured on the CPU at tiny scale. The text encoders and VAEs are not counted
(ComfyUI runs them before/after sampling and frees or offloads them), nor is the CUDA context (about 0.3–0.5 GiB
per process) or allocator fragmentation.

Weights (B = bytes per stored value):

    W = Σ over the transformer's tensors of bytes(tensor, format) + BFS parameters (bf16) + folded buffers (bf16)

- `bf16`: every tensor 2 B per value.
- `fp8`: what Load BFS's `weight_dtype = fp8_e4m3fn` holds (`store_weights_in_fp8`, diffusers layerwise casting):
  1 B per value (weight *and* bias) for each Linear outside its skip patterns (`pos_embed`, `norm`,
  `time_text_embed`, `x_embedder`, `joint`, `^proj_out$`), 2 B for the rest. They are searched in module paths, so
  `norm` keeps every AdaLN modulation Linear (`…norm1.linear`, `…norm1_context.linear`, `…norm.linear`,
  `norm_out.linear`) in bf16, as diffusers' Flux model asks for itself (3.2 B parameters); the single blocks'
  `proj_out` (5D→D) is fp8, the final `proj_out` bf16.
- `fp8_all`: every 2-D weight of every block in fp8 (a stored fp8 checkpoint, scaled fp8's per-layer fp32 scales
  included, 4 B each); biases, norm scales, embedders, `norm_out`, `proj_out` in bf16.
- `q8_0` / `q4_k` (GGUF, as city96's conversions and `bfs_core.tiny.gguf` write them): every 2-D tensor whose rows
  fill whole blocks is quantised — Q8_0 = 34 bytes per 32 values, Q4_K = 144 bytes per 256 values (a Q4_K file
  falls back to Q8_0 for rows of 32k values, e.g. the 384-wide `x_embedder`); other 2-D tensors F16 (2 B). 1-D
  tensors (biases, RMSNorm scales) are dequantised to the compute dtype at load (2 B).
- BFS parameters at the release preset (joint module in all 57 blocks, no content LoRA): per block the
  direction-specific LoRAs of Q, K, V (and `to_out` in double blocks), 2 branches × (r·D + D·r) each, plus the
  bias-free D×D post projection (`conv1n`); after `prepare_for_inference`, double blocks also hold the post folded
  into `to_out` (D×D + D + 2·D·r, buffers). All in bf16 (adapters stay in the compute dtype on quantised bases).

Offload modes (resident weights during a step):

- `none`: W.
- `model` (diffusers model CPU offload): the whole transformer is on the GPU while it runs and off between
  uses, so the peak of a step is the same as `none` for one model.
- `block` (diffusers group offloading, one block per group, CUDA streams): the non-block weights (embedders,
  `norm_out`, `proj_out`) + the running block + the block being prefetched: W_rest + 2 · max block.

Activation peak of one inference step (N samples, so R = 2N rows: comp + fg; L = H/16 · W/16 image tokens,
T = 512 text tokens, S = L + T; D model width, Dh head width, b compute bytes; X(n) = R · n · D · b is one
[2N, n, D] tensor). Attention is SDPA (memory-efficient / flash kernels: no S×S score matrix), so everything is
linear in the tokens:

    A = inputs + X(S) + max(single, double) + workspace

    inputs   = 2·N·L·C_in·b + R·L·C_in·b      the two branches' [N, L, 384] Fill inputs and their [2N, L, 384] batch
             + R·T·J·b + R·P·b                 the text conditioning repeated for both branches
             + 2·S·Dh·4                        diffusers' rotary table (cos, sin; fp32)
    X(S)                                       the residual stream entering a block
    single   = X(S) · (1 + 1 + m + 3 + 2 + 1) + joint(S, 1) + S·Dh·4
               concat(text, image), modulated norm, MLP hidden (m = 4: 4·D wide), base Q/K/V (kept for the joint
               module), roped Q/K, attention output; the joint module; the block's complex rotary table
    double   = X(L) · (1 + 3 + 1) + X(T) · (1 + 3 + 1) + X(S) · (3 + 1) + joint(L, 2) + S·Dh·4
               image: modulated norm, base Q/K/V, `to_out` output; text: modulated norm, added Q/K/V, `to_add_out`
               output; both: concatenated Q/K/V and attention output; the joint module on the image tokens
    joint(n, p) = X(n) · max(3 + 1 + rope, 3 + 1 + p)
               its LoRA'd Q/K/V and either one normed copy being rotated (`dual_flux.apply_rope`: the fp32 copy and
               complex product, rope = 1 in fp32 compute, 2·(4/b) + 1 = 5 in bf16 with the cast back) or the
               messages and the p outputs of its output projection (double: folded `to_out` + its LoRA add)
    workspace (quantised formats) = 2·b per value of the largest quantised Linear: its dequantised copy and the
               cast to the compute dtype, an upper bound: it lives only while that Linear runs, not during the joint
               module where the peak is (measured on tiny fp8 / Q8_0 / Q4_K models, the peak is the formula without
               it), but at 512² a single block's `proj_out` runs 8·X(S) below the peak, less than this workspace

At 1024² (L = 4096) the single block is the peak: 21 · X(4608) in bf16. The formula is the live-tensor set at the
peaks of the current code, read from diffusers' `FluxSingleTransformerBlock` / `FluxTransformerBlock` and
`dual_flux.JointAttnProcessor` / `JointAttention`; it covers the release preset (no content LoRA, linear post).
Sizes are printed in GiB (2**30 bytes), the unit of card capacities.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .models.dual_flux import DualBranchConfig


GIB = 2**30
WEIGHT_FORMATS = ("bf16", "fp8", "fp8_all", "q8_0", "q4_k")
OFFLOAD_MODES = ("none", "model", "block")
# GGML block sizes: (values per block, bytes per block), as gguf.GGML_QUANT_SIZES gives them.
GGUF_BLOCKS = {"q8_0": (32, 34), "q4_k": (256, 144)}
# store_weights_in_fp8's skip patterns (bfs_core/models/dual_flux.py), searched in module paths like diffusers does.
FP8_SKIP_PATTERNS = ("pos_embed", "norm", "joint", "time_text_embed", "x_embedder", "^proj_out$")
TEXT_TOKENS = 512


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its state-dict name, shape, and the Linear it belongs to (None: not a Linear's)."""

    name: str
    shape: tuple[int, ...]
    linear: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def block(self) -> str | None:
        """`transformer_blocks.<i>` / `single_transformer_blocks.<j>` for tensors inside a block."""
        m = re.match(r"((?:single_)?transformer_blocks\.\d+)\.", self.name)
        return m.group(1) if m else None


def _linear(path: str, n_in: int, n_out: int, bias: bool = True) -> list[TensorSpec]:
    specs = [TensorSpec(f"{path}.weight", (n_out, n_in), path)]
    return specs + ([TensorSpec(f"{path}.bias", (n_out,), path)] if bias else [])


def flux_inventory(cfg: dict) -> list[TensorSpec]:
    """Every parameter of a diffusers `FluxTransformer2DModel` built from `cfg` (names and shapes)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dh = cfg["attention_head_dim"]
    specs = _linear("x_embedder", cfg["in_channels"], d)
    specs += _linear("time_text_embed.timestep_embedder.linear_1", 256, d)
    specs += _linear("time_text_embed.timestep_embedder.linear_2", d, d)
    if cfg.get("guidance_embeds"):
        specs += _linear("time_text_embed.guidance_embedder.linear_1", 256, d)
        specs += _linear("time_text_embed.guidance_embedder.linear_2", d, d)
    specs += _linear("time_text_embed.text_embedder.linear_1", cfg["pooled_projection_dim"], d)
    specs += _linear("time_text_embed.text_embedder.linear_2", d, d)
    specs += _linear("context_embedder", cfg["joint_attention_dim"], d)
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}"
        specs += _linear(f"{p}.norm1.linear", d, 6 * d) + _linear(f"{p}.norm1_context.linear", d, 6 * d)
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            specs += _linear(f"{p}.attn.{name}", d, d)
        specs += [
            TensorSpec(f"{p}.attn.{n}.weight", (dh,)) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
        ]
        for ff in ("ff", "ff_context"):
            specs += _linear(f"{p}.{ff}.net.0.proj", d, 4 * d) + _linear(f"{p}.{ff}.net.2", 4 * d, d)
    for j in range(cfg["num_single_layers"]):
        p = f"single_transformer_blocks.{j}"
        specs += _linear(f"{p}.norm.linear", d, 3 * d)
        specs += _linear(f"{p}.proj_mlp", d, 4 * d) + _linear(f"{p}.proj_out", 5 * d, d)
        specs += _linear(f"{p}.attn.to_q", d, d) + _linear(f"{p}.attn.to_k", d, d) + _linear(f"{p}.attn.to_v", d, d)
        specs += [TensorSpec(f"{p}.attn.{n}.weight", (dh,)) for n in ("norm_q", "norm_k")]
    specs += _linear("norm_out.linear", d, 2 * d)
    specs += _linear("proj_out", d, cfg["out_channels"])
    return specs


def _check_preset(preset: DualBranchConfig) -> None:
    if preset.content_rank or preset.joint_post != "linear":
        raise ValueError(
            f"The memory model covers the release preset (no content LoRA, linear joint post) but got {preset}. "
            "Use DualBranchConfig.release()."
        )


def bfs_inventory(cfg: dict, preset: DualBranchConfig, folded: bool = True) -> list[TensorSpec]:
    """The BFS parameters patching adds at `preset` (joint LoRAs, post) and, with `folded`, the inference buffers
    `prepare_for_inference` adds (the linear post folded into `to_out` in double blocks)."""
    _check_preset(preset)
    d, r = cfg["num_attention_heads"] * cfg["attention_head_dim"], preset.joint_rank
    blocks = [(f"single_transformer_blocks.{j}", False) for j in range(cfg["num_single_layers"])]
    if preset.joint_placement == "all":
        blocks = [(f"transformer_blocks.{i}", True) for i in range(cfg["num_layers"])] + blocks
    specs = []
    for block, is_double in blocks:
        for proj in ("to_q", "to_k", "to_v") + (("to_out",) if is_double else ()):
            for branch in ("comp", "fg"):
                specs += [
                    TensorSpec(f"{block}.joint.{proj}.lora_A.{branch}.weight", (r, d)),
                    TensorSpec(f"{block}.joint.{proj}.lora_B.{branch}.weight", (d, r)),
                ]
        specs.append(TensorSpec(f"{block}.joint.post.weight", (d, d)))
        if is_double and folded:
            specs += [
                TensorSpec(f"{block}.joint.folded_weight", (d, d)),
                TensorSpec(f"{block}.joint.folded_bias", (d,)),
                TensorSpec(f"{block}.joint.folded_lora_B_comp", (d, r)),
                TensorSpec(f"{block}.joint.folded_lora_B_fg", (d, r)),
            ]
    return specs


def _fp8_pack(spec: TensorSpec) -> bool:
    """True where `store_weights_in_fp8` stores the tensor in fp8: a Linear's weight or bias outside the skip
    patterns (layerwise casting casts the whole module)."""
    if spec.linear is None:
        return False
    parts = spec.linear.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # diffusers tests each module path on the way
    return not any(re.search(p, prefix) for p in FP8_SKIP_PATTERNS for prefix in prefixes)


def tensor_bytes(spec: TensorSpec, fmt: str) -> int:
    """Bytes one transformer tensor takes in `fmt` (see the module docstring)."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"Weight format must be one of {WEIGHT_FORMATS} but got {fmt!r}.")
    n = spec.numel
    if fmt == "bf16":
        return 2 * n
    if fmt == "fp8":
        return n if _fp8_pack(spec) else 2 * n
    if fmt == "fp8_all":
        quantised = spec.block is not None and len(spec.shape) == 2
        return n + 4 if quantised else 2 * n  # + the layer's fp32 scale (scaled fp8)
    if len(spec.shape) != 2:
        return 2 * n
    rows, cols = spec.shape
    for name in (fmt, "q8_0"):  # a Q4_K file falls back to Q8_0 for rows of 32k values
        values, block_bytes = GGUF_BLOCKS[name]
        if cols % values == 0:
            return rows * (cols // values) * block_bytes
    return 2 * n


def quantised(spec: TensorSpec, fmt: str) -> bool:
    return tensor_bytes(spec, fmt) < 2 * spec.numel


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes of the dual-branch model in one format: in total, outside the blocks, and the largest block."""

    total: int
    non_block: int
    largest_block: int
    largest_quantised_linear: int  # values of the largest quantised Linear weight (its dequantisation workspace)

    def resident(self, offload: str) -> int:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"Offload mode must be one of {OFFLOAD_MODES} but got {offload!r}.")
        if offload == "block":  # the running block + the one being prefetched
            return self.non_block + 2 * self.largest_block
        return self.total


def weight_bytes(cfg: dict, preset: DualBranchConfig, fmt: str) -> WeightBytes:
    per_block: dict[str, int] = {}
    non_block = 0
    largest_linear = 0
    for spec in flux_inventory(cfg):
        size = tensor_bytes(spec, fmt)
        if spec.block is None:
            non_block += size
        else:
            per_block[spec.block] = per_block.get(spec.block, 0) + size
        if spec.linear is not None and len(spec.shape) == 2 and quantised(spec, fmt):
            largest_linear = max(largest_linear, spec.numel)
    for spec in bfs_inventory(cfg, preset):  # bf16: adapters and folded posts stay in the compute dtype
        per_block[spec.block] += 2 * spec.numel
    total = non_block + sum(per_block.values())
    return WeightBytes(total, non_block, max(per_block.values()), largest_linear)


@dataclass(frozen=True)
class ActivationBytes:
    inputs: int
    stream: int
    single: int
    double: int
    workspace: int

    @property
    def peak(self) -> int:
        return self.inputs + self.stream + max(self.single, self.double) + self.workspace


def activation_bytes(
    cfg: dict,
    image_tokens: int,
    text_tokens: int = TEXT_TOKENS,
    *,
    samples: int = 1,
    compute_bytes: int = 2,
    workspace_values: int = 0,
    preset: DualBranchConfig | None = None,
) -> ActivationBytes:
    """The activation peak of one dual-branch step (formula in the module docstring)."""
    _check_preset(preset or DualBranchConfig.release())
    rows = 2 * samples  # comp rows + fg rows
    d, dh, b = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["attention_head_dim"], compute_bytes
    length, text, seq = image_tokens, text_tokens, image_tokens + text_tokens
    rope = 1 if b == 4 else 2 * (4 / b) + 1  # apply_rope's fp32 copy and complex product (and the cast back)

    def x(n: int) -> float:
        return rows * n * d * b

    inputs = (samples * 2 + rows) * length * cfg["in_channels"] * b
    inputs += rows * text * cfg["joint_attention_dim"] * b + rows * cfg["pooled_projection_dim"] * b
    inputs += 2 * seq * dh * 4

    def joint(n: int, out_projections: int) -> float:
        return x(n) * max(3 + 1 + rope, 3 + 1 + out_projections)

    table = seq * dh * 4  # complex64 [S, Dh/2], built per block
    single = x(seq) * (1 + 1 + 4 + 3 + 2 + 1) + joint(seq, 1) + table
    double = x(length) * (1 + 3 + 1) + x(text) * (1 + 3 + 1) + x(seq) * (3 + 1) + joint(length, 2) + table
    return ActivationBytes(
        inputs=int(inputs),
        stream=int(x(seq)),
        single=int(single),
        double=int(double) if cfg["num_layers"] else 0,
        workspace=2 * workspace_values * b,
    )


@dataclass(frozen=True)
class MemoryRow:
    resolution: int
    fmt: str
    offload: str
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def image_tokens(resolution: int) -> int:
    if resolution % 16:
        raise ValueError(
            f"The resolution must be a multiple of 16 (Flux packs 2×2 latent patches) but got {resolution}."
        )
    return (resolution // 16) ** 2


def memory_table(
    cfg: dict | None = None,
    resolutions: tuple[int, ...] = (512, 1024),
    formats: tuple[str, ...] = WEIGHT_FORMATS,
    offloads: tuple[str, ...] = OFFLOAD_MODES,
    preset: DualBranchConfig | None = None,
) -> list[MemoryRow]:
    """Rows for each resolution × weight format × offload mode, batch 1, bf16 compute (real config by default)."""
    if cfg is None:
        from .models.flux_fill_loading import load_shipped_config

        cfg = {k: v for k, v in load_shipped_config("flux_fill_transformer").items() if not k.startswith("_")}
    preset = preset or DualBranchConfig.release()
    rows = []
    for resolution in resolutions:
        for fmt in formats:
            weights = weight_bytes(cfg, preset, fmt)
            act = activation_bytes(
                cfg, image_tokens(resolution), workspace_values=weights.largest_quantised_linear, preset=preset
            )
            for offload in offloads:
                rows.append(MemoryRow(resolution, fmt, offload, weights.resident(offload), act.peak))
    return rows


def find_row(rows: list[MemoryRow], resolution: int, fmt: str, offload: str) -> MemoryRow:
    return next(r for r in rows if (r.resolution, r.fmt, r.offload) == (resolution, fmt, offload))


__all__ = [
    "WEIGHT_FORMATS",
    "OFFLOAD_MODES",
    "flux_inventory",
    "bfs_inventory",
    "tensor_bytes",
    "weight_bytes",
    "activation_bytes",
    "memory_table",
    "find_row",
    "GIB",
]
