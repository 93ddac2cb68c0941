"""``python -m bfs_core convert-rgba-vae TransparentVAE.pth --out TransparentVAE.safetensors``."""

import argparse
import pathlib

import torch

from .checks import check_exists, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=pathlib.Path, help="LayerDiffuse-Flux TransparentVAE.pth")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output .safetensors")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep", help="stored dtype")


def run(args: argparse.Namespace) -> int:
    from bfs_core.models.transparent_vae import convert_transparent_vae_to_safetensors

    check_exists(args.src, "src", "LayerDiffuse's TransparentVAE.pth")
    check_output_file(args.out, "--out", (".safetensors",))
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(convert_transparent_vae_to_safetensors(args.src, args.out, dtype=dtype))
    return 0
