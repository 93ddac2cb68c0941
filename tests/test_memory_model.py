"""The memory model (bfs_core/memory.py) against real models: the parameter inventory against the real FLUX.1-Fill-dev
config (meta device), weight bytes against tiny models as stored in bf16 and the pack's fp8, the GGUF sizes against the
gguf package, and the activation formula against peaks measured on the CPU at tiny scale.

Measuring the activation peak: `torch.profiler` with `profile_memory=True` records every allocation and free the
CPU allocator makes (the same hook the CUDA allocator reports through), each with its size and a timestamp. With one
thread the events are ordered, so the running sum of their signed sizes is the number of bytes the step holds at
every moment, temporaries inside kernels included; its maximum is the step's activation peak (weights and inputs
exist before the profiled call and are not counted). Exact, not sampled, and independent of any allocator cache.
"""

import bisect
import itertools

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from bfs_core.memory import (
    GGUF_BLOCKS,
    TensorSpec,
    activation_bytes,
    bfs_inventory,
    flux_inventory,
    tensor_bytes,
    weight_bytes,
)
from bfs_core.models.dual_flux import (
    DualBranchConfig,
    DualBranchFlux,
    bfs_state_dict,
    prepare_for_inference,
    store_weights_in_fp8,
)
from bfs_core.models.flux_fill_loading import load_shipped_config
from bfs_core.sampling.flow_match import latent_image_ids
from bfs_core.tiny.bfs import randomize_bfs_parameters


RELEASE = DualBranchConfig.release()
REAL = {k: v for k, v in load_shipped_config("flux_fill_transformer").items() if not k.startswith("_")}
# Tiny but shaped like the real model: Fill input layout, head dim 32, one double and one single block.
TINY = {
    **REAL,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 14, 14],
}
TOLERANCE = 0.03  # measured vs predicted activation peak


def _tiny_dual(cfg: dict, dtype: torch.dtype) -> DualBranchFlux:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**cfg).eval()
    dual = DualBranchFlux(transformer, RELEASE)
    randomize_bfs_parameters(transformer, seed=1)  # live joint modules (a zero post is skipped)
    transformer.to(dtype)
    prepare_for_inference(transformer)
    return dual


def _stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def test_inventory_is_the_real_flux_fill_model():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**REAL)
        DualBranchFlux(transformer, RELEASE)
    bfs = bfs_state_dict(transformer)
    flux = {k: tuple(v.shape) for k, v in transformer.state_dict().items() if k not in bfs}
    assert flux == {s.name: s.shape for s in flux_inventory(REAL)}
    assert {k: tuple(v.shape) for k, v in bfs.items()} == {
        s.name: s.shape for s in bfs_inventory(REAL, RELEASE, False)
    }
    n_flux = sum(v.numel() for k, v in transformer.state_dict().items() if k not in bfs)
    assert sum(s.numel for s in flux_inventory(REAL)) == n_flux == 11_902_391_360  # FLUX.1-Fill-dev: 11.9 B


def test_weight_bytes_match_tiny_models_as_stored():
    dual = _tiny_dual(TINY, torch.bfloat16)
    folded = {k for k, _ in dual.transformer.named_buffers() if "folded" in k}
    assert folded == {s.name for s in bfs_inventory(TINY, RELEASE) if "folded" in s.name}
    assert _stored_bytes(dual.transformer) == weight_bytes(TINY, RELEASE, "bf16").total
    store_weights_in_fp8(dual.transformer)
    assert _stored_bytes(dual.transformer) == weight_bytes(TINY, RELEASE, "fp8").total
    fp8 = {n for n, p in dual.transformer.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8 == {s.name for s in flux_inventory(TINY) if tensor_bytes(s, "fp8") == s.numel}


def test_gguf_sizes_are_ggml_blocks():
    gguf = pytest.importorskip("gguf")
    types = gguf.GGMLQuantizationType
    assert GGUF_BLOCKS == {"q8_0": gguf.GGML_QUANT_SIZES[types.Q8_0], "q4_k": gguf.GGML_QUANT_SIZES[types.Q4_K]}
    weight = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    spec = TensorSpec("transformer_blocks.0.attn.to_q.weight", (64, 256), "transformer_blocks.0.attn.to_q")
    assert gguf.quants.quantize(weight, types.Q8_0).nbytes == tensor_bytes(spec, "q8_0") == 64 * 8 * 34
    assert tensor_bytes(spec, "q4_k") == 64 * 144
    odd = TensorSpec("x_embedder.weight", (64, 384), "x_embedder")  # 384 = 1.5 Q4_K blocks: Q8_0 instead
    assert tensor_bytes(odd, "q4_k") == 64 * 12 * 34
    assert tensor_bytes(TensorSpec("x_embedder.bias", (64,), "x_embedder"), "q4_k") == 128  # 1-D: compute dtype


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_weight_bytes_match_tiny_gguf_models_as_loaded(tmp_path, fmt):
    """The pack's GGUF loader on the tiny GGUF files (bfs_core.tiny.gguf), patched for BFS: bytes as held."""
    pytest.importorskip("gguf")
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
    from bfs_core.models.gguf import weight_bytes as held_bytes
    from bfs_core.tiny.flux import _tiny_fill_config
    from bfs_core.tiny.gguf import tiny_q4_k_config, write_tiny_flux_fill_gguf

    cfg = {k: v for k, v in (tiny_q4_k_config() if fmt == "q4_k" else _tiny_fill_config()).items() if k[0] != "_"}
    transformer = load_flux_fill_transformer(write_tiny_flux_fill_gguf(tmp_path)[f"gguf_{fmt}"])
    assert held_bytes(transformer) == sum(tensor_bytes(s, fmt) for s in flux_inventory(cfg))
    DualBranchFlux(transformer, RELEASE)
    randomize_bfs_parameters(transformer, seed=1)
    prepare_for_inference(transformer)
    assert held_bytes(transformer) == weight_bytes(cfg, RELEASE, fmt).total


def test_real_model_weights_and_targets():
    bf16 = weight_bytes(REAL, RELEASE, "bf16")
    bfs_values = sum(s.numel for s in bfs_inventory(REAL, RELEASE))
    assert bf16.total == 2 * (11_902_391_360 + bfs_values)
    q4 = weight_bytes(REAL, RELEASE, "q4_k")
    assert q4.resident("block") == q4.non_block + 2 * q4.largest_block < q4.resident("model") == q4.total


def _measure(dual: DualBranchFlux, cfg: dict, dtype: torch.dtype, latent_hw: int, text: int):
    """(peak bytes of one step, {block type: peak increment over the bytes live when the block starts}).

    Two steps are profiled and the second is measured: the allocator cannot report the size of a tensor freed in the
    profile that was allocated before it (fp8 layerwise casting replaces its weights in every call), so only a step
    whose predecessor also ran under the profiler is counted exactly."""
    torch.set_num_threads(1)
    length = (latent_hw // 2) ** 2
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs = dict(
        comp_latents=rnd(1, length, 64),
        fg_latents=rnd(1, length, 64),
        fill_cond=rnd(1, length, 320),
        prompt_embeds=rnd(1, text, cfg["joint_attention_dim"]),
        pooled=rnd(1, cfg["pooled_projection_dim"]),
        timestep_comp=0.5,
        timestep_fg=0.5,
        img_ids=latent_image_ids(latent_hw, latent_hw),
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad():
        dual(**inputs)  # warm-up: lazy one-off allocations stay out of the measured step
        with torch.profiler.profile(activities=activities, profile_memory=True, with_stack=True) as prof:
            dual(**inputs)
            dual(**inputs)
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = list(itertools.accumulate(e.nbytes() for e in memory))
    times = [e.start_ns() for e in memory]

    def peak_over_start(event) -> int:
        first, last = bisect.bisect_left(times, event.start_ns()), bisect.bisect_right(times, event.end_ns())
        return max(live[first:last]) - (live[first - 1] if first else 0)

    step = max((e for e in events if e.name().startswith("nn.Module: DualBranchFlux")), key=lambda e: e.start_ns())
    blocks = {}
    for e in events:
        kind = {"nn.Module: FluxTransformerBlock": "double", "nn.Module: FluxSingleTransformerBlock": "single"}.get(
            e.name().rsplit("_", 1)[0]
        )
        if kind and e.start_ns() >= step.start_ns():
            blocks[kind] = peak_over_start(e)
    return peak_over_start(step), blocks


@pytest.mark.parametrize(
    "dtype, heads, latent_hw, text",
    [
        (torch.float32, 4, 32, 64),  # 256 image + 64 text tokens, D = 128
        (torch.float32, 8, 48, 16),  # 576 + 16, D = 256
        (torch.bfloat16, 4, 32, 64),  # bf16 compute: the rotary temporaries are fp32
    ],
)
def test_activation_peak_matches_measured(dtype, heads, latent_hw, text):
    cfg = {**TINY, "num_attention_heads": heads}
    peak, blocks = _measure(_tiny_dual(cfg, dtype), cfg, dtype, latent_hw, text)
    model = activation_bytes(cfg, (latent_hw // 2) ** 2, text, compute_bytes=dtype.itemsize)
    print(f"measured peak {peak} B, predicted {model.peak} B; blocks measured {blocks}, predicted {model}")
    assert model.peak == pytest.approx(peak, rel=TOLERANCE)
    assert model.single == pytest.approx(blocks["single"], rel=TOLERANCE)
    assert model.double == pytest.approx(blocks["double"], rel=TOLERANCE)


def _quantised_dual(fmt: str, tmp_path) -> tuple[DualBranchFlux, dict]:
    if fmt == "fp8":
        cfg = {**TINY, "num_attention_heads": 4}
        dual = _tiny_dual(cfg, torch.bfloat16)
        store_weights_in_fp8(dual.transformer)
        return dual, cfg
    pytest.importorskip("gguf")
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
    from bfs_core.tiny.flux import _tiny_fill_config
    from bfs_core.tiny.gguf import tiny_q4_k_config, write_tiny_flux_fill_gguf

    cfg = {k: v for k, v in (tiny_q4_k_config() if fmt == "q4_k" else _tiny_fill_config()).items() if k[0] != "_"}
    transformer = load_flux_fill_transformer(write_tiny_flux_fill_gguf(tmp_path)[f"gguf_{fmt}"])
    dual = DualBranchFlux(transformer, RELEASE)
    randomize_bfs_parameters(transformer, seed=1)
    prepare_for_inference(transformer)
    return dual, cfg


@pytest.mark.parametrize("fmt", ["fp8", "q8_0", "q4_k"])
def test_activation_peak_with_quantised_weights(tmp_path, fmt):
    """Quantised storage (bf16 compute): the measured peak lies between the formula without the dequantisation
    workspace (it does not coincide with the peak at this scale) and the formula with it (the upper bound)."""
    dual, cfg = _quantised_dual(fmt, tmp_path)
    peak, _ = _measure(dual, cfg, torch.bfloat16, 32, 64)
    workspace = weight_bytes(cfg, RELEASE, fmt).largest_quantised_linear
    model = activation_bytes(cfg, 256, 64, compute_bytes=2, workspace_values=workspace)
    print(f"{fmt}: measured {peak} B, predicted {model.peak - model.workspace} B (+ workspace {model.workspace} B)")
    assert model.workspace > 0
    assert (model.peak - model.workspace) * (1 - TOLERANCE) <= peak <= model.peak


def test_activation_model_rejects_presets_it_does_not_cover():
    with pytest.raises(ValueError, match="release preset"):
        activation_bytes(REAL, 4096, preset=DualBranchConfig.paper())


def test_bench_memory_prints_the_table_and_last_line():
    import re
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", "bfs_core", "bench", "--memory"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table = {}
    for line in lines:
        cells = line.split()
        if len(cells) == 6 and cells[0] in ("512", "1024"):
            table[(int(cells[0]), cells[1], cells[2])] = [float(c) for c in cells[3:]]
    assert len(table) == 2 * 5 * 3  # resolutions × formats × offload modes
    for weights, activation, total in table.values():
        assert total == pytest.approx(weights + activation, abs=0.011)
    bfs_values = sum(s.numel for s in bfs_inventory(REAL, RELEASE))
    assert table[(1024, "bf16", "none")][0] == pytest.approx(2 * (11_902_391_360 + bfs_values) / 2**30, abs=0.005)
    act = activation_bytes(REAL, 4096)
    assert table[(1024, "bf16", "none")][1] == pytest.approx(act.peak / 2**30, abs=0.005)
    last = re.fullmatch(r"fp8_1024_gb=([\d.]+) q8_0_1024_gb=([\d.]+) q4k_block_offload_1024_gb=([\d.]+)", lines[-1])
    assert last, lines[-1]
    fp8, q8, q4 = (float(v) for v in last.groups())
    assert (fp8, q8, q4) == (
        table[(1024, "fp8", "none")][2],
        table[(1024, "q8_0", "none")][2],
        table[(1024, "q4_k", "block")][2],
    )
    verdicts = [line for line in lines if line.startswith("target 1024²")]
    assert [("NOT met" not in v) for v in verdicts] == [fp8 <= 16, q8 <= 16, q4 <= 8]
