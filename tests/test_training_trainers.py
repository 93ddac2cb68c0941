"""The trainers on tiny models (CPU): two steps, checkpoint keys, stage-2 parameter isolation, bit-exact resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bfs_core.models.dual_flux import parameter_group
from bfs_core.tiny import TINY_BFS, TINY_PHI, write_tiny_models
from training import train_phi, train_stage1, train_stage2
from training.config import load_config
from training.tiny import write_layer_datasets


ASSETS = Path(__file__).parent / "assets"
FAST = dict(
    mixed_precision="no",
    gradient_checkpointing=False,
    batch_size=2,
    max_steps=2,
    checkpointing_steps=1,
    validation_steps=0,
    num_workers=0,
    report_to="none",
    resolution=64,
    learning_rate=1e-3,
    lr_warmup_steps=0,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return {"models": write_tiny_models(root / "models"), "data": write_layer_datasets(ASSETS, root / "data", count=6)}


def _bfs(tiny, out, **kw):
    m = tiny["models"]
    return dict(
        FAST,
        output_dir=str(out),
        flux_fill=str(m["flux_fill"]),
        rgba_vae=str(m["rgba_vae"]),
        phi=str(m["phi"]),
        bfs_overrides=TINY_BFS,
        max_sequence_length=8,
        text_cache_dir=str(out.parent / "text_cache"),
        **kw,
    )


def _stage1(tiny, out, **kw):
    return load_config(train_stage1.TrainConfig, None, _bfs(tiny, out, data_dir=str(tiny["data"]["triplets"]), **kw))


def _stage2(tiny, out, **kw):
    d = tiny["data"]
    values = _bfs(tiny, out, pairs_dir=str(d["pairs"]), triplets_dir=str(d["triplets"]), **kw)
    return load_config(train_stage2.TrainConfig, None, values)


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_phi_two_steps_saves_all_of_phi(tiny, tmp_path):
    m = tiny["models"]
    values = dict(FAST, output_dir=str(tmp_path), data_dir=str(tiny["data"]["phi"]), phi_overrides=TINY_PHI)
    cfg = load_config(
        train_phi.TrainConfig, None, dict(values, vae=str(m["flux_fill"] / "vae"), rgba_vae=str(m["rgba_vae"]))
    )
    result = train_phi.main(cfg)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    from diffusers import UNet2DModel

    phi = UNet2DModel.from_pretrained(result.weights)
    assert _keys(tmp_path / "checkpoints" / "checkpoint-000002" / "phi.safetensors") == set(phi.state_dict())


def test_stage1_two_steps_checkpoint_is_exactly_the_trainable_set_and_loads_in_the_nodes(tiny, tmp_path):
    snapshots = {}
    result = train_stage1.main(
        _stage1(tiny, tmp_path / "run"), callback=lambda step, info, model: snapshots.setdefault("model", model)
    )
    trainable = {n for n, p in snapshots["model"].transformer.named_parameters() if p.requires_grad}
    assert trainable and {parameter_group(n) for n in trainable} == {"comp", "fg", "joint"}
    assert _keys(result.weights) == trainable
    assert _keys(tmp_path / "run" / "checkpoints" / "checkpoint-000002" / "bfs_weights.safetensors") == trainable
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "checkpoint-000001",
        "checkpoint-000002",
    ]
    from bfs_core.models.bfs_checkpoint import load_bfs
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer

    transformer = load_flux_fill_transformer(tiny["models"]["flux_fill"], torch_dtype=torch.float32)
    model = load_bfs(transformer, result.weights)  # the nodes' loader
    for name, param in model.transformer.named_parameters():
        if name in trainable:
            assert torch.equal(param, snapshots["model"].transformer.get_parameter(name).detach())


def test_stage2_steps_touch_only_their_phase_parameters(tiny, tmp_path):
    s1 = train_stage1.main(_stage1(tiny, tmp_path / "s1", max_steps=1))
    states = []

    def record(step, info, model):
        states.append((info["phase"], {n: p.detach().clone() for n, p in model.transformer.named_parameters()}))

    start = {}
    from bfs_core.models.bfs_checkpoint import read_bfs_safetensors

    start = read_bfs_safetensors(s1.weights).tensors
    train_stage2.main(_stage2(tiny, tmp_path / "s2", init_bfs=str(s1.weights)), callback=record)
    (phase1, after1), (phase2, after2) = states
    assert (phase1, phase2) == ("real", "reg")
    changed1 = {n for n, v in start.items() if not torch.equal(v, after1[n])}
    changed2 = {n for n in start if not torch.equal(after1[n], after2[n])}
    assert changed1 and {parameter_group(n) for n in changed1} == {"comp"}
    assert changed2 and {parameter_group(n) for n in changed2} == {"fg", "joint"}
    base = [n for n in after1 if parameter_group(n) == "base"]
    assert all(torch.equal(after1[n], after2[n]) for n in base)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_kill_and_resume_gives_bit_identical_next_losses(tiny, tmp_path, stage):
    make = _stage1 if stage == "stage1" else _stage2
    main = train_stage1.main if stage == "stage1" else train_stage2.main
    full = main(make(tiny, tmp_path / "full", max_steps=3, checkpoints_total_limit=None))
    # "Kill" after step 1: a second run directory holding only checkpoint 1, resumed with fresh objects.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "checkpoint-000001", resumed_dir / "checkpoints" / "checkpoint-000001"
    )
    (resumed_dir / "checkpoints" / "checkpoint-000002.tmp").mkdir()  # a half-written checkpoint is ignored
    (resumed_dir / "checkpoints" / "checkpoint-000002.old").mkdir()  # and atomic_dir's leftover of a replaced one
    resumed = main(make(tiny, resumed_dir, max_steps=3, resume_from_checkpoint="latest"))
    assert resumed.first_step == 2
    assert resumed.losses == full.losses[1:]  # bit for bit (float equality)
    state = json.loads((resumed_dir / "checkpoints" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_checkpoint_rotation_keeps_the_newest(tiny, tmp_path):
    train_stage1.main(_stage1(tiny, tmp_path, max_steps=3, checkpoints_total_limit=2))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-000002", "checkpoint-000003"]
