"""Step-time benchmark: one dual-branch BFS step against one plain Flux-Fill step, same process, alternating runs.

The CPU default keeps the real model's proportions at 512²: head dim 128, double:single blocks 1:2, and tokens about
half the width (the real model has 1536 tokens = 512 text + 1024 image at width 3072, text:image 1:2). `full_size`
uses the real FLUX.1-Fill-dev config in bf16 with random weights (a GPU job).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass

import torch

from .models.dual_flux import DualBranchConfig, DualBranchFlux, prepare_for_inference
from .sampling.flow_match import latent_image_ids
from .tiny.bfs import randomize_bfs_parameters


logger = logging.getLogger(__name__)

CPU_BENCH_CONFIG = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=128,
    num_attention_heads=8,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


@dataclass
class BenchShape:
    text_tokens: int
    latent_h: int  # unpacked latent size (image tokens = latent_h/2 · latent_w/2)
    latent_w: int

    @property
    def image_tokens(self) -> int:
        return (self.latent_h // 2) * (self.latent_w // 2)


def step_flops(cfg: dict, shape: BenchShape, preset: DualBranchConfig | None) -> float:
    """Matmul + attention FLOPs of one transformer step for one sample (both branches when `preset` is given).

    Counts 2·m·n·k per matmul and 4·S²·D per attention (QKᵀ and AV); norms, RoPE and softmax are ignored. For the
    dual model this is the floor: two branches plus only what the joint module must add (base Q/K/V shared, the
    linear post folded into `to_out` in double blocks, LoRA deltas at their rank).
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    t, img = shape.text_tokens, shape.image_tokens
    s = t + img
    embed = (
        2 * img * cfg["in_channels"] * d + 2 * t * cfg["joint_attention_dim"] * d + 2 * img * d * cfg["out_channels"]
    )
    double = 24 * s * d * d + 4 * s * s * d  # q,k,v,out + 4x MLP on text and image streams, joint attention
    single = 24 * s * d * d + 4 * s * s * d  # q,k,v + 4x MLP in (6+8) and proj_out from 5D (10)
    plain = embed + cfg["num_layers"] * double + cfg["num_single_layers"] * single
    if preset is None:
        return plain

    def lora(tokens, n_in, n_out, rank):
        return 2 * tokens * rank * (n_in + n_out)

    extra = 0.0
    r = preset.content_rank
    if r:
        per_double = 8 * lora(s, d, d, r) + 2 * lora(s, d, 4 * d, r) + 2 * lora(s, 4 * d, d, r)  # rough split: t+img
        per_single = 3 * lora(s, d, d, r) + lora(s, d, 4 * d, r) + lora(s, 5 * d, d, r)
        extra += cfg["num_layers"] * per_double / 2 + cfg["num_single_layers"] * per_single  # double: half each stream
    rj = preset.joint_rank
    hidden = round(preset.joint_mlp_ratio * 2 * d)
    post = (2 * s * d * d) if preset.joint_post == "linear" else 4 * s * d * hidden  # per row
    extra += cfg["num_single_layers"] * (3 * lora(s, d, d, rj) + 4 * s * s * d + post)
    if preset.joint_placement == "all":
        # image tokens only; the linear post is folded into to_out, so one D×D projection remains
        post_double = 2 * img * d * d if preset.joint_post == "linear" else 2 * img * d * d + 4 * img * d * hidden
        extra += cfg["num_layers"] * (4 * lora(img, d, d, rj) + 4 * img * img * d + post_double)
    return 2 * (plain + extra)


def _inputs(cfg: dict, shape: BenchShape, n: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    length = shape.image_tokens

    def rnd(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)

    return dict(
        comp_latents=rnd(n, length, 64),
        fg_latents=rnd(n, length, 64),
        fill_cond=rnd(n, length, 320),
        prompt_embeds=rnd(n, shape.text_tokens, cfg["joint_attention_dim"]),
        pooled=rnd(n, cfg["pooled_projection_dim"]),
        timestep_comp=0.5,
        timestep_fg=0.5,
        img_ids=latent_image_ids(shape.latent_h, shape.latent_w, device=device, dtype=dtype),
    )


def _time(fn, device) -> float:
    """Seconds one call takes: GPU wall time (synchronised) on CUDA; on the CPU the process's CPU time, which other
    load on the machine does not inflate the way it inflates wall-clock time (threads are fixed, see `pin_threads`)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def pin_threads(threads: int) -> str:
    """Fix torch's thread count and, with one thread, pin the process to one CPU: per-step CPU time then depends on
    the work, not on how the scheduler spreads it. Returns a description for the header line."""
    torch.set_num_threads(threads)
    pinned = ""
    if threads == 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        pinned = f" pinned_cpu={cpus[-1]}"
    return f"threads={threads}{pinned}"


UNRELIABLE_SPREAD = 0.05  # interquartile range of the per-pair ratios / their median, above which a run is flagged


def ratio_stats(plain_times: list[float], dual_times: list[float]) -> dict[str, float]:
    """Median of the per-pair ratios (each dual step over the plain step timed just before it) and their spread
    (interquartile range / median): a pair shares whatever the machine was doing at that moment."""
    ratios = sorted(d / p for p, d in zip(plain_times, dual_times))
    q = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    q1, median, q3 = (float(v) for v in q)
    return {"ratio": median, "spread": (q3 - q1) / median, "min": ratios[0], "max": ratios[-1]}


def _build(cfg: dict, device, dtype, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        return FluxTransformer2DModel(**cfg).to(dtype).eval()


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


@torch.no_grad()
def run_benchmark(
    *,
    full_size: bool = False,
    resolution: int = 512,
    presets: tuple[str, ...] = ("paper", "release"),
    repeats: int = 9,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    threads: int = 1,
    fast_fraction: float | None = None,
) -> dict[str, dict[str, float]]:
    """Time plain vs dual steps for each preset, interleaved; returns {preset: {measured, spread, floor, ...}}.

    `fast_fraction`: the share of steps that run the whole transformer with the documented `fast` step-cache setting
    at 50 steps (measured on the toy model by the CLI); with it, the per-image ratio of the fast setting is printed.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    thread_info = pin_threads(threads) if device.type == "cpu" else "gpu"
    if full_size:
        from .models.flux_fill_loading import load_shipped_config

        cfg = {k: v for k, v in load_shipped_config("flux_fill_transformer").items() if not k.startswith("_")}
        shape = BenchShape(text_tokens=512, latent_h=resolution // 8, latent_w=resolution // 8)
        dtype = dtype or torch.bfloat16
    else:
        cfg = CPU_BENCH_CONFIG
        # 512 tokens at width 1024, text:image = 1:2 as the real model at 512² (170 text + 18·19 = 342 image)
        shape = BenchShape(text_tokens=170, latent_h=36, latent_w=38)
        dtype = dtype or torch.float32
    print(
        f"device={device} dtype={dtype} width={cfg['num_attention_heads'] * cfg['attention_head_dim']} "
        f"blocks={cfg['num_layers']}+{cfg['num_single_layers']} text={shape.text_tokens} "
        f"image={shape.image_tokens} repeats={repeats} {thread_info} timer="
        f"{'cuda-synchronised wall' if device.type == 'cuda' else 'process CPU time'}"
    )
    inputs = _inputs(cfg, shape, 1, device, dtype)
    plain_model = _build(cfg, device, dtype)
    hidden = torch.cat([inputs["comp_latents"], inputs["fill_cond"]], -1)
    txt_ids = torch.zeros(shape.text_tokens, 3, device=device, dtype=dtype)
    ts = torch.full((1,), 0.5, device=device, dtype=dtype)
    guidance = torch.full((1,), 30.0, device=device)

    def plain_step():
        plain_model(
            hidden_states=hidden,
            encoder_hidden_states=inputs["prompt_embeds"],
            pooled_projections=inputs["pooled"],
            timestep=ts,
            img_ids=inputs["img_ids"],
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )

    results = {}
    for preset_name in presets:
        preset = DualBranchConfig.preset(preset_name)
        if device.type == "cuda":
            del plain_model
            torch.cuda.empty_cache()
        dual = DualBranchFlux(_build(cfg, device, dtype), preset)
        randomize_bfs_parameters(dual.transformer, seed=1)  # live joint modules: a fresh (zero) post is skipped
        prepare_for_inference(dual.transformer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        plain_times, dual_times = [], []
        plain_step(), dual(**inputs)  # warm-up
        for _ in range(repeats):  # interleaved pairs: whatever the machine does hits both steps of a pair
            plain_times.append(_time(plain_step, device))
            dual_times.append(_time(lambda model=dual: model(**inputs), device))
        stats = ratio_stats(plain_times, dual_times)
        p, d = sorted(plain_times)[len(plain_times) // 2], sorted(dual_times)[len(dual_times) // 2]
        floor = step_flops(cfg, shape, preset) / step_flops(cfg, shape, None)
        results[preset_name] = {
            "measured": stats["ratio"],
            "spread": stats["spread"],
            "floor": floor,
            "plain_s": p,
            "dual_s": d,
        }
        unreliable = stats["spread"] > UNRELIABLE_SPREAD
        flag = " UNRELIABLE (spread above 5%: rerun on a quieter machine)" if unreliable else ""
        print(
            f"preset={preset_name} plain={p * 1e3:.1f}ms dual={d * 1e3:.1f}ms measured={stats['ratio']:.3f}x "
            f"spread={stats['spread'] * 100:.1f}% (pairs {stats['min']:.3f}..{stats['max']:.3f}) "
            f"flop_floor={floor:.3f}x measured/floor={stats['ratio'] / floor:.3f} "
            f"peak_mem={_peak_memory(device)}{flag}"
        )
        if preset_name == "release" and fast_fraction is not None:
            results[preset_name]["fast"] = _fast_ratio(dual, inputs, plain_times, device, fast_fraction)
        del dual
        if device.type == "cuda":
            plain_model = _build(cfg, device, dtype)
    if "release" in results:
        if "fast" in results["release"]:
            print(f"fast_ratio={results['release']['fast']:.3f}")
        print(f"ratio={results['release']['measured']:.3f}")
    return results


def _fast_ratio(dual, inputs, plain_times, device, full_fraction: float, steps: int = 50) -> float:
    """Per-image time of the fast step-cache setting over plain Flux-Fill's, at `steps` steps: a fraction
    `full_fraction` of the steps run every block (the dual step timed above), the others only the first block and
    the embedders (timed here with the cache forced to skip)."""
    from .sampling.step_cache import step_cache

    with step_cache(dual, 1e9):
        dual(**inputs)  # the first call computes everything and fills the cache
        skipped = sorted(_time(lambda: dual(**inputs), device) for _ in range(5))[2]
    with step_cache(dual, 0.0):
        full = sorted(_time(lambda: dual(**inputs), device) for _ in range(3))[1]
    plain = sorted(plain_times)[len(plain_times) // 2]
    n_full = max(1, round(full_fraction * steps))
    ratio = (n_full * full + (steps - n_full) * skipped) / (steps * plain)
    print(
        f"fast: {n_full}/{steps} full steps ({full * 1e3:.1f}ms) + {steps - n_full} cached steps "
        f"({skipped * 1e3:.1f}ms) vs {steps} plain steps ({plain * 1e3:.1f}ms): {ratio:.3f}x per image"
    )
    return ratio


def paper_reference_ratio() -> float:
    """The paper's own figure: 31 s (BFS) vs 12 s (Flux-Fill) per image."""
    return 31 / 12


__all__ = ["run_benchmark", "step_flops", "paper_reference_ratio", "BenchShape"]
