"""`python -m bfs_core evaluate-toy-decomposition`: the toy decomposition model against plain inpainting and chance.

Prints one table on held-out toy scenes (bfs_core/toy/evaluate_decomposition.py says what each column measures); the
last line is machine-readable: `bg_psnr=<ours> baseline_bg_psnr=<fill> alpha_iou=<ours> chance_alpha_iou=<chance>`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from .checks import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="which run of held-out scenes, and the sampling seed")
    parser.add_argument("--scenes", type=int, default=64, help="held-out scenes (default 64, at least 2)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    parser.add_argument(
        "--weights",
        help="decomposition weights (default: bfs_core/toy/weights/decomposition/decomposition.safetensors)",
    )
    parser.add_argument("--out", help="also write the table (Markdown) and the numbers (JSON) with this path stem")


def run(args) -> int:
    import torch

    from bfs_core.toy.evaluate_decomposition import evaluate, format_table, paper_lines, summary_line

    if args.scenes < 2:
        raise ValueError(f"`--scenes` must be at least 2 (the chance row pairs scenes) but got {args.scenes}.")
    if args.steps < 1:
        raise ValueError(f"`--steps` must be at least 1 but got {args.steps}.")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0 but got {args.seed}.")
    if args.out:
        check_output_file(Path(args.out).with_suffix(".md"), "--out")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    rows = evaluate(args.scenes, args.steps, args.seed, weights=args.weights)
    table = format_table(rows)
    note = "" if "fill_then_extract" in rows else "\n(fill_then_extract: not offered by this pipeline version)"
    text = f"{table}\n{paper_lines()}{note}\n{summary_line(rows)}"
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stem.with_suffix(".md"), text + "\n")
        atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=2))
    print(text)
    return 0
