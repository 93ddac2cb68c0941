"""BFS weight files: the official .pt layout and our safetensors format."""

import logging

import pytest
import torch
from safetensors import safe_open

from bfs_core.models.bfs_checkpoint import (
    convert_official_to_safetensors,
    load_bfs,
    read_official_checkpoint,
    save_bfs_weights,
)
from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux, JointAttention
from bfs_core.tiny import dual_inputs, make_tiny_flux, official_release_state_dict, randomize_bfs_parameters


@torch.no_grad()
def run(model, inputs):
    return model(**inputs)


def _write_official(tmp_path, **kwargs):
    sd = official_release_state_dict(2, 2, 64, **kwargs)
    path = tmp_path / "trained_weights.pt"
    torch.save(sd, path)
    return path, sd


def test_official_checkpoint_places_every_key_and_changes_the_output(tmp_path, caplog):
    path, sd = _write_official(tmp_path, std=0.1)
    inputs = dual_inputs(n=1)
    plain = run(DualBranchFlux(make_tiny_flux(), DualBranchConfig.release()), inputs)
    with caplog.at_level(logging.INFO):
        model = load_bfs(make_tiny_flux(), tmp_path)  # the folder form, as the release accepts
    assert "NOT PLACED" not in caplog.text and "placed 60 tensors (double 34, single 26)" in caplog.text
    assert model.config == DualBranchConfig.release()
    block = model.transformer.transformer_blocks[1]
    assert torch.equal(
        block.joint.to_out.lora_B["fg"].weight, sd["transformer_blocks.1.attn1n.to_out.0.lora_B.yx_lora.weight"]
    )
    assert torch.equal(
        block.joint.to_q.lora_A["comp"].weight, sd["transformer_blocks.1.attn1n.to_q.lora_A.xy_lora.weight"]
    )
    assert torch.equal(
        model.transformer.single_transformer_blocks[0].joint.post.weight,
        sd["single_transformer_blocks.0.conv1n.weight"],
    )
    loaded = run(model, inputs)
    for a, b in zip(loaded, plain):
        assert (a - b).abs().max() > 1e-3


def test_missing_double_block_modules_are_skipped_with_identical_numerics(tmp_path):
    path, sd = _write_official(tmp_path, include_double=False, std=0.1)
    single_only = load_bfs(make_tiny_flux(), path)
    assert single_only.config.joint_placement == "single"
    assert not any(hasattr(b, "joint") for b in single_only.transformer.transformer_blocks)
    # The same weights in an all-blocks model whose double-block conv1n stay zero (what the release builds).
    full = DualBranchFlux(make_tiny_flux(), DualBranchConfig.release())
    full.transformer.load_state_dict(
        {k: v for k, v in load_bfs(make_tiny_flux(), path).transformer.state_dict().items() if ".joint." in k},
        strict=False,
    )
    inputs = dual_inputs(n=1)
    for a, b in zip(run(single_only, inputs), run(full, inputs)):
        assert torch.equal(a, b)


def test_unplaceable_keys_are_reported_per_block_type(tmp_path, caplog):
    sd = official_release_state_dict(2, 2, 64)
    sd["single_transformer_blocks.0.attn.to_q.lora_A.default.weight"] = torch.zeros(4, 64)  # a content LoRA
    sd["module.single_transformer_blocks.0.conv1n.weight"] = torch.zeros(64, 64)  # DDP prefix: the release drops it
    sd["transformer_blocks.0.attn1n.to_q.lora_A.zz_lora.weight"] = torch.zeros(4, 64)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    ckpt = read_official_checkpoint(path, flux_keys=set(make_tiny_flux().state_dict()))
    assert ckpt.unplaced == {
        "single": ["single_transformer_blocks.0.attn.to_q.lora_A.default.weight"],
        "other": ["module.single_transformer_blocks.0.conv1n.weight"],
        "double": ["transformer_blocks.0.attn1n.to_q.lora_A.zz_lora.weight"],
    }
    with caplog.at_level(logging.WARNING):
        load_bfs(make_tiny_flux(), path)
    assert "3 keys could not be placed" in caplog.text


def test_base_weights_in_the_checkpoint(tmp_path):
    base = make_tiny_flux()
    sd = official_release_state_dict(2, 2, 64, std=0.1)
    # Equal attn1n copies (what the release would have written had it saved them): no private copy is made.
    sd["single_transformer_blocks.1.attn1n.to_q.base_layer.weight"] = base.single_transformer_blocks[
        1
    ].attn.to_q.weight
    # A plain Flux key overwrites the base, but the joint module keeps the original (copied before loading).
    original_k = base.single_transformer_blocks[0].attn.to_k.weight.clone()
    sd["single_transformer_blocks.0.attn.to_k.weight"] = original_k + 1.0
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    model = load_bfs(make_tiny_flux(), path)
    blocks = model.transformer.single_transformer_blocks
    assert blocks[1].joint.base is None
    assert torch.equal(blocks[0].attn.to_k.weight, original_k + 1.0)
    assert torch.equal(blocks[0].joint.base["to_k"].weight, original_k)
    # Converted without a base model, the file carries both facts and reloads to the same outputs.
    out = tmp_path / "converted.safetensors"
    convert_official_to_safetensors(path, out)
    converted = load_bfs(make_tiny_flux(), out)
    inputs = dual_inputs(n=1)
    for a, b in zip(run(model, inputs), run(converted, inputs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["release", "paper"])
def test_our_format_round_trips_to_identical_outputs(tmp_path, preset):
    model = DualBranchFlux(make_tiny_flux(), DualBranchConfig.preset(preset))
    randomize_bfs_parameters(model.transformer, std=0.05)
    path = tmp_path / "bfs.safetensors"
    save_bfs_weights(model, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert (
        meta["format"] == "bfs-dual-flux"
        and DualBranchConfig.from_json(meta["bfs_config"]).noise == model.config.noise
    )
    assert all(".joint." in k or ".lora_" in k for k in keys)
    reloaded = load_bfs(make_tiny_flux(), path)
    assert reloaded.config == model.config
    inputs = dual_inputs(n=2)
    for a, b in zip(run(model, inputs), run(reloaded, inputs)):
        assert (a - b).abs().max() < 1e-5  # the reload folds the linear post (exact up to rounding)
    for joint in (m for m in reloaded.transformer.modules() if isinstance(m, JointAttention)):
        joint.unfold_post()
    for a, b in zip(run(model, inputs), run(reloaded, inputs)):
        assert torch.equal(a, b)


def test_official_official_to_ours_converter_matches_direct_load(tmp_path):
    path, _ = _write_official(tmp_path, std=0.05)
    out = tmp_path / "ours.safetensors"
    convert_official_to_safetensors(path, out)
    inputs = dual_inputs(n=1)
    for a, b in zip(run(load_bfs(make_tiny_flux(), path), inputs), run(load_bfs(make_tiny_flux(), out), inputs)):
        assert torch.equal(a, b)


def test_wrong_files_get_clear_errors(tmp_path):
    torch.save({"foo": torch.zeros(2)}, tmp_path / "nojoint.pt")
    with pytest.raises(ValueError, match="no BFS joint-module weights"):
        load_bfs(make_tiny_flux(), tmp_path / "nojoint.pt")
    wide = official_release_state_dict(2, 2, 96)  # made for another model width
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="wrong shape"):
        load_bfs(make_tiny_flux(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="not found"):
        load_bfs(make_tiny_flux(), tmp_path / "absent.pt")
