"""`python -m bfs_core bench`: dual-branch step vs plain Flux-Fill step; the last line is `ratio=<x>` (release)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-size", action="store_true", help="real FLUX.1-Fill-dev config, bf16 (needs a GPU)")
    parser.add_argument("--resolution", type=int, default=512, help="image side for --full-size (512 or 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="paper,release", help="comma-separated presets; release is last")
    parser.add_argument("--device", default=None)


def run(args) -> int:
    from bfs_core.bench import run_benchmark

    presets = tuple(p for p in args.presets.split(",") if p)
    run_benchmark(
        full_size=args.full_size, resolution=args.resolution, presets=presets, repeats=args.repeats, device=args.device
    )
    return 0
