"""`python -m bfs_core bench`: dual-branch step vs plain Flux-Fill step; the last line is `ratio=<x>` (release).

`bench --memory` prints the memory model (`bfs_core/memory.py`) instead: weight, activation and total GiB of one
dual-branch step of the real FLUX.1-Fill-dev at 512² and 1024², batch 1, per weight format and offload mode; the
last line is `fp8_1024_gb=<x> q8_0_1024_gb=<y> q4k_block_offload_1024_gb=<z>`. Nothing is run or loaded.
"""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-size", action="store_true", help="real FLUX.1-Fill-dev config, bf16 (needs a GPU)")
    parser.add_argument("--resolution", type=int, default=512, help="image side for --full-size (512 or 1024)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved plain/dual pairs (median and spread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: also pinned to one CPU)")
    parser.add_argument("--no-fast", action="store_true", help="skip the step-cache (fast setting) ratio")
    parser.add_argument("--presets", default="paper,release", help="comma-separated presets; release is last")
    parser.add_argument("--device", default=None)
    parser.add_argument("--memory", action="store_true", help="print the memory model (estimates; runs nothing)")


def run(args) -> int:
    if args.memory:
        return print_memory_table()
    from bfs_core.bench import run_benchmark

    presets = tuple(p for p in args.presets.split(",") if p)
    fast_fraction = None if args.no_fast or "release" not in presets else toy_fast_fraction()
    run_benchmark(
        full_size=args.full_size,
        resolution=args.resolution,
        presets=presets,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
        fast_fraction=fast_fraction,
    )
    return 0


def toy_fast_fraction(steps: int = 50) -> float:
    """Share of full transformer evaluations with the `fast` step-cache setting at `steps` steps, measured on the toy
    model over a few held-out scenes (the random bench weights have no meaningful step-to-step behaviour)."""

    from bfs_core.sampling.step_cache import FAST_THRESHOLD
    from bfs_core.toy.evaluate import heldout_scenes, predict
    from bfs_core.toy.models import load_toy

    pipe, rgba = load_toy()
    preds = predict(pipe, rgba, heldout_scenes(4), steps=steps, cache_threshold=FAST_THRESHOLD)
    fraction = preds.full_evaluations / preds.transformer_calls
    print(f"fast setting (cache_threshold={FAST_THRESHOLD}): {fraction:.3f} of {steps} steps run every block (toy)")
    return fraction


# Targets of issue 15 (estimates): a 16 GB card without offload for fp8 / Q8_0, an 8 GB card for Q4_K + block offload.
MEMORY_TARGETS = (("fp8", "none", 16), ("q8_0", "none", 16), ("q4_k", "block", 8))


def print_memory_table() -> int:
    from bfs_core.memory import GIB, find_row, memory_table

    rows = memory_table()
    print(
        "memory model: one dual-branch step (comp + fg rows), FLUX.1-Fill-dev, release preset, batch 1, bf16 compute"
    )
    print("GiB = 2**30 bytes; text encoders, VAE and the CUDA context not included (see bfs_core/memory.py)")
    print(f"{'resolution':>10} {'format':>8} {'offload':>7} {'weights_gb':>10} {'activation_gb':>13} {'total_gb':>8}")
    for r in rows:
        print(
            f"{r.resolution:>10} {r.fmt:>8} {r.offload:>7} {r.weights / GIB:>10.2f} {r.activations / GIB:>13.2f} "
            f"{r.total / GIB:>8.2f}"
        )
    for fmt, offload, limit in MEMORY_TARGETS:
        total = find_row(rows, 1024, fmt, offload).total / GIB
        verdict = "met" if total <= limit else "NOT met"
        print(f"target 1024² {fmt} offload={offload} <= {limit} GiB: {verdict} ({total:.2f} GiB estimated)")
    fp8, q8, q4 = (find_row(rows, 1024, fmt, offload).total / GIB for fmt, offload, _ in MEMORY_TARGETS)
    print(f"fp8_1024_gb={fp8:.2f} q8_0_1024_gb={q8:.2f} q4k_block_offload_1024_gb={q4:.2f}")
    return 0
