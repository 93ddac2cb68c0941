"""The sampler nodes' progress callback (nodes/common.progress) without ComfyUI: with a latent previewer it hands
ComfyUI's progress bar a preview of composite | layer x0 estimates each step; with none (previews off) it sends the
plain progress call. ComfyUI's modules are stubs that record what they are given."""

import sys
import types

import torch
from test_pipeline import _import_nodes_common

from bfs_core.sampling.flow_match import DenoiseStep, pack_latents


class RecordingBar:
    calls = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, *args):
        RecordingBar.calls.append(args)


class RecordingPreviewer:
    def __init__(self):
        self.latents = []

    def decode_latent_to_preview_image(self, preview_format, x0):
        self.latents.append(x0)
        return (preview_format, f"image {len(self.latents)}", 512)


def _progress(monkeypatch, previewer):
    common = _import_nodes_common(monkeypatch)
    comfy = sys.modules["comfy"]
    comfy.utils, comfy.model_management = sys.modules["comfy.utils"], sys.modules["comfy.model_management"]
    comfy.utils.ProgressBar = RecordingBar
    comfy.model_management.get_torch_device = lambda: torch.device("cpu")
    comfy.latent_formats = types.SimpleNamespace(Flux=lambda: "flux latent format")
    asked = []
    preview_module = types.ModuleType("latent_preview")
    preview_module.get_previewer = lambda device, fmt: asked.append((device, fmt)) or previewer
    monkeypatch.setitem(sys.modules, "latent_preview", preview_module)
    RecordingBar.calls = []
    callback, _ = common.progress(3)
    assert asked == [(torch.device("cpu"), "flux latent format")]  # ComfyUI's previewer for Flux latents
    return callback


def _step(seed: int) -> tuple[DenoiseStep, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    comp, fg = (torch.randn(2, 16, 4, 6, generator=gen) for _ in range(2))  # [N, C, h, w], two items
    packed = [pack_latents(x) for x in (comp, fg)]
    return DenoiseStep(packed[0] + 1, packed[1] + 1, packed[0], packed[1], 0.5, (4, 6)), comp, fg


def test_each_step_sends_composite_and_layer_estimates_side_by_side(monkeypatch):
    previewer = RecordingPreviewer()
    callback = _progress(monkeypatch, previewer)
    state, comp, fg = _step(0)
    callback(0, 3, state)
    callback(1, 3, state)
    assert RecordingBar.calls == [(1, 3, ("JPEG", "image 1", 512)), (2, 3, ("JPEG", "image 2", 512))]
    expected = torch.cat([comp[:1], fg[:1]], dim=-1)  # [1, 16, h, 2w]: the first item's composite | layer x0
    assert torch.equal(previewer.latents[0], expected)


def test_previews_off_sends_progress_only(monkeypatch):
    callback = _progress(monkeypatch, None)  # get_previewer returns None for --preview-method none
    callback(0, 3, _step(1)[0])
    assert RecordingBar.calls == [(1, 3)]
