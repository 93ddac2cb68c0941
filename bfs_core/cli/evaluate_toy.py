"""`python -m bfs_core evaluate-toy`: measure the toy model (and the ablation variants) on held-out toy scenes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from .checks import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="a toy model folder (default: the committed bfs_core/toy/weights)")
    parser.add_argument("--count", type=int, default=64, help="held-out scenes (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablations", metavar="WORK", help="also score every <WORK>/variants/<name>/bfs.safetensors "
                        "(written by `python scripts/train_toy.py --ablations --work WORK`)")  # fmt: skip
    parser.add_argument("--out", help="write the table (Markdown) and the numbers (JSON) with this path stem")


def run(args) -> int:
    import torch

    from bfs_core.toy.evaluate import evaluate_variants, format_table

    if args.count < 2:
        raise ValueError(f"`--count` must be at least 2 (the chance baseline pairs scenes) but got {args.count}.")
    if args.out:
        check_output_file(Path(args.out).with_suffix(".md"), "--out")
    variants = {}
    if args.ablations:
        found = sorted(Path(args.ablations).glob("variants/*/bfs.safetensors"))
        if not found:
            raise ValueError(f"No variants under {args.ablations}/variants/*/bfs.safetensors: train them first.")
        variants = {p.parent.name: p for p in found}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    rows = evaluate_variants(args.weights, variants, count=args.count, steps=args.steps, seed=args.seed)
    table = format_table(rows)
    print(table)
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        used = {k: v for k, v in vars(args).items() if k in ("count", "steps", "seed", "ablations") and v is not None}
        command = "python -m bfs_core evaluate-toy " + " ".join(f"--{k} {v}" for k, v in used.items())
        atomic_write_text(stem.with_suffix(".md"), f"`{command}`\n\n{table}\n")
        atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=2))
        print(f"written: {stem.with_suffix('.md')}, {stem.with_suffix('.json')}")
    return 0
