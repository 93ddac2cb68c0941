"""``python -m bfs_core rgba-decode``: decode a foreground latent file (the pack's `.safetensors` or ComfyUI's
`.latent` from Save Latent) to a straight-alpha RGBA PNG."""

import argparse
import logging
import pathlib

import torch
from PIL import Image

from ..atomic import atomic_path
from .checks import check_output_file, check_weights, load_image


logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae", required=True, type=pathlib.Path, help="RGBA VAE: diffusers folder, .safetensors or .pth"
    )
    parser.add_argument(
        "--latent",
        required=True,
        type=pathlib.Path,
        help="fg_latent.safetensors (tensor `latent`, as generate writes) or a ComfyUI Save Latent .latent file",
    )
    parser.add_argument("--rgb", type=pathlib.Path, help="Flux-VAE RGB decode of the latent (LayerDiffuse format)")
    parser.add_argument("--flux-vae", type=pathlib.Path, help="FLUX.1 VAE diffusers folder, to decode the RGB itself")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output PNG (index added for batch > 1)")
    parser.add_argument("--no-tta", action="store_true", help="LayerDiffuse: one pass instead of the 8-way median")
    parser.add_argument("--sub-batch-size", type=int, default=1, help="images decoded at once")
    parser.add_argument("--scaling-factor", type=float, help="single-file release VAE: its scaling_factor")
    parser.add_argument("--shift-factor", type=float, help="single-file release VAE: its shift_factor")
    parser.add_argument("--norm-num-groups", type=int, help="single-file release VAE: its GroupNorm groups")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="decoder weights, compute")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")


def load_rgb(path: pathlib.Path, batch: int) -> torch.Tensor:
    return load_image(path, "--rgb", "RGB").expand(batch, -1, -1, -1)  # [1, 3, H, W] -> [B, 3, H, W]


def run(args: argparse.Namespace) -> int:
    from bfs_core.errors import UserInputError
    from bfs_core.latent_files import read_latent
    from bfs_core.models.rgba_vae import load_rgba_decoder
    from bfs_core.pipelines.loading import load_flux_vae, parse_dtype

    check_weights(args.vae, "--vae")
    check_weights(args.flux_vae, "--flux-vae")
    check_output_file(args.out, "--out", (".png",))
    latent = read_latent(args.latent, name="--latent")
    rgb = None
    if args.rgb is not None:
        rgb = load_rgb(args.rgb, latent.shape[0])
        if rgb.shape[-2:] != (latent.shape[-2] * 8, latent.shape[-1] * 8):
            raise UserInputError(
                f"`--rgb` {str(args.rgb)!r} is {rgb.shape[-1]}×{rgb.shape[-2]} but the latent decodes to "
                f"{latent.shape[-1] * 8}×{latent.shape[-2] * 8}: pass the Flux-VAE decode of this latent."
            )
    overrides = {
        "scaling_factor": args.scaling_factor,
        "shift_factor": args.shift_factor,
        "norm_num_groups": args.norm_num_groups,
    }
    dtype = parse_dtype(args.dtype)
    flux_vae = None
    if args.flux_vae is not None:
        flux_vae = load_flux_vae(args.flux_vae, dtype=torch.float32, name="--flux-vae")
    decoder = load_rgba_decoder(
        args.vae, device=args.device, dtype=dtype, flux_vae=flux_vae, config_overrides=overrides, name="--vae"
    )
    if decoder.needs_rgb and rgb is None and flux_vae is None:
        raise UserInputError(
            f"`--vae` {str(args.vae)!r} is a LayerDiffuse TransparentVAE, which needs the Flux RGB decode: pass --rgb "
            "RGB.png or --flux-vae FLUX_VAE_DIR."
        )
    rgba = decoder.decode(latent, rgb, tta=not args.no_tta, sub_batch_size=args.sub_batch_size)
    images = (rgba.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # -> [B, H, W, 4]
    args.out.parent.mkdir(parents=True, exist_ok=True)  # checked writable above
    for i, array in enumerate(images):
        out = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}_{i:02d}{args.out.suffix}")
        with atomic_path(out) as tmp:
            Image.fromarray(array, "RGBA").save(tmp)
        print(out)
    return 0
