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
    parser.add_argument(
        "--ablations",
        metavar="WORK",
        help="also score every <WORK>/variants/<name>/bfs.safetensors "
        "(written by `python scripts/train_toy.py --ablations --work WORK`)",
    )
    parser.add_argument(
        "--cache-threshold",
        metavar="X",
        help="step caching: a number >= 0 (0 = exact) or `fast` (the documented setting); the output then ends with "
        "transformer_evals=<n> exact_evals=<m>",
    )
    parser.add_argument(
        "--sweep",
        metavar="STEPS:X,...",
        help="one row per setting instead, e.g. '50:0,50:0.05,50:fast,20:0,10:0' (steps:cache_threshold): every "
        "metric and the transformer evaluations each took",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="score reference-guided layers instead (the toy reference encoder: a picture of the object with the "
        "neutral prompt, replace and append modes, and against a contradicting caption); the output then ends with "
        "reference_colour_acc=<x> reference_shape_acc=<y> chance_colour_acc=<c> chance_shape_acc=<s>",
    )
    parser.add_argument(
        "--reference-weights",
        metavar="DIR",
        help="a toy reference encoder folder (vision/, redux/; default: the shipped bfs_core/toy/weights/reference)",
    )
    parser.add_argument("--out", help="write the table (Markdown) and the numbers (JSON) with this path stem")


def run(args) -> int:
    import torch

    from bfs_core.sampling.step_cache import parse_cache_threshold
    from bfs_core.toy.evaluate import (
        evaluate_reference,
        evaluate_variants,
        format_reference_table,
        format_sweep,
        format_table,
        sweep,
    )

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
    threshold = 0.0
    if args.cache_threshold is not None:
        threshold = parse_cache_threshold(args.cache_threshold, "--cache-threshold")
    settings = _parse_sweep(args.sweep) if args.sweep else None
    if args.reference and (settings or variants or args.cache_threshold is not None):
        raise ValueError(
            "`--reference` scores the reference encoder alone: drop --sweep, --ablations, --cache-threshold."
        )
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    evals: dict[str, int] = {}
    if args.reference:
        rows = evaluate_reference(
            args.weights, args.reference_weights, count=args.count, steps=args.steps, seed=args.seed
        )
        table = format_reference_table(rows)
    elif settings:
        rows = sweep(args.weights, settings, count=args.count, seed=args.seed)
        table = format_sweep(rows)
    else:
        rows = evaluate_variants(
            args.weights,
            variants,
            count=args.count,
            steps=args.steps,
            seed=args.seed,
            cache_threshold=threshold,
            evals=evals,
        )
        table = format_table(rows)
    print(table)
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        keys = ("count", "steps", "seed", "ablations", "cache_threshold", "sweep", "reference")
        used = {k: v for k, v in vars(args).items() if k in keys and v not in (None, False)}
        command = "python -m bfs_core evaluate-toy " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in used.items()
        )
        atomic_write_text(stem.with_suffix(".md"), f"`{command}`\n\n{table}\n")
        atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=2))
        print(f"written: {stem.with_suffix('.md')}, {stem.with_suffix('.json')}")
    if args.cache_threshold is not None and not settings:
        print(f"transformer_evals={evals['transformer_evals']} exact_evals={evals['exact_evals']}")
    if args.reference:
        ref, chance = rows["reference, append"], rows["chance (shuffled)"]
        print(
            f"reference_colour_acc={ref['colour_acc']:.3f} reference_shape_acc={ref['shape_acc']:.3f} "
            f"chance_colour_acc={chance['colour_acc']:.3f} chance_shape_acc={chance['shape_acc']:.3f}"
        )
    return 0


def _parse_sweep(text: str) -> list[tuple[int, float]]:
    from bfs_core.sampling.step_cache import parse_cache_threshold

    settings = []
    for item in text.split(","):
        steps, sep, threshold = item.strip().partition(":")
        if not sep or not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(
                f"`--sweep` items must be steps:cache_threshold (e.g. 50:0.1 or 50:fast) but got {item!r}."
            )
        settings.append((int(steps), parse_cache_threshold(threshold, "--sweep")))
    return settings
