"""``python -m bfs_core <command>``: the headless command line.

Each command lives in ``bfs_core/cli/<module>.py`` and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
The command names are a public interface (other tooling drives them): keep them.
"""

import argparse
import importlib
import logging
import sys
import traceback
from pathlib import Path


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
    "evaluate-toy-decomposition": (
        "bfs_core.cli.evaluate_toy_decomposition",
        "score the toy decomposition model against toy Fill inpainting and chance on held-out toy scenes",
    ),
    "decompose": (
        "bfs_core.cli.decompose",
        "image + mask -> RGBA foreground + clean background (Outpaint-and-Remove, or Fill removal + BFS extraction)",
    ),
    "evaluate-decomposition": ("bfs_core.cli.evaluate_decomposition", "score decomposition on a case set"),
}


_PACKAGE = Path(__file__).resolve().parent


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def is_user_error(err: BaseException) -> bool:
    """Bad input, not a bug: a `UserInputError`; a `ValueError` raised by the pack's own checks (the innermost frame
    is in bfs_core); an OS error about a named file (missing, not writable, disk full)."""
    from bfs_core.errors import UserInputError

    if isinstance(err, UserInputError):
        return True
    if isinstance(err, OSError) and err.filename is not None:
        return True
    if isinstance(err, ValueError) and err.__traceback__ is not None:
        innermost = traceback.extract_tb(err.__traceback__)[-1].filename
        return Path(innermost).resolve().is_relative_to(_PACKAGE)
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 bad input (one line on stderr, saying how to fix it; `--debug` adds
    the traceback), 1 an internal error (full traceback: a bug to report), 130 interrupted."""
    parser = argparse.ArgumentParser(prog="python -m bfs_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
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
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            traceback.print_exc()
            print(f"internal error in `{args.command}` (a bug, please report it): {_one_line(err)}", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
