"""Offloading (none / model / block) on diffusers' and accelerate's hooks: outputs unchanged, hooks where they belong.

CPU only: the onload device is the CPU, which diffusers and accelerate allow, so the hooks run their whole
onload/offload path but move nothing. That shows the hooks change no value (and that the BFS LoRAs, the joint module
and a GGUF base survive them); that block mode really groups one block at a time is checked on the hooks themselves.
Where the weights are between blocks, and the peak memory, need CUDA (measured on a lent GPU, not here).
"""

import pytest
import torch

from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux
from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
from bfs_core.offload import (
    Offload,
    apply_offload,
    device_weight_bytes,
    execution_device,
    group_offloading_needs_an_accelerator,
    offload_mode,
    offload_now,
    parse_offload,
    remove_offload,
)
from bfs_core.tiny import dual_inputs, make_tiny_flux, randomize_bfs_parameters


torch.set_num_threads(1)
# diffusers 0.35 (the low end of the range) cannot build group-offloading groups on a machine without a GPU; there
# apply_offload refuses block mode with a clear message (checked below) and the block cases are skipped.
needs_gpu_for_block = pytest.mark.skipif(
    group_offloading_needs_an_accelerator(), reason="this diffusers' group offloading needs a GPU"
)


def _bfs_model(seed=0):
    model = DualBranchFlux(make_tiny_flux(seed=seed), DualBranchConfig.preset("paper"))
    randomize_bfs_parameters(model.transformer, seed=seed + 1)
    return model


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("mode", [Offload.NONE, Offload.MODEL, pytest.param(Offload.BLOCK, marks=needs_gpu_for_block)])
def test_output_with_offloading_equals_output_without(mode):
    inputs = dual_inputs(n=2)
    plain = _run(_bfs_model(), inputs)
    model = _bfs_model()
    apply_offload(model.transformer, mode, "cpu")
    assert offload_mode(model.transformer) == mode and execution_device(model.transformer) == torch.device("cpu")
    for _ in range(2):  # the second call runs with the hooks' state after a full onload/offload cycle
        for got, want in zip(_run(model, inputs), plain):
            assert torch.equal(got, want)
        offload_now(model.transformer)
    remove_offload(model.transformer)
    assert offload_mode(model.transformer) == Offload.NONE
    for got, want in zip(_run(model, inputs), plain):
        assert torch.equal(got, want)


@needs_gpu_for_block
def test_block_offloading_makes_one_group_per_block_and_one_for_the_rest():
    from diffusers.hooks import HookRegistry

    transformer = _bfs_model().transformer
    apply_offload(transformer, "block", "cpu")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    groups = []
    for block in blocks:
        hook = HookRegistry.check_if_exists_or_initialize(block).get_hook("group_offloading")
        assert hook is not None
        groups.append(hook.group)
        assert hook.group.modules == [block]  # one block per group: onloaded alone, offloaded right after
        assert hook.group.onload_leader is block and hook.group.offload_leader is block
    assert len({id(g) for g in groups}) == len(blocks)
    top = HookRegistry.check_if_exists_or_initialize(transformer).get_hook("group_offloading")
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = {id(p) for p in transformer.parameters()} - in_blocks
    assert {id(p) for p in top.group.parameters} == rest  # embedders, norm_out, proj_out: onloaded per forward
    remove_offload(transformer)
    assert all(not HookRegistry.check_if_exists_or_initialize(b).hooks for b in blocks)


def test_model_offloading_installs_accelerates_cpu_offload_hook():
    from accelerate.hooks import CpuOffload

    transformer = _bfs_model().transformer
    apply_offload(transformer, "model", "cpu")
    assert isinstance(transformer._hf_hook, CpuOffload)
    assert transformer._hf_hook.execution_device == torch.device("cpu")
    remove_offload(transformer)
    assert not hasattr(transformer, "_hf_hook")


def test_device_weight_bytes_counts_the_blocks_on_the_device():
    transformer = _bfs_model().transformer
    sd = transformer.state_dict()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    per_block = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            name = ".".join(parts[:2])
            per_block[name] = per_block.get(name, 0) + t.numel() * t.element_size()
    two_largest = sum(sorted(per_block.values())[-2:])
    assert device_weight_bytes(transformer, "none") == device_weight_bytes(transformer, "model") == total
    assert device_weight_bytes(transformer, "block") == total - sum(per_block.values()) + two_largest
    assert device_weight_bytes(transformer, "block") < total


@needs_gpu_for_block
def test_block_offloading_on_a_gguf_base(tmp_path):
    from bfs_core.tiny.gguf import write_tiny_flux_fill_gguf

    path = write_tiny_flux_fill_gguf(tmp_path)["gguf_q8_0"]
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in dual_inputs(n=1).items()}
    results = []
    for mode in ("none", "block"):
        model = DualBranchFlux(load_flux_fill_transformer(path), DualBranchConfig.preset("release"))
        randomize_bfs_parameters(model.transformer, seed=5)
        apply_offload(model.transformer, mode, "cpu")
        results.append(_run(model, inputs))
        assert hasattr(model.transformer.transformer_blocks[0].attn.to_q.weight, "quant_type")
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="`--offload` must be one of 'none', 'model', 'block' but got 'gpu'"):
        parse_offload("gpu", "--offload")


@pytest.mark.skipif(not group_offloading_needs_an_accelerator(), reason="this diffusers runs group offloading on CPU")
def test_block_offloading_says_why_it_cannot_run_here():
    with pytest.raises(ValueError, match="`offload` 'block' cannot run on this machine.*use 'none'"):
        apply_offload(_bfs_model().transformer, "block", "cpu")


def test_an_offloaded_model_reports_its_compute_device():
    """The pipeline and the sampler put their inputs on `model.device`: with the weights parked on the CPU that must
    still be the compute device. `meta` stands in for CUDA (nothing runs: accelerate's hook only records where to
    onload; diffusers' group offloading refuses a `meta` onload device: block mode shares the code, untested)."""
    model = _bfs_model()
    apply_offload(model.transformer, "model", "meta")
    assert next(model.transformer.parameters()).device == torch.device("cpu")
    assert execution_device(model.transformer) == torch.device("meta")
    assert model.device == torch.device("meta")
