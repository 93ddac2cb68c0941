"""The four trainers on two CPU processes (torch.distributed, gloo), against one process with the same global batch.

One `accelerate launch --multi_gpu --num_processes 2` (with ACCELERATE_USE_CPU, see training/README.md) runs Φ,
BFS stage 1, stage 2 (L_real, L_reg, L_real) and the decomposition trainer for a few steps on tiny models, with
`debug_rank_sync`: after every optimiser step each trainer compares every trainable parameter across the processes
(rank_sync.jsonl) and dumps process 0's trainables. One plain process then runs the same jobs with twice the batch.
The tests check (a) both processes hold bit-identical trainables after every step and (b) the two-process run is
the one-process run, step by step, within fp32 tolerance. This file is also the worker script the launch runs.
FSDP and DeepSpeed cannot run on a CPU: their shipped configs are parsed and turned into accelerate's plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
GLOBAL_BATCH = 4
STEPS = {"phi": 2, "stage1": 2, "stage2": 3, "decompose": 2}
LR = 1e-3
# fp32, but through AdamW: the all-reduce sums the gradient in another order than one process does, and AdamW's first
# steps are lr·g/(|g| + eps), so an element whose gradient is rounding noise (~eps) may move by up to ±lr either way.
# Measured: at most 1.7e-5 (Φ), 8e-7 (the BFS and decomposition LoRAs); a wrong global batch, data order or noise
# draw moves many elements by ~lr (1e-3).
TOLERANCE = 5e-5


def _values(job: str, paths: dict, out: Path, batch_size: int) -> dict:
    from bfs_core.tiny import TINY_BFS, TINY_PHI

    fast = dict(
        output_dir=str(out / job),
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=batch_size,
        max_steps=STEPS[job],
        checkpointing_steps=100,
        validation_steps=0,
        num_workers=0,
        report_to="none",
        resolution=64,
        learning_rate=LR,
        optimizer="adamw",
        debug_rank_sync=True,
    )
    m, d = paths["models"], paths["data"]
    if job == "phi":
        vaes = dict(vae=f"{m['flux_fill']}/vae", rgba_vae=m["rgba_vae"])
        return dict(fast, data_dir=d["phi"], phi_overrides=TINY_PHI, **vaes)
    text = dict(
        max_sequence_length=8, text_cache_dir=str(out / "text_cache"), flux_fill=m["flux_fill"], rgba_vae=m["rgba_vae"]
    )
    if job == "decompose":
        overrides = {"joint_rank": 4, "fusion_dim": 32, "fusion_latents": 8, "fusion_heads": 2}
        return dict(fast, **text, data_dir=paths["decomposition"], lora_rank=4, decomposition_overrides=overrides)
    bfs = dict(fast, **text, phi=m["phi"], bfs_overrides=TINY_BFS)
    if job == "stage1":
        return dict(bfs, data_dir=d["triplets"])
    # Stage 2 with gradient checkpointing (the shipped default): non-reentrant checkpoints + find_unused_parameters.
    return dict(bfs, pairs_dir=d["pairs"], triplets_dir=d["triplets"], gradient_checkpointing=True)


def run_jobs(spec_path: str) -> None:
    """Worker: run every job of the spec (each process of a launch runs this)."""
    torch.set_num_threads(1)
    from training import train_decompose, train_phi, train_stage1, train_stage2
    from training.config import load_config

    trainers = {"phi": train_phi, "stage1": train_stage1, "stage2": train_stage2, "decompose": train_decompose}
    spec = json.loads(Path(spec_path).read_text())
    # One launch for all four trainers: each trainer's `end_training` would destroy the process group, which cannot
    # be set up again under one torchrun rendezvous, so it is kept until the last trainer is done.
    with mock.patch.object(torch.distributed, "destroy_process_group"):
        for job, values in spec["jobs"].items():
            trainers[job].main(load_config(trainers[job].TrainConfig, None, values))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch(paths: dict, out: Path, processes: int, jobs: list[str]) -> None:
    """Run `jobs`, one after another, in one launch of `processes` processes."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"spec-{'-'.join(jobs)}.json"
    spec.write_text(json.dumps({"jobs": {job: _values(job, paths, out, GLOBAL_BATCH // processes) for job in jobs}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT))
    if processes == 1:
        cmd = [sys.executable, __file__, str(spec)]
    else:
        # `accelerate launch --cpu` alone starts ONE process (accelerate 1.x's simple launcher); --multi_gpu starts
        # torchrun workers, which pick the CPU and gloo from ACCELERATE_USE_CPU.
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            __file__,
            str(spec),
        ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "Error" in line][-5:]
        pytest.fail(f"{processes}-process run of {jobs} failed ({done.returncode}): {errors}\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        import accelerate.commands.launch  # noqa: F401
        import torch.distributed as dist
    except ImportError as err:  # pragma: no cover - accelerate is a training requirement
        pytest.skip(f"accelerate launch is not available: {err}")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    from bfs_core.tiny import write_tiny_models
    from training.decomposition_data import DataConfig
    from training.decomposition_data import main as build_decomposition_data
    from training.tiny import write_layer_datasets

    root = tmp_path_factory.mktemp("ddp")
    models = {k: str(v) for k, v in write_tiny_models(root / "models").items()}
    data = {k: str(v) for k, v in write_layer_datasets(ASSETS, root / "data", count=8).items()}
    decomposition = build_decomposition_data(
        DataConfig(
            foreground_dir=str(ASSETS / "stamps"),
            background_dir=str(ASSETS / "photos"),
            output_dir=str(root / "decomposition"),
            count=8,
            size=64,
            min_objects=1,
            max_objects=2,
        )
    ).weights
    paths = {"models": models, "data": data, "decomposition": str(decomposition)}
    _launch(paths, root / "two", 2, list(STEPS))
    _launch(paths, root / "one", 1, list(STEPS))
    return {"two": root / "two", "one": root / "one"}


def _sync_records(run: Path, job: str) -> list[dict]:
    return [json.loads(line) for line in (run / job / "rank_sync.jsonl").read_text().splitlines()]


def _dump(run: Path, job: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / job / "rank_sync" / f"step-{step:06d}.safetensors"))


@pytest.mark.parametrize("job", list(STEPS))
def test_both_processes_hold_identical_trainables_after_every_step(runs, job):
    records = _sync_records(runs["two"], job)
    assert [r["step"] for r in records] == list(range(STEPS[job] + 1))  # step 0 = after `prepare`
    for r in records:
        assert r["processes"] == 2 and r["tensors"] > 0
        assert r["identical"] and r["max_abs_diff"] == 0.0, f"{job} step {r['step']}: {r}"


@pytest.mark.parametrize("job", list(STEPS))
def test_two_processes_train_like_one_process_with_the_global_batch(runs, job):
    assert all(r["processes"] == 1 for r in _sync_records(runs["one"], job))
    start = _dump(runs["one"], job, 0)
    for step in range(STEPS[job] + 1):
        one, two = _dump(runs["one"], job, step), _dump(runs["two"], job, step)
        assert set(one) == set(two)
        diff = max((one[n] - two[n]).abs().max().item() for n in one)
        moved = max((one[n] - start[n]).abs().max().item() for n in one)
        assert diff <= TOLERANCE, f"{job} step {step}: 1 vs 2 processes differ by {diff:.3g} (moved {moved:.3g})"
        if step:
            assert moved >= 0.5 * LR  # the weights did train: the comparison is not of two untouched starts


def test_stage2_under_ddp_steps_only_the_phase_parameters(runs):
    from bfs_core.models.dual_flux import parameter_group

    phases = ["real", "reg", "real"]
    groups = {"real": {"comp"}, "reg": {"fg", "joint"}}
    before = _dump(runs["two"], "stage2", 0)
    for step, phase in enumerate(phases, 1):
        after = _dump(runs["two"], "stage2", step)
        changed = {parameter_group(n) for n in after if not torch.equal(after[n], before[n])}
        assert changed == groups[phase], f"step {step} ({phase}) changed {changed}"  # no off-phase decay/momentum
        before = after


# ---------------------------------------------------------------------------------------------------------------------
# The shipped accelerate configs. FSDP and DeepSpeed cannot run on a CPU (training/README.md, "Multi-GPU"), so each
# config is read by accelerate's own launcher code and turned into the plugin a launch would build from it.

CONFIG_TYPES = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}


def _launch_args(name: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "training" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name", list(CONFIG_TYPES))
def test_shipped_accelerate_config_parses(name):
    args, defaults = _launch_args(name)
    assert defaults.distributed_type.value == CONFIG_TYPES[name]
    assert args.mixed_precision == "bf16" and args.num_machines == 1
    assert args.num_processes == (1 if name == "single_gpu" else 4)


def _tiny_dual_model(preset: str):
    from diffusers import FluxTransformer2DModel

    from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux
    from bfs_core.tiny import TINY_BFS, TINY_FLUX

    config = DualBranchConfig(**{**DualBranchConfig.preset(preset).__dict__, **TINY_BFS})
    return DualBranchFlux(FluxTransformer2DModel(**TINY_FLUX), config)


def test_fsdp_config_builds_its_plugin_and_wraps_the_block_classes(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args("fsdp")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    # sync_module_states makes the plugin pick the current accelerator device; a CPU has none (why FSDP is not run).
    env["FSDP_SYNC_MODULE_STATES"] = "false"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params  # frozen and trainable parameters share a block
    assert "FULL_SHARD" in str(plugin.sharding_strategy) and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    # The wrap classes must be exactly the classes of the patched model's blocks (both presets): accelerate finds each
    # named class by its exact name in the model and stops with "Could not find the transformer layer class" if one
    # is missing; a block class left out would not be sharded.
    names = plugin.transformer_cls_names_to_wrap
    for preset in ("paper", "release"):
        model = _tiny_dual_model(preset).transformer
        blocks = {type(b).__name__ for b in [*model.transformer_blocks, *model.single_transformer_blocks]}
        assert set(names) == blocks, f"fsdp.yaml wraps {names}; the {preset} blocks are {sorted(blocks)}: update it"
        assert all(get_module_class_from_name(model, n) is not None for n in names)


def test_deepspeed_config_builds_its_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args("deepspeed_zero2")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command` sets
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    run_jobs(sys.argv[1])
