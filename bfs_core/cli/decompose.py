"""`python -m bfs_core decompose`: image + mask -> foreground.png (RGBA), background.png and a layered file.

Two methods (`--method`): `outpaint_and_remove` (the decomposition model: --weights) and `fill_then_extract`
(FLUX.1-Fill-dev removal + BFS extraction: --bfs, public weights only; see `pipelines.decomposition`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..sampling.step_cache import parse_cache_threshold
from .checks import check_image, check_output_dir, check_weights, output_folder


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="FLUX.1-Fill-dev: diffusers folder or single .safetensors")
    parser.add_argument("--weights", help="decomposition weights (.safetensors from `python -m training decompose`)")
    parser.add_argument("--vae", help="Flux VAE folder (default: <base>/vae)")
    parser.add_argument("--rgba-vae", help="RGBA VAE (file or folder) that decodes the foreground latent")
    parser.add_argument("--text-encoders", help="folder with text_encoder(_2)/ and tokenizer(_2)/ (default: <base>)")
    parser.add_argument("--prompt", default="", help="optional description of the scene (empty works)")
    parser.add_argument("--depth-model", help="local transformers depth model folder (e.g. Depth-Anything-V2)")
    parser.add_argument("--segmentation-model", help="local transformers segmentation model folder (e.g. SegFormer)")
    parser.add_argument("--no-edges", action="store_true", help="do not compute the Canny edge context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=30.0)
    parser.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="processing short side (0 = keep size; default: the paper's 1024, DEFAULT_SHORT_SIDE in "
        "bfs_core/models/layer_decomposition.py, as the node)",
    )
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache-threshold",
        default="0",
        help="step caching: 0 = exact (default), `fast` = the documented speed setting, or a number (higher = fewer "
        "full transformer evaluations, see the README's 'Step caching')",
    )


METHODS = ("outpaint_and_remove", "fill_then_extract")
FILL_THEN_EXTRACT_SHORT_SIDE = 512  # BFS extraction's processing size (the release rule), as Extract Foreground
# Inputs of one method only: given with the other, they are refused rather than silently ignored.
OUTPAINT_ONLY = ("weights", "edge", "segmentation", "depth", "depth_model", "segmentation_model", "no_edges")
FILL_THEN_EXTRACT_ONLY = ("bfs", "fill_prompt", "dilation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bfs_core.pipelines.decomposition import FILL_DILATION

    add_model_arguments(parser)
    parser.add_argument(
        "--method",
        default="outpaint_and_remove",
        choices=METHODS,
        help="outpaint_and_remove: the decomposition model (--weights); fill_then_extract: FLUX.1-Fill-dev removes "
        "the object, BFS extraction pulls it out (--bfs; weights you can download today)",
    )
    parser.add_argument(
        "--bfs", help="fill_then_extract: BFS weights (official trained_weights.pt or our .safetensors)"
    )
    parser.add_argument(
        "--fill-prompt",
        default=None,
        help="fill_then_extract: what the Fill step paints where the object was (default: empty; a description of the "
        "background also works). --prompt is the extraction's (the object)",
    )
    parser.add_argument(
        "--dilation",
        type=int,
        default=None,
        help=f"fill_then_extract: pixels the mask grows by before the Fill (default {FILL_DILATION}); the background "
        "keeps the image's own pixels outside the grown mask. Grow it over the shadow to remove the shadow too",
    )
    parser.add_argument("--image", required=True, help="the photo to decompose")
    parser.add_argument("--mask", required=True, help="mask image, white = the object")
    parser.add_argument("--edge", help="edge map image (default: Canny of the image)")
    parser.add_argument("--segmentation", help="segmentation map image")
    parser.add_argument("--depth", help="depth map image")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layered-format", default="ora", choices=["ora", "psd"])


def _check_paths(args, names) -> None:
    for name in names:
        check_weights(getattr(args, name.replace("-", "_"), None), f"--{name}")


def resolved_short_side(args) -> int:
    from bfs_core.models.layer_decomposition import DEFAULT_SHORT_SIDE

    if args.short_side is not None:
        return args.short_side
    return FILL_THEN_EXTRACT_SHORT_SIDE if getattr(args, "method", None) == "fill_then_extract" else DEFAULT_SHORT_SIDE


def check_method_inputs(args) -> None:
    """Each method's required inputs are there, and nothing of the other method was given (it would be ignored)."""
    from bfs_core.errors import UserInputError

    other = FILL_THEN_EXTRACT_ONLY if args.method == "outpaint_and_remove" else OUTPAINT_ONLY
    given = [name for name in other if getattr(args, name) not in (None, False)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        owner = "fill_then_extract" if args.method == "outpaint_and_remove" else "outpaint_and_remove"
        raise UserInputError(
            f"{flags} belong(s) to --method {owner} but the method is {args.method}: drop {flags}, or pass "
            f"--method {owner}."
        )
    needed = ["weights", "rgba_vae"] if args.method == "outpaint_and_remove" else ["bfs", "rgba_vae"]
    missing = ["--" + name.replace("_", "-") for name in needed if not getattr(args, name)]
    if missing:
        what = "Outpaint-and-Remove weights" if args.method == "outpaint_and_remove" else "BFS weights"
        raise UserInputError(
            f"--method {args.method} needs {' and '.join(missing)} ({what} and an RGBA VAE to decode the foreground)."
        )
    if args.method == "fill_then_extract" and args.dilation is not None and args.dilation < 0:
        raise UserInputError(f"`--dilation` must be a whole number of pixels >= 0 but got {args.dilation}.")


def load_fill_then_extract(args):
    """(FillThenExtractPipeline, text encoders) from local files only: Flux-Fill + BFS, the Flux VAE, an RGBA VAE."""
    from bfs_core.errors import UserInputError
    from bfs_core.models.rgba_vae import load_rgba_decoder
    from bfs_core.pipelines.decomposition import FillThenExtractPipeline
    from bfs_core.pipelines.loading import load_pipeline, parse_dtype

    _check_paths(args, ["base", "bfs", "vae", "rgba-vae", "text-encoders"])
    base = Path(args.base)
    if not args.text_encoders and not (base / "text_encoder_2").is_dir():
        raise UserInputError(
            f"No text encoders given and `--base` {str(base)!r} has none: pass --text-encoders (T5-XXL + CLIP-L "
            "folder)."
        )
    dtype = parse_dtype(args.dtype)
    names = {"base": "--base", "bfs": "--bfs", "vae": "--vae", "text_encoders": "--text-encoders"}
    bfs = load_pipeline(
        args.base,
        args.bfs,
        vae=args.vae,
        text_encoders=args.text_encoders,
        dtype=dtype,
        device=args.device,
        input_names=names,
    )
    decoder = load_rgba_decoder(
        args.rgba_vae, device=args.device, dtype=dtype, flux_vae=bfs.codec.vae, name="--rgba-vae"
    )
    return FillThenExtractPipeline(bfs.model, bfs.codec, decoder, bfs.scheduler_config), bfs.text_encoders


def load_components(args, baseline: bool = False):
    """(model, codec, rgba_decoder, text encoders, scheduler config) from local files only."""
    from bfs_core.errors import UserInputError
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
    from bfs_core.models.layer_decomposition import FluxFillBaseline, load_decomposition_model
    from bfs_core.models.rgba_vae import load_rgba_decoder
    from bfs_core.pipelines.codec import DiffusersFluxVAE
    from bfs_core.pipelines.loading import load_flux_vae, parse_dtype

    _check_paths(args, ["base", "weights", "vae", "rgba-vae", "text-encoders", "depth-model", "segmentation-model"])
    dtype, base = parse_dtype(args.dtype), Path(args.base)
    vae_path = args.vae or (base / "vae" if (base / "vae").is_dir() else None)
    if vae_path is None:
        raise UserInputError(
            f"No Flux VAE given and `--base` {str(base)!r} has no `vae/` folder: pass --vae (the FLUX.1 VAE folder)."
        )
    encoders_root = args.text_encoders or (base if (base / "text_encoder_2").is_dir() else None)
    if encoders_root is None:
        raise UserInputError(
            f"No text encoders given and `--base` {str(base)!r} has none: pass --text-encoders (T5-XXL + CLIP-L "
            "folder)."
        )
    if not baseline and (not args.weights or not args.rgba_vae):
        raise UserInputError("`--weights` and `--rgba-vae` are required to decompose (foreground and background).")
    vae = load_flux_vae(vae_path, dtype=dtype, device=args.device, name="--vae")
    decoder = None
    if not baseline:  # the small RGBA VAE first: a wrong file fails before the big transformer loads
        decoder = load_rgba_decoder(args.rgba_vae, device=args.device, dtype=dtype, flux_vae=vae, name="--rgba-vae")
    if baseline:
        transformer = load_flux_fill_transformer(base, torch_dtype=dtype, device=args.device, name="--base")
        model = FluxFillBaseline(transformer)
    else:
        model = load_decomposition_model(
            base, args.weights, torch_dtype=dtype, device=args.device, names=("--base", "--weights")
        )
    from bfs_core.text_encoders import FluxTextEncoders

    encoders = FluxTextEncoders.from_pretrained(
        encoders_root, torch_dtype=dtype, device=args.device, name="--text-encoders"
    )
    scheduler = load_shipped_config("flux_fill_scheduler")
    if (base / "scheduler" / "scheduler_config.json").is_file():
        scheduler = {**scheduler, **json.loads((base / "scheduler" / "scheduler_config.json").read_text())}
    return model, DiffusersFluxVAE(vae), decoder, encoders, scheduler


def estimated_maps(args, image: torch.Tensor, given: dict) -> dict:
    from bfs_core.conditioning import estimate_depth, estimate_segmentation

    maps = dict(given)  # the estimators run on --device; their maps come back beside the image
    if maps.get("depth") is None and args.depth_model:
        maps["depth"] = estimate_depth(image, args.depth_model, device=args.device).to(image.device)
    if maps.get("segmentation") is None and args.segmentation_model:
        segmentation = estimate_segmentation(image, args.segmentation_model, device=args.device)
        maps["segmentation"] = segmentation.to(image.device)
    return maps


def run(args) -> int:
    from bfs_core.decomposition_eval import load_image, save_image
    from bfs_core.errors import UserInputError
    from bfs_core.layered_files import write_layered_file
    from bfs_core.pipelines.decomposition import DecompositionPipeline

    sizes = {
        flag: check_image(getattr(args, flag), f"--{flag}")
        for flag in ("image", "mask", "edge", "segmentation", "depth")
        if getattr(args, flag)
    }
    for flag, size in sizes.items():
        if size != sizes["image"]:
            raise UserInputError(
                f"`--{flag}` {getattr(args, flag)!r} is {size[0]}×{size[1]} but the image is {sizes['image'][0]}×"
                f"{sizes['image'][1]}: make it on this image (same size)."
            )
    out = check_output_dir(args.out, "--out")
    image = load_image(Path(args.image), "RGB")
    mask = load_image(Path(args.mask), "L")
    given = {
        k: load_image(Path(getattr(args, k)), "RGB") if getattr(args, k) else None
        for k in ("edge", "segmentation", "depth")
    }
    # Checked before any model loads.
    cache_threshold = parse_cache_threshold(args.cache_threshold, "--cache-threshold")
    check_method_inputs(args)
    common = dict(
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        short_side=resolved_short_side(args),
        callback=lambda i, total, _: print(f"step {i + 1}/{total}", end="\r", flush=True),
        cache_threshold=cache_threshold,
    )
    if args.method == "fill_then_extract":
        pipe, encoders = load_fill_then_extract(args)
        embeds, pooled = encoders.encode([args.prompt])
        fill_embeds, fill_pooled = encoders.encode([args.fill_prompt or ""])
        result = pipe.decompose(
            image,
            mask,
            embeds,
            pooled,
            fill_prompt_embeds=fill_embeds,
            fill_pooled=fill_pooled,
            **({} if args.dilation is None else {"dilation": args.dilation}),
            **common,
        )
    else:
        model, codec, decoder, encoders, scheduler = load_components(args)
        maps = estimated_maps(args, image, given)
        embeds, pooled = encoders.encode([args.prompt])
        result = DecompositionPipeline(model, codec, decoder, scheduler).decompose(
            image, mask, embeds, pooled, **maps, compute_edges=not args.no_edges, **common
        )
    print()
    with output_folder(out):
        written = {
            "foreground": save_image(result.foreground, out / "foreground.png"),
            "background": save_image(result.background, out / "background.png"),
        }
        written["layered"] = write_layered_file(
            out / f"layers.{args.layered_format}", result.background, [("Foreground", result.foreground)]
        )
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
