"""``python -m bfs_core save-layers BG.png LAYER1.png [LAYER2.png ...] --out scene.psd|scene.ora``."""

import argparse
import pathlib

from PIL import Image

from ..errors import UserInputError
from .checks import check_image, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("background", type=pathlib.Path, help="background image (bottom layer)")
    parser.add_argument("layers", nargs="+", type=pathlib.Path, help="RGBA layers, bottom to top; named by file stem")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="scene.psd or scene.ora")


def run(args: argparse.Namespace) -> int:
    from bfs_core.layered_files import write_layered_file

    check_output_file(args.out, "--out", (".psd", ".ora"))
    sizes = {
        path: check_image(path, "background" if i == 0 else "layers")
        for i, path in enumerate([args.background, *args.layers])
    }
    for path, size in sizes.items():
        if size != sizes[args.background]:
            raise UserInputError(
                f"`layers` image {str(path)!r} is {size[0]}x{size[1]} but the background is "
                f"{sizes[args.background][0]}x{sizes[args.background][1]}: save every layer at the background's size "
                "(resize it, or paste a crop onto a transparent canvas of that size)."
            )
    background = Image.open(args.background)
    layers = [(path.stem, Image.open(path)) for path in args.layers]
    print(write_layered_file(args.out, background, layers))
    return 0
