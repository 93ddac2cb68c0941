"""``python -m training <command> --config FILE [--key=value ...]`` (commands: see COMMANDS below).

Each command module exposes a `TrainConfig` (or `SynthConfig`) dataclass and `main(cfg)`; the result's path is
printed last. Under several processes use `accelerate launch --config_file training/accelerate/<x>.yaml -m training`.
The command names are a public interface: keep them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import load_config, parse_overrides


COMMANDS = {
    "phi": ("training.train_phi", "TrainConfig", "train Φ, the latent composition network (eq. 16, Tab. A3)"),
    "stage1": ("training.train_stage1", "TrainConfig", "BFS stage 1: L_flow + 0.1 L_comp on synthetic triplets"),
    "stage2": ("training.train_stage2", "TrainConfig", "BFS stage 2: alternate L_real and L_reg + 0.1 L_comp"),
    "decompose": ("training.train_decompose", "TrainConfig", "Outpaint-and-Remove: flow loss on both layers"),
    "decompose-data": ("training.decomposition_data", "DataConfig", "decomposition training set (1–3 layers)"),
    "toy-vae": ("training.train_toy_autoencoders", "TrainConfig", "toy world: the RGB and RGBA autoencoders"),
    "base-fill": ("training.train_base_fill", "TrainConfig", "pretrain a Flux-Fill base from scratch (toy world)"),
    "toy-reference": ("training.train_toy_reference", "TrainConfig", "toy world: the reference (Redux) encoder"),
    "synth-data": ("training.synth_data", "SynthConfig", "build synthetic triplets from object-removal pairs (A.3)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--config", default=None, help="YAML file (training/configs/*.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module_name, config_name, _ = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    try:
        cfg = load_config(getattr(module, config_name), args.config, parse_overrides(rest))
        result = module.main(cfg)
    except (ValueError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.command}: checkpoint written to {result.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
