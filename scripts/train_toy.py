"""Reproduce the embedded toy model (bfs_core/toy/weights) from nothing, with `training/`, on a CPU.

    python scripts/train_toy.py [--work runs/toy] [--ship] [--ablations] [--jobs 2] [--threads 1] [--scenes 4000]

The committed model came from `python scripts/train_toy.py --threads 2 --ship` in one run from an empty work folder:
38 min on a 2-core machine (world 1 min, autoencoders 11, base 12, Φ 1, stage 1 10, stage 2 3). Another thread
count or machine gives the same recipe with float rounding of its own, so numbers match to noise, not bit for bit.

Steps (each skipped when its result already exists in --work, so a killed run continues):
  1. the toy world: 4000 training scenes (real triplets, stage-1 triplets with generator shadows, pairs, Φ pairs)
     and 64 held-out scenes (another seed);
  2. `python -m training toy-vae`    RGB (16-channel, ×8) and RGBA autoencoders  (training/configs/toy_vae.yaml)
  3. the toy Flux-Fill root: VAE, scheduler config, tiny text encoders (frozen random)
  4. `python -m training base-fill`  the Fill base from scratch on composites    (training/configs/toy_base_fill.yaml)
  5. `python -m training phi`        Φ                                           (training/configs/toy_phi.yaml)
  6. `python -m training stage1`     BFS stage 1, paper preset at toy ranks      (training/configs/toy_stage1.yaml)
  7. `python -m training stage2`     BFS stage 2 from the stage-1 weights        (training/configs/toy_stage2.yaml)
`--ship` copies the result into bfs_core/toy/weights (the transformer in fp16). `--ablations` also trains the
variants of `bfs_core/toy/evaluate.py`'s ABLATIONS with the same budget, `--jobs` of them at a time (one process each).
Each process uses `--threads` torch threads (default 1).

The toy decomposition model (Outpaint-and-Remove, bfs_core/toy/decomposition.py):
    python scripts/train_toy.py --decomposition [--ship]        the main model (training/configs/toy_decompose.yaml)
    python scripts/train_toy.py --decomposition-ablations       w/o fusion, w/o fg context, w/o joint + the full
                                                                recipe, each at DECOMPOSITION_ABLATION_BUDGET; writes
                                                                bfs_core/toy/results/decomposition.{md,json}
They train on the toy Fill base of this --work folder when a full run made one (model/flux-fill), else on the shipped
one (bfs_core/toy/weights/flux-fill), with its RGBA VAE. Data: DECOMPOSITION_SCENES training scenes (seeds 0…).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bfs_core.atomic import atomic_path, atomic_write_text  # noqa: E402
from bfs_core.models.flux_fill_loading import load_shipped_config  # noqa: E402
from bfs_core.toy import world  # noqa: E402
from bfs_core.toy.models import TOY_BFS, TOY_PHI, WEIGHTS_DIR, write_toy_text_encoders  # noqa: E402
from training import train_base_fill, train_phi, train_stage1, train_stage2, train_toy_autoencoders  # noqa: E402
from training.config import load_config  # noqa: E402


CONFIGS = REPO / "training" / "configs"
logger = logging.getLogger("train_toy")

# Ablation variants: (stage-1 overrides or None to skip stage 1, stage-2 overrides or None to skip stage 2).
# The budget is the same for all: stage-1 steps + stage-2 steps of the full model, moved to the stage that remains.
ABLATIONS = {
    "full": ({}, {}),
    "no_comp_loss": ({"lambda_comp": 0.0}, {"lambda_comp": 0.0}),
    "no_stage1": (None, {"max_steps": "total"}),
    "no_stage2": ({"max_steps": "total"}, None),
    "no_joint": ({"train_joint": False}, {"train_joint": False}),
    "fg_only": ({"train_joint": False, "lambda_comp": 0.0}, {"train_joint": False, "lambda_comp": 0.0}),
}


# Decomposition: scenes, the ablation budget, and the variants (TrainConfig overrides of toy_decompose.yaml).
DECOMPOSITION_SCENES = 3000
DECOMPOSITION_ABLATION_BUDGET = {"max_steps": 400, "batch_size": 16}  # each variant (the main run: the yaml: 800)
DECOMPOSITION_ABLATIONS = {
    "full": {},
    "no_fusion": {"decomposition_overrides": {"modalities": []}, "edges": False, "maps_from_data": False},
    "no_fg_context": {"foreground_context": False},
    "no_joint": {"trainable_groups": ["lora_bg", "lora_fg", "input_proj", "fusion"]},
}


def timed(name: str, fn, *args):
    start = time.time()
    result = fn(*args)
    logger.info("%s done in %.1f s", name, time.time() - start)
    return result


def build_base(work: Path, scenes: int) -> dict[str, Path]:
    data = work / "data"
    if not (data / "real" / "manifest.jsonl").is_file():
        timed("toy world", world.write_datasets, data, scenes, 0)
    if not (work / "heldout" / "real" / "manifest.jsonl").is_file():
        world.write_datasets(work / "heldout", 64, 12345)
    vae_dir = work / "autoencoders"
    if not (vae_dir / "rgba_vae" / "config.json").is_file():
        cfg = load_config(
            train_toy_autoencoders.TrainConfig,
            CONFIGS / "toy_vae.yaml",
            {"data_dir": str(data / "real"), "output_dir": str(vae_dir)},
        )
        timed("toy-vae", train_toy_autoencoders.main, cfg)
    root = work / "model" / "flux-fill"
    if not (root / "tokenizer_2").is_dir():
        shutil.copytree(vae_dir / "vae", root / "vae", dirs_exist_ok=True)
        (root / "scheduler").mkdir(parents=True, exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(load_shipped_config("flux_fill_scheduler"), indent=2)
        )
        write_toy_text_encoders(root)
    rgba = work / "model" / "rgba_vae"
    if not (rgba / "config.json").is_file():
        shutil.copytree(vae_dir / "rgba_vae", rgba, dirs_exist_ok=True)
    if not (root / "transformer" / "config.json").is_file():
        cfg = load_config(
            train_base_fill.TrainConfig,
            CONFIGS / "toy_base_fill.yaml",
            {
                "data_dir": str(data / "real"),
                "vae": str(root / "vae"),
                "text_encoders": str(root),
                "output_dir": str(work / "base"),
            },
        )
        timed("base-fill", train_base_fill.main, cfg)
        shutil.copytree(work / "base" / "transformer", root / "transformer", dirs_exist_ok=True)
    phi = work / "model" / "phi"
    if not (phi / "config.json").is_file():
        cfg = load_config(
            train_phi.TrainConfig,
            CONFIGS / "toy_phi.yaml",
            {
                "data_dir": str(data / "phi"),
                "vae": str(root / "vae"),
                "rgba_vae": str(rgba),
                "output_dir": str(work / "phi"),
                "phi_overrides": TOY_PHI,
            },
        )
        result = timed("phi", train_phi.main, cfg)
        shutil.copytree(result.weights, phi, dirs_exist_ok=True)
    return {"data": data, "flux_fill": root, "rgba_vae": rgba, "phi": phi}


def train_variant(work: Path, paths: dict[str, Path], name: str, s1: dict | None, s2: dict | None) -> Path:
    out = work / "variants" / name
    final = out / "bfs.safetensors"
    if final.is_file():
        return final
    common = {
        "flux_fill": str(paths["flux_fill"]),
        "rgba_vae": str(paths["rgba_vae"]),
        "phi": str(paths["phi"]),
        "bfs_overrides": TOY_BFS,
        "text_cache_dir": str(work / "text_cache"),
    }
    base1 = load_config(train_stage1.TrainConfig, CONFIGS / "toy_stage1.yaml")
    base2 = load_config(train_stage2.TrainConfig, CONFIGS / "toy_stage2.yaml")
    total = base1.max_steps + base2.max_steps
    weights = None
    if s1 is not None:
        over = {k: (total if v == "total" else v) for k, v in s1.items()}
        cfg = load_config(
            train_stage1.TrainConfig,
            CONFIGS / "toy_stage1.yaml",
            {**common, "data_dir": str(paths["data"] / "triplets"), "output_dir": str(out / "stage1"), **over},
        )
        weights = timed(f"{name} stage1", train_stage1.main, cfg).weights
    if s2 is not None:
        over = {k: (total if v == "total" else v) for k, v in s2.items()}
        cfg = load_config(
            train_stage2.TrainConfig,
            CONFIGS / "toy_stage2.yaml",
            {
                **common,
                "pairs_dir": str(paths["data"] / "pairs"),
                "triplets_dir": str(paths["data"] / "triplets"),
                "output_dir": str(out / "stage2"),
                "init_bfs": str(weights) if weights else None,
                **over,
            },
        )
        weights = timed(f"{name} stage2", train_stage2.main, cfg).weights
    shutil.copy(weights, final)
    return final


def ship(work: Path, paths: dict[str, Path], bfs: Path, dest: Path = WEIGHTS_DIR) -> None:
    from diffusers import FluxTransformer2DModel

    dest.mkdir(parents=True, exist_ok=True)
    root = dest / "flux-fill"
    for sub in ("vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(paths["flux_fill"] / sub, root / sub, dirs_exist_ok=True)
    transformer = FluxTransformer2DModel.from_pretrained(paths["flux_fill"] / "transformer")
    transformer.to(torch.float16).save_pretrained(root / "transformer")
    shutil.copytree(paths["rgba_vae"], dest / "rgba_vae", dirs_exist_ok=True)
    shutil.copytree(paths["phi"], dest / "phi", dirs_exist_ok=True)
    shutil.copy(bfs, dest / "bfs_toy.safetensors")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    logger.info("shipped the toy model to %s (%.1f MB)", dest, size / 1e6)


def write_ablation_table(work: Path, variants: dict[str, Path], count: int) -> None:
    """Score every variant on the held-out scenes (on this run's base) and write <work>/ablations.{md,json}."""
    from bfs_core.toy.evaluate import evaluate_variants, format_table

    rows = evaluate_variants(str(work / "model"), variants, count=count, steps=20, seed=0)
    table = format_table(rows)
    (work / "ablations.md").write_text(
        f"`python scripts/train_toy.py --ablations --work {work}` (evaluation: {count} held-out scenes, seed 12345; "
        f"20 Euler steps, guidance 30, sampling seed 0)\n\n{table}\n"
    )
    (work / "ablations.json").write_text(json.dumps(rows, indent=2))
    print(table)
    logger.info("ablation table: %s", work / "ablations.md")


def run_in_parallel(args: argparse.Namespace, names: list[str]) -> None:
    """Train `names` in `args.jobs` child processes of this script (`--only NAME`), each logging to its own file."""
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = open(Path(args.work) / f"variant_{name}.log", "w")  # noqa: SIM115 (closed when the child ends)
            cmd = [sys.executable, __file__, "--work", args.work, "--threads", str(args.threads), "--only", name]
            logger.info("started %s (log: %s)", name, log.name)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode:
                    raise SystemExit(f"variant {name} failed (exit {proc.returncode}); see {log.name}")


def decomposition_base(work: Path) -> dict[str, Path]:
    """The toy Fill root and RGBA VAE to train on: this work folder's (a full run), else the shipped ones."""
    own = work / "model"
    if (own / "flux-fill" / "transformer" / "config.json").is_file() and (own / "rgba_vae" / "config.json").is_file():
        return {"flux_fill": own / "flux-fill", "rgba_vae": own / "rgba_vae"}
    return {"flux_fill": WEIGHTS_DIR / "flux-fill", "rgba_vae": WEIGHTS_DIR / "rgba_vae"}


def train_decomposition(work: Path, name: str, overrides: dict) -> Path:
    """One decomposition run (skipped when its weights exist); returns the weights file."""
    from bfs_core.toy.decomposition import write_decomposition_dataset
    from training import train_decompose

    data = work / "decomposition" / "data"
    if not (data / "manifest.jsonl").is_file():
        timed("decomposition scenes", write_decomposition_dataset, data, DECOMPOSITION_SCENES)
    out = work / "decomposition" / name
    final = out / "decomposition.safetensors"
    if final.is_file():
        return final
    base = decomposition_base(work)
    cfg = load_config(
        train_decompose.TrainConfig,
        CONFIGS / "toy_decompose.yaml",
        {
            "data_dir": str(data),
            "flux_fill": str(base["flux_fill"]),
            "rgba_vae": str(base["rgba_vae"]),
            "output_dir": str(out),
            "text_cache_dir": str(work / "text_cache"),
            **overrides,
        },
    )
    start = time.time()
    result = timed(f"decompose {name}", train_decompose.main, cfg)
    losses = result.losses
    tail = losses[-100:]
    record = {
        "variant": name,
        "overrides": overrides,
        "steps": len(losses),
        "minutes": round((time.time() - start) / 60, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss_mean_last_100": sum(tail) / max(len(tail), 1),
        "base": str(
            base["flux_fill"].relative_to(REPO) if base["flux_fill"].is_relative_to(REPO) else base["flux_fill"]
        ),
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "train_record.json", json.dumps(record, indent=2))
    return final


def ship_decomposition(work: Path, weights: Path, dest: Path | None = None) -> None:
    from bfs_core.toy.decomposition import CONFIG_NAME, DECOMPOSITION_DIR, WEIGHTS_NAME

    dest = dest or DECOMPOSITION_DIR
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest / WEIGHTS_NAME) as tmp:
        shutil.copy(weights, tmp)
    record = json.loads((weights.parent / "train_record.json").read_text())
    recipe = {"recipe": "training/configs/toy_decompose.yaml", "command": "scripts/train_toy.py --decomposition"}
    atomic_write_text(dest / CONFIG_NAME, json.dumps({**recipe, **record}, indent=2) + "\n")
    size = (dest / WEIGHTS_NAME).stat().st_size / 1e6
    logger.info("shipped the toy decomposition model to %s (%.1f MB)", dest, size)


def decomposition_ablations(work: Path, args: argparse.Namespace) -> None:
    from bfs_core.toy.evaluate_decomposition import write_decomposition_results

    steps = DECOMPOSITION_ABLATION_BUDGET
    variants = {
        name: train_decomposition(work, f"ablation_{name}", {**steps, **over})
        for name, over in DECOMPOSITION_ABLATIONS.items()
    }
    budget = DECOMPOSITION_ABLATION_BUDGET
    note = (
        f"Budget: each ablation variant (and `ablation: full`, the same recipe) {budget['max_steps']} steps × batch "
        f"{budget['batch_size']}; the shipped model (`ours`) training/configs/toy_decompose.yaml's budget (800 × 16). "
        "Variants: " + "; ".join(f"{k} = {v or 'the recipe as is'}" for k, v in DECOMPOSITION_ABLATIONS.items()) + "."
    )
    write_decomposition_results(variants, scenes=args.eval_count, steps=12, seed=0, note=note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "runs" / "toy"))
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="ablation variants trained at a time")
    parser.add_argument("--ship", action="store_true", help="copy the result into bfs_core/toy/weights")
    parser.add_argument("--ablations", action="store_true", help="also train every ablation variant")
    parser.add_argument("--only", nargs="*", default=None, help="train only these variants")
    parser.add_argument("--eval-count", type=int, default=64, help="held-out scenes for the ablation table")
    parser.add_argument("--decomposition", action="store_true", help="train the toy decomposition model")
    parser.add_argument(
        "--decomposition-ablations", action="store_true", help="train the decomposition ablations, write the table"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("accelerate", "diffusers", "transformers", "training.common"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(args.work)
    start = time.time()
    if args.decomposition or args.decomposition_ablations:
        if args.decomposition:
            weights = train_decomposition(work, "main", {})
            if args.ship:
                ship_decomposition(work, weights)
        if args.decomposition_ablations:
            decomposition_ablations(work, args)
        logger.info("train_toy (decomposition) finished in %.1f min", (time.time() - start) / 60)
        return
    paths = build_base(work, args.scenes)
    names = args.only or (list(ABLATIONS) if args.ablations else ["full"])
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; choose from {list(ABLATIONS)}")
    if args.jobs > 1 and len(names) > 1:
        run_in_parallel(args, names)
    results = {name: train_variant(work, paths, name, *ABLATIONS[name]) for name in names}
    if args.ship:
        ship(work, paths, results["full"])
    if args.ablations:
        write_ablation_table(work, results, args.eval_count)
    minutes = (time.time() - start) / 60
    logger.info("train_toy finished in %.1f min: %s", minutes, {k: str(v) for k, v in results.items()})


if __name__ == "__main__":
    main()
