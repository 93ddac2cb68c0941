"""`python -m bfs_core evaluate-decomposition`: score decomposition (and the Flux-Fill baseline) on a case set."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .decompose import add_model_arguments, load_components, resolved_short_side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", required=True, help="case folder (see bfs_core/decomposition_eval.py)")
    parser.add_argument(
        "--build-cases",
        metavar="ASSETS",
        help="first build --cases from these assets (photos/ + stamps/, e.g. tests/assets)",
    )
    parser.add_argument("--num-cases", type=int, default=4)
    parser.add_argument("--case-size", type=int, default=64)
    parser.add_argument(
        "--methods",
        default="baseline,ours",
        help="comma list of: baseline (plain FLUX.1-Fill-dev "
        "inpainting of the mask), ours (needs --weights and --rgba-vae)",
    )
    parser.add_argument("--lpips", help="TorchScript LPIPS file (local); LPIPS is reported only with it")
    parser.add_argument("--fid-features", help="TorchScript feature extractor for FID (local); FID only with it")
    parser.add_argument("--out", help="also write predictions and report.json here")
    add_model_arguments(parser)


def run(args) -> int:
    from bfs_core.decomposition_eval import build_case_set, evaluate, format_table, read_cases, write_report
    from bfs_core.pipelines.decomposition import DecompositionPipeline

    if args.build_cases:
        build_case_set(args.build_cases, args.cases, count=args.num_cases, size=args.case_size)
    cases = read_cases(args.cases)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"baseline", "ours"})
    if unknown or not methods:
        raise ValueError(f"`--methods` must be a comma list of 'baseline' and 'ours' but got {args.methods!r}.")
    lpips = torch.jit.load(args.lpips).eval() if args.lpips else None
    fid = torch.jit.load(args.fid_features).eval() if args.fid_features else None
    names = {"baseline": "FLUX.1-Fill-dev", "ours": "Outpaint-and-Remove"}
    results = []
    for method in methods:
        model, codec, decoder, encoders, scheduler = load_components(args, baseline=method == "baseline")
        pipe = DecompositionPipeline(model, codec, decoder, scheduler)
        embeds, pooled = encoders.encode([args.prompt])

        def decompose(case, pipe=pipe, embeds=embeds, pooled=pooled):
            r = pipe.decompose(
                case.composite,
                case.mask,
                embeds,
                pooled,
                compute_edges=not args.no_edges,
                seed=args.seed,
                steps=args.steps,
                guidance=args.guidance,
                short_side=resolved_short_side(args),
            )
            return r.foreground, r.background

        out = Path(args.out) if args.out else None
        results.append(evaluate(names[method], decompose, cases, lpips=lpips, fid_features=fid, out_dir=out))
        del model, pipe
    print(format_table(results))
    if args.out:
        print(f"report: {write_report(results, Path(args.out) / 'report.json')}")
    return 0
