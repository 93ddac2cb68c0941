"""`cache_threshold` on BG2FG Sample in the real server: 0 (and absent: old graphs) is the exact sampler; a threshold
gives a different, still valid layer. The latent files are saved with ComfyUI's own SaveLatent and compared."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file


def _graph(cache_threshold, prefix: str) -> dict:
    sample_inputs = {
        "bfs_model": ["toy", 0],
        "background": ["bg", 0],
        "mask": ["box", 0],
        "positive": ["text", 0],
        "vae": ["toy", 1],
        "seed": 11,
        "steps": 12,
        "guidance": 30.0,
        "short_side": 512,
    }
    if cache_threshold is not None:
        sample_inputs["cache_threshold"] = cache_threshold
    return {
        "bg": {"class_type": "BFSToyBackground", "inputs": {"seed": 5}},
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "text": {"class_type": "BFSToyTextEncode", "inputs": {"text_encoder": ["toy", 3], "text": "a blue ball"}},
        "box": {"class_type": "BFSBoxToMask", "inputs": {"image": ["bg", 0], "x0": 16, "y0": 32, "x1": 36, "y1": 52}},
        "sample": {"class_type": "BFSBG2FGSample", "inputs": sample_inputs},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


def _latent(comfy, result) -> torch.Tensor:
    return load_file(str(comfy.file_path(result.files("save", kind="latents")[0])))["latent_tensor"]


@pytest.fixture(scope="module")
def exact(comfy):
    result = comfy.run(_graph(None, "step_cache/absent"), timeout=300)
    assert result.ok, result.error
    return _latent(comfy, result)


def test_zero_threshold_is_the_exact_sampler(comfy, exact):
    result = comfy.run(_graph(0.0, "step_cache/zero"), timeout=300)
    assert result.ok, result.error
    assert torch.equal(_latent(comfy, result), exact)


def test_a_threshold_changes_the_layer_a_little(comfy, exact):
    result = comfy.run(_graph(0.3, "step_cache/cached"), timeout=300)
    assert result.ok, result.error
    cached = _latent(comfy, result)
    rel = float((cached - exact).norm() / exact.norm())
    assert 0 < rel < 0.5, rel


def test_a_negative_threshold_is_refused_before_running(comfy):
    status, body = comfy.post_json("/prompt", {"prompt": _graph(-0.5, "step_cache/bad"), "client_id": comfy.client_id})
    assert status == 400 and "cache_threshold" in str(body), body
