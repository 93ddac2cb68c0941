"""`python -m bfs_core decompose`: image + mask -> foreground.png (RGBA), background.png and a layered file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


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
    parser.add_argument("--short-side", type=int, default=512, help="processing short side (0 = keep size)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="the photo to decompose")
    parser.add_argument("--mask", required=True, help="mask image, white = the object")
    parser.add_argument("--edge", help="edge map image (default: Canny of the image)")
    parser.add_argument("--segmentation", help="segmentation map image")
    parser.add_argument("--depth", help="depth map image")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layered-format", default="ora", choices=["ora", "psd"])


def _check_paths(args, names) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"), None)
        if value is not None and not Path(value).exists():
            raise ValueError(f"`--{name}` path {value!r} does not exist; pass a local file or folder.")


def load_components(args, baseline: bool = False):
    """(model, codec, rgba_decoder, text encoders, scheduler config) from local files only."""
    from diffusers import AutoencoderKL

    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
    from bfs_core.models.layer_decomposition import FluxFillBaseline, load_decomposition_model
    from bfs_core.models.rgba_vae import load_rgba_decoder
    from bfs_core.pipeline import DiffusersFluxVAE, parse_dtype

    _check_paths(args, ["base", "weights", "vae", "rgba-vae", "text-encoders", "depth-model", "segmentation-model"])
    dtype, base = parse_dtype(args.dtype), Path(args.base)
    vae_path = args.vae or (base / "vae" if (base / "vae").is_dir() else None)
    if vae_path is None:
        raise ValueError(f"No Flux VAE given and {base} has no `vae/` folder: pass --vae (the FLUX.1 VAE folder).")
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype, local_files_only=True).to(args.device)
    if baseline:
        decoder = None
        model = FluxFillBaseline(load_flux_fill_transformer(base, torch_dtype=dtype, device=args.device))
    else:
        if not args.weights or not args.rgba_vae:
            raise ValueError("`--weights` and `--rgba-vae` are required to decompose (foreground and background).")
        model = load_decomposition_model(base, args.weights, torch_dtype=dtype, device=args.device)
        decoder = load_rgba_decoder(args.rgba_vae, device=args.device, flux_vae=vae)
    encoders_root = args.text_encoders or (base if (base / "text_encoder_2").is_dir() else None)
    if encoders_root is None:
        raise ValueError(f"No text encoders given and {base} has none: pass --text-encoders (T5-XXL + CLIP-L folder).")
    from bfs_core.text_encoders import FluxTextEncoders

    encoders = FluxTextEncoders.from_pretrained(encoders_root, torch_dtype=dtype, device=args.device)
    scheduler = load_shipped_config("flux_fill_scheduler")
    if (base / "scheduler" / "scheduler_config.json").is_file():
        scheduler = {**scheduler, **json.loads((base / "scheduler" / "scheduler_config.json").read_text())}
    return model, DiffusersFluxVAE(vae), decoder, encoders, scheduler


def estimated_maps(args, image: torch.Tensor, given: dict) -> dict:
    from bfs_core.models.layer_decomposition import estimate_depth, estimate_segmentation

    maps = dict(given)
    if maps.get("depth") is None and args.depth_model:
        maps["depth"] = estimate_depth(image, args.depth_model)
    if maps.get("segmentation") is None and args.segmentation_model:
        maps["segmentation"] = estimate_segmentation(image, args.segmentation_model)
    return maps


def run(args) -> int:
    from bfs_core.decomposition_eval import load_image, save_image
    from bfs_core.layered_files import write_layered_file
    from bfs_core.models.layer_decomposition import DecompositionPipeline

    _check_paths(args, ["image", "mask", "edge", "segmentation", "depth"])
    image = load_image(Path(args.image), "RGB")
    mask = load_image(Path(args.mask), "L")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"--mask is {mask.shape[-1]}×{mask.shape[-2]} but the image is {image.shape[-1]}×"
                         f"{image.shape[-2]}; draw the mask on this image.")  # fmt: skip
    given = {k: load_image(Path(getattr(args, k)), "RGB") if getattr(args, k) else None
             for k in ("edge", "segmentation", "depth")}  # fmt: skip
    model, codec, decoder, encoders, scheduler = load_components(args)
    maps = estimated_maps(args, image, given)
    embeds, pooled = encoders.encode([args.prompt])
    result = DecompositionPipeline(model, codec, decoder, scheduler).decompose(
        image, mask, embeds, pooled, **maps, compute_edges=not args.no_edges, seed=args.seed, steps=args.steps,
        guidance=args.guidance, short_side=args.short_side,
        callback=lambda i, total, _: print(f"step {i + 1}/{total}", end="\r", flush=True),
    )  # fmt: skip
    print()
    out = Path(args.out)
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
