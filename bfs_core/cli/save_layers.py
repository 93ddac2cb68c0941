"""``python -m bfs_core save-layers BG.png LAYER1.png [LAYER2.png ...] --out scene.psd|scene.ora``."""

import argparse
import pathlib

from PIL import Image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("background", type=pathlib.Path, help="background image (bottom layer)")
    parser.add_argument("layers", nargs="+", type=pathlib.Path, help="RGBA layers, bottom to top; named by file stem")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="scene.psd or scene.ora")


def run(args: argparse.Namespace) -> int:
    from bfs_core.layered_files import write_layered_file

    for path in [args.background, *args.layers]:
        if not path.is_file():
            raise ValueError(f"Input image {str(path)!r} does not exist.")
    background = Image.open(args.background)
    layers = [(path.stem, Image.open(path)) for path in args.layers]
    print(write_layered_file(args.out, background, layers))
    return 0
