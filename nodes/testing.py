"""A test-only CONDITIONING source, registered only when BFS_TEST_NODES=1.

ComfyUI's text-encoder loaders cannot load tiny text encoders, so the real-server tests feed the tiny BFS model
CONDITIONING with this node: the same structure CLIPTextEncode gives ([[tokens [1, T, W], {"pooled_output": [1, P]}]]),
with optional image tokens appended after the text, as StyleModelApply does for Redux.
"""

from __future__ import annotations

import hashlib

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


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
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, width, pooled_width, text_tokens, image_tokens) -> io.NodeOutput:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randn(1, text_tokens, width, generator=gen)
        if image_tokens:
            tokens = torch.cat([tokens, torch.randn(1, image_tokens, width, generator=gen)], dim=1)
        pooled = torch.randn(1, pooled_width, generator=gen)
        return io.NodeOutput([[tokens, {"pooled_output": pooled}]])


class TestingNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TestConditioning]
