"""Reproduce the toy reference encoder (bfs_core/toy/weights/reference) with `training/`, on a CPU.

    python scripts/train_toy_reference.py [--work runs/toy_reference] [--no-ship] [--key=value ...]

Runs `python -m training toy-reference --config training/configs/toy_reference.yaml` against the shipped toy BFS
(frozen) and copies the result into bfs_core/toy/weights/reference. The shipped encoder came from this command in
one run on a shared 2-core machine with one torch thread (the config's `threads: 1`); `--key=value` overrides any
config field (e.g. `--max_steps=200` for a quick try). Another machine gives the same recipe with float rounding of
its own, so numbers match to noise, not bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bfs_core.toy.reference import REFERENCE_DIR, load_toy_reference  # noqa: E402
from training.config import load_config, parse_overrides  # noqa: E402
from training.train_toy_reference import TrainConfig, main  # noqa: E402


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "runs" / "toy_reference"), help="output folder of the run")
    parser.add_argument("--no-ship", action="store_true", help="leave bfs_core/toy/weights/reference alone")
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"output_dir": args.work, **parse_overrides(rest)}
    cfg = load_config(TrainConfig, REPO / "training" / "configs" / "toy_reference.yaml", overrides)
    result = main(cfg)
    if not args.no_ship:
        encoder = load_toy_reference(result.weights)  # proves the folder loads before it replaces the shipped one
        encoder.save(REFERENCE_DIR)
        print(f"shipped: {REFERENCE_DIR}")
    print(f"toy-reference: weights written to {result.weights}")


if __name__ == "__main__":
    run()
