"""Test-only sources, registered only when BFS_TEST_NODES=1.

ComfyUI's text-encoder loaders cannot load tiny text encoders, so the real-server tests feed the tiny BFS model
CONDITIONING with `BFSTestConditioning`: the same structure CLIPTextEncode gives ([[tokens [1, T, W], {"pooled_output":
[1, P]}]]), with optional image tokens appended after the text, as StyleModelApply does for Redux.

`BFSTestTensor` makes the bad inputs no stock node makes (tests/comfyui/test_bad_inputs_api.py): an IMAGE, MASK and
LATENT of any size, batch and channel count, optionally with one NaN or infinite value in it. The conditioning node can
poison its tokens the same way, repeat them over a batch, or leave out the pooled output. `BFSTestNaNModel` hands out
a copy of a BFS_MODEL whose prediction for one branch turns NaN at one step, to see the sampler stop there.
"""

from __future__ import annotations

import hashlib
from enum import Enum

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .loaders import BFS_MODEL


class Poison(str, Enum):
    NONE = "none"
    NAN = "nan"
    INF = "inf"


def _poisoned(x: torch.Tensor, poison: Poison) -> torch.Tensor:
    if poison != Poison.NONE:
        x.view(-1)[x.numel() // 2] = float(poison.value)  # the middle element
    return x


class TestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSTestConditioning",
            display_name="BFS Test Conditioning (tests only)",
            category="BFS/testing",
            inputs=[
                io.String.Input("text", default="a red cube", tooltip="Hashed into deterministic embeddings."),
                io.Int.Input("width", default=32, min=1, max=8192, tooltip="Token width (4096 for real Flux)."),
                io.Int.Input("pooled_width", default=32, min=1, max=8192, tooltip="Pooled width (768 for Flux)."),
                io.Int.Input("text_tokens", default=8, min=1, max=512, tooltip="Number of text tokens."),
                io.Int.Input("image_tokens", default=0, min=0, max=1024, tooltip="Redux-style appended tokens."),
                io.Combo.Input(
                    "poison",
                    options=[p.value for p in Poison],
                    default="none",
                    optional=True,
                    tooltip="Put one NaN/inf into the tokens.",
                ),
                io.Int.Input("batch", default=1, min=1, max=64, optional=True, tooltip="Repeat over a batch."),
                io.Boolean.Input("pooled", default=True, optional=True, tooltip="Off: no pooled_output."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(
        cls, text, width, pooled_width, text_tokens, image_tokens, poison="none", batch=1, pooled=True
    ) -> io.NodeOutput:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randn(1, text_tokens, width, generator=gen)
        if image_tokens:
            tokens = torch.cat([tokens, torch.randn(1, image_tokens, width, generator=gen)], dim=1)
        pooled_output = torch.randn(1, pooled_width, generator=gen)
        tokens = _poisoned(tokens.repeat(batch, 1, 1), Poison(poison))
        extra = {"pooled_output": pooled_output.repeat(batch, 1)} if pooled else {}
        return io.NodeOutput([[tokens, extra]])


class TestTensor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSTestTensor",
            display_name="BFS Test Tensor (tests only)",
            category="BFS/testing",
            inputs=[
                io.Int.Input("width", default=64, min=8, max=4096, tooltip="Pixels (the LATENT is width/8)."),
                io.Int.Input("height", default=64, min=8, max=4096, tooltip="Pixels (the LATENT is height/8)."),
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="Batch size."),
                io.Int.Input("channels", default=3, min=1, max=8, tooltip="IMAGE channels."),
                io.Float.Input("value", default=0.5, min=-10.0, max=10.0, step=0.01, tooltip="Fill value."),
                io.Combo.Input(
                    "poison",
                    options=[p.value for p in Poison],
                    default="none",
                    tooltip="Put one NaN/inf into each output.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Mask.Output(display_name="mask"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def execute(cls, width, height, batch, channels, value, poison) -> io.NodeOutput:
        poison = Poison(poison)
        image = _poisoned(torch.full((batch, height, width, channels), value), poison)
        mask = _poisoned(torch.full((batch, height, width), value), poison)
        latent = _poisoned(torch.full((batch, 16, height // 8, width // 8), value), poison)
        return io.NodeOutput(image, mask, {"samples": latent})


class NaNAtStep(torch.nn.Module):
    """Wraps a dual-branch model: its `branch` prediction is NaN at sampling step `step` (1-based) of every run."""

    def __init__(self, inner: torch.nn.Module, step: int, branch: str):
        super().__init__()
        self.inner, self.step, self.branch, self.calls = inner, step, branch, 0

    def forward(self, comp, fg, fill_cond, prompt_embeds, pooled, t_comp, t_fg, img_ids, guidance):
        self.calls = 1 if bool((t_fg == 1).all()) else self.calls + 1  # sigma 1: the first step of a run
        v_comp, v_fg = self.inner(comp, fg, fill_cond, prompt_embeds, pooled, t_comp, t_fg, img_ids, guidance)
        if self.calls == self.step and self.branch == "comp":
            v_comp = v_comp.clone()
            v_comp[:, 0, 0] = float("nan")  # [N, L, 64]: the first token's first channel
        elif self.calls == self.step:
            v_fg = v_fg.clone()
            v_fg[:, 0, 0] = float("nan")
        return v_comp, v_fg

    def __getattr__(self, name):  # dtype, device, config, latent_channels, check_conditioning, ...: the model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class TestNaNModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSTestNaNModel",
            display_name="BFS Test NaN Model (tests only)",
            category="BFS/testing",
            inputs=[
                BFS_MODEL.Input("bfs_model", tooltip="The model to copy (left unchanged)."),
                io.Int.Input("step", default=1, min=1, max=1000, tooltip="The step whose prediction turns NaN."),
                io.Combo.Input("branch", options=["comp", "fg"], default="fg", tooltip="Which branch."),
            ],
            outputs=[BFS_MODEL.Output(display_name="bfs_model")],
        )

    @classmethod
    def execute(cls, bfs_model, step, branch) -> io.NodeOutput:
        inner = NaNAtStep(bfs_model.patcher.model.inner, step, branch)
        return io.NodeOutput(type(bfs_model).wrap(inner, bfs_model.scheduler_config, f"{bfs_model.name} + NaN"))


class TestingNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TestConditioning, TestTensor, TestNaNModel]
