"""A short CPU run on tiny models that shows the trainers lower their losses (not a timed test).

    python scripts/train_tiny_demo.py [--steps 80] [--out /tmp/bfs_tiny_demo]

Builds tiny random models and small datasets from tests/assets (real stamps over real photos), then trains Φ,
BFS stage 1 (with that Φ) and stage 2 for `--steps` steps each and prints the mean loss over the first and the last
ten steps, with the step numbers. Stage 2 alternates two different losses, so each phase is reported separately.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfs_core.tiny import TINY_BFS, TINY_PHI, write_tiny_models  # noqa: E402
from training import train_phi, train_stage1, train_stage2  # noqa: E402
from training.config import load_config  # noqa: E402
from training.tiny import write_layer_datasets  # noqa: E402


def report(name: str, losses: list[float], first_step: int, stride: int = 1, window: int = 10) -> None:
    steps = [first_step + i * stride for i in range(len(losses))]
    head, tail = losses[:window], losses[-window:]
    print(
        f"{name}: mean loss over steps {steps[0]}..{steps[len(head) - 1]}: {statistics.mean(head):.4f}  ->  "
        f"over steps {steps[-len(tail)]}..{steps[-1]}: {statistics.mean(tail):.4f}  ({len(losses)} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default="/tmp/bfs_tiny_demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    models = write_tiny_models(out / "models")
    data = write_layer_datasets(Path(__file__).resolve().parents[1] / "tests" / "assets", out / "data", count=8)
    fast = dict(
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=4,
        max_steps=args.steps,
        checkpointing_steps=args.steps,
        validation_steps=args.steps,
        validation_inference_steps=4,
        num_workers=0,
        report_to="none",
        resolution=64,
        optimizer="adamw",
        lr_scheduler="constant",
    )

    phi_cfg = dict(fast, output_dir=str(out / "phi"), data_dir=str(data["phi"]), phi_overrides=TINY_PHI)
    phi_cfg.update(vae=str(models["flux_fill"] / "vae"), rgba_vae=str(models["rgba_vae"]), learning_rate=1e-3)
    phi = train_phi.main(load_config(train_phi.TrainConfig, None, phi_cfg))

    bfs = dict(
        fast,
        flux_fill=str(models["flux_fill"]),
        rgba_vae=str(models["rgba_vae"]),
        phi=str(phi.weights),
        bfs_overrides=TINY_BFS,
        max_sequence_length=8,
        learning_rate=3e-3,
        text_cache_dir=str(out / "text_cache"),
    )
    s1_cfg = dict(bfs, output_dir=str(out / "stage1"), data_dir=str(data["triplets"]))
    s1 = train_stage1.main(load_config(train_stage1.TrainConfig, None, s1_cfg))
    s2_cfg = dict(
        bfs, output_dir=str(out / "stage2"), pairs_dir=str(data["pairs"]), triplets_dir=str(data["triplets"])
    )
    s2 = train_stage2.main(load_config(train_stage2.TrainConfig, None, dict(s2_cfg, init_bfs=str(s1.weights))))

    print()
    report("phi    (eq. 16)", phi.losses, phi.first_step)
    report("stage1 (L_flow + 0.1 L_comp)", s1.losses, s1.first_step)
    report("stage2 L_real (odd steps)", s2.losses[0::2], s2.first_step, stride=2)
    report("stage2 L_reg + 0.1 L_comp (even steps)", s2.losses[1::2], s2.first_step + 1, stride=2)
    print(f"weights: {phi.weights}, {s1.weights}, {s2.weights}; sample grids and loss_curve.png under {out}")


if __name__ == "__main__":
    main()
