"""`python -m bfs_core bench`: dual-branch step vs plain Flux-Fill step; the last line is `ratio=<x>` (release)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-size", action="store_true", help="real FLUX.1-Fill-dev config, bf16 (needs a GPU)")
    parser.add_argument("--resolution", type=int, default=512, help="image side for --full-size (512 or 1024)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved plain/dual pairs (median and spread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: also pinned to one CPU)")
    parser.add_argument("--no-fast", action="store_true", help="skip the step-cache (fast setting) ratio")
    parser.add_argument("--presets", default="paper,release", help="comma-separated presets; release is last")
    parser.add_argument("--device", default=None)


def run(args) -> int:
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
