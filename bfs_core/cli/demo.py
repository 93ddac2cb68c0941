"""`python -m bfs_core demo`: the embedded toy model, end to end (BG2FG, layers with shadows, chaining, PSD/ORA)."""

from __future__ import annotations

import argparse

from .checks import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--weights", help="a toy model folder (default: the committed bfs_core/toy/weights)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per layer")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    from bfs_core.toy.demo import run_demo

    if args.steps < 1:
        raise ValueError(f"`--steps` must be at least 1 but got {args.steps}.")
    check_output_dir(args.out, "--out")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    result = run_demo(args.out, weights=args.weights, steps=args.steps, seed=args.seed)
    print(f"demo: {result.seconds:.1f} s")
    print(f"contact sheet: {result.contact_sheet}")
    print(f"layered files: {result.psd}, {result.ora}")
    return 0
