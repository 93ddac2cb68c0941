"""``python -m bfs_core <command>``: the headless command line.

Each command lives in ``bfs_core/cli/<module>.py`` and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
The command names are a public interface (other tooling drives them): keep them.
"""

import argparse
import importlib
import logging
import sys


COMMANDS = {
    "generate": ("bfs_core.cli.generate", "BG2FG: background + box/mask + prompt -> foreground latent and composite"),
    "make-tiny": ("bfs_core.cli.make_tiny", "write a tiny random model set in every on-disk format the pack reads"),
    "convert": ("bfs_core.cli.convert", "official BFS trained_weights.pt -> our safetensors format"),
    "bench": ("bfs_core.cli.bench", "time one dual-branch step against one plain Flux-Fill step"),
    "rgba-decode": ("bfs_core.cli.rgba_decode", "decode a foreground latent to a straight-alpha RGBA PNG"),
    "save-layers": ("bfs_core.cli.save_layers", "write background + RGBA layers as a PSD or OpenRaster file"),
    "convert-rgba-vae": ("bfs_core.cli.convert_rgba_vae", "LayerDiffuse TransparentVAE.pth -> safetensors"),
    "demo": ("bfs_core.cli.demo", "the embedded toy model end to end: layers, chaining, PSD/ORA, contact sheet"),
    "evaluate-toy": ("bfs_core.cli.evaluate_toy", "score the toy model and its ablations on held-out toy scenes"),
    "decompose": ("bfs_core.cli.decompose", "Outpaint-and-Remove: image + mask -> RGBA foreground + clean background"),
    "evaluate-decomposition": ("bfs_core.cli.evaluate_decomposition", "score decomposition on a case set"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bfs_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a command whose module is not in this checkout yet
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except ValueError as err:  # bad input: the message says what and how to fix it; no traceback for users
        logging.getLogger("bfs_core").debug("details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
