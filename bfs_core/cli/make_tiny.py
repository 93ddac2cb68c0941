"""`python -m bfs_core make-tiny DIR`: tiny random models in every on-disk format the pack reads (diffusers folders,
BFL safetensors in bf16/fp8/scaled fp8, ComfyUI-GGUF Q8_0 and Q4_K files, BFS weights, RGBA VAEs, ...)."""

import argparse

from .checks import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write into (created if needed)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from bfs_core.tiny import write_tiny_set

    check_output_dir(args.out_dir, "out_dir")
    for name, path in write_tiny_set(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0
