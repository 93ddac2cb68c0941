"""`python -m bfs_core convert IN OUT`: the official BFS `trained_weights.pt` -> our safetensors format."""

import argparse

from .checks import check_exists, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="official trained_weights.pt (or its folder)")
    parser.add_argument("output", help="output .safetensors")


def run(args) -> int:
    from bfs_core.models.bfs_checkpoint import checkpoint_summary, convert_official_to_safetensors

    check_exists(args.input, "input", "the official trained_weights.pt or its folder")
    check_output_file(args.output, "output", (".safetensors",))
    ckpt = convert_official_to_safetensors(args.input, args.output)
    print(checkpoint_summary(ckpt))
    if ckpt.unplaced:
        print(
            f"warning: {sum(map(len, ckpt.unplaced.values()))} keys could not be placed and were not written: "
            f"{ {k: v[:3] for k, v in ckpt.unplaced.items()} }"
        )
    print(f"written: {args.output}")
    return 0
