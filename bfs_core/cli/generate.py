"""`python -m bfs_core generate`: BG2FG on one background, headless."""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..sampling.step_cache import parse_cache_threshold
from .checks import check_output_dir, check_weights, load_image, output_folder, parse_box


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="FLUX.1-Fill-dev: diffusers folder, .safetensors or .gguf")
    parser.add_argument("--bfs", required=True, help="BFS weights: official trained_weights.pt or our .safetensors")
    parser.add_argument("--vae", help="Flux VAE folder (default: <base>/vae)")
    parser.add_argument("--text-encoders", help="folder with text_encoder(_2)/ and tokenizer(_2)/ (default: <base>)")
    parser.add_argument("--rgba-vae", help="RGBA VAE (file or folder) to also write foreground.png")
    parser.add_argument("--background", required=True, help="background image")
    region = parser.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", help="region as x0,y0,x1,y1 in pixels (x1, y1 exclusive)")
    region.add_argument("--mask", help="region mask image (white = region); its bounding box is used")
    parser.add_argument("--exact-mask", action="store_true", help="use the mask's shape instead of its bounding box")
    parser.add_argument("--prompt", required=True, help="what the foreground is, e.g. 'a red ceramic vase'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=30.0)
    parser.add_argument("--short-side", type=int, default=512, help="processing short side (0 = keep size)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--offload",
        default="none",
        choices=["none", "model", "block"],
        help="keep the transformer's weights on the CPU: model = moved in whole for sampling, block = one block at "
        "a time (least memory, slowest; see the README's GGUF and offloading section)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache-threshold",
        default="0",
        help="step caching: 0 = exact (default), `fast` = the documented speed setting, or a number (higher = fewer "
        "full transformer evaluations, see the README's 'Step caching')",
    )


def _save_image(tensor: torch.Tensor, path: Path) -> Path:
    array = (tensor[0].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp)
    return path


def region_mask(args, height: int, width: int) -> torch.Tensor:
    from bfs_core.errors import UserInputError
    from bfs_core.layer_math import box_from_mask, mask_from_box

    if args.box:
        return mask_from_box(parse_box(args.box, width, height), height, width)[None, None]
    mask = load_image(args.mask, "--mask", "L")
    if mask.shape[-2:] != (height, width):
        raise UserInputError(
            f"`--mask` {args.mask!r} is {mask.shape[-1]}×{mask.shape[-2]} but the background is {width}×{height}: "
            "draw the mask on the background (same size)."
        )
    mask = (mask >= 0.5).float()
    if not mask.any():
        raise UserInputError(f"`--mask` {args.mask!r} has no white pixel: paint the region white, or pass --box.")
    if args.exact_mask:
        return mask
    return mask_from_box(box_from_mask(mask[0, 0]), height, width)[None, None]


INPUT_NAMES = {
    "base": "--base",
    "bfs": "--bfs",
    "vae": "--vae",
    "text_encoders": "--text-encoders",
    "offload": "--offload",
}


def run(args) -> int:
    from bfs_core.latent_files import save_comfy_latent
    from bfs_core.models.rgba_vae import save_latent_file
    from bfs_core.pipelines.loading import load_pipeline, parse_dtype

    # Everything the user typed is checked before any model is loaded; --out is created only to write results.
    for flag in ("base", "bfs", "vae", "text-encoders", "rgba-vae"):
        check_weights(getattr(args, flag.replace("-", "_")), f"--{flag}")
    out = check_output_dir(args.out, "--out")
    background = load_image(args.background, "--background", "RGB")
    mask = region_mask(args, *background.shape[-2:])
    dtype = parse_dtype(args.dtype)
    cache_threshold = parse_cache_threshold(args.cache_threshold, "--cache-threshold")
    pipe = load_pipeline(
        args.base,
        args.bfs,
        vae=args.vae,
        text_encoders=args.text_encoders,
        dtype=dtype,
        device=args.device,
        input_names=INPUT_NAMES,
        offload=args.offload,
    )
    decoder = None
    if args.rgba_vae:  # loaded before sampling, so a wrong file fails before the minutes of computing
        from bfs_core.models.rgba_vae import load_rgba_decoder

        decoder = load_rgba_decoder(
            args.rgba_vae, device=args.device, dtype=dtype, flux_vae=pipe.codec.vae, name="--rgba-vae"
        )
    prompt_embeds, pooled = pipe.encode_prompt([args.prompt])
    result = pipe.generate(
        background,
        mask,
        prompt_embeds,
        pooled,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        short_side=args.short_side,
        callback=lambda i, total, _: print(f"step {i + 1}/{total}", end="\r", flush=True),
        cache_threshold=cache_threshold,
    )
    print()
    from bfs_core.offload import offload_now

    offload_now(pipe.model.transformer)  # model offload: the device is free for the RGBA decode
    if result.full_evaluations < result.transformer_calls:
        print(f"step cache: {result.full_evaluations} of {result.transformer_calls} steps ran the whole transformer")
    rgba = None
    if decoder is not None:
        from bfs_core.layer_math import resize_rgba

        rgb = pipe.decode_latents(result.fg_latent)  # only the LayerDiffuse format uses it
        width, height = result.original_size
        rgba = resize_rgba(decoder.decode(result.fg_latent, rgb=rgb), (height, width))
    with output_folder(out):
        written = {
            "fg_latent": save_latent_file(out / "fg_latent.safetensors", result.fg_latent),
            "comp_latent": save_latent_file(out / "comp_latent.safetensors", result.comp_latent),
            # the same latents as ComfyUI's Save Latent writes them: Load Latent reads them (copy to ComfyUI/input)
            "fg_latent_comfyui": save_comfy_latent(out / "fg_latent.latent", result.fg_latent),
            "comp_latent_comfyui": save_comfy_latent(out / "comp_latent.latent", result.comp_latent),
            "composite": _save_image(result.composite, out / "composite.png"),
            "mask": _save_image(mask, out / "mask.png"),
        }
        if rgba is not None:
            written["foreground"] = _save_image(rgba, out / "foreground.png")
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
