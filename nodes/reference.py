"""Reference-guided layers: BFS Reference Mode (replace the caption, as the paper does, or append, as ComfyUI's
StyleModelApply does) and Toy Reference Image; the toy reference encoder behind ComfyUI's CLIP_VISION and STYLE_MODEL
interfaces, so stock CLIPVisionEncode and StyleModelApply run it exactly like SigLIP and Flux Redux.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.conditioning import ReferenceMode, apply_reference_mode
from ..bfs_core.toy.reference import ToyReferenceEncoder, preprocess, reference_image
from ..bfs_core.toy.world import COLOURS, SHAPES, SIZE
from .common import combo_value, flux_text, image_from_core, image_to_core


class ToyClipVision:
    """The toy vision encoder with ComfyUI's CLIP_VISION interface (what CLIPVisionEncode calls)."""

    def __init__(self, encoder: ToyReferenceEncoder):
        self.encoder = encoder

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = True):
        """ComfyUI IMAGE [B, H, W, C] -> an Output with `last_hidden_state` [B, 16, 64] (and `image_embeds`)."""
        pixels = preprocess(image_to_core(image, "image", channels=(3, 4))[:, :3], crop)
        hidden = self.encoder.vision(pixels)
        import comfy.clip_vision  # here, not at the top: tests import the node modules with stub comfy packages

        output = comfy.clip_vision.Output()
        output["last_hidden_state"] = hidden
        output["penultimate_hidden_states"] = hidden
        output["image_embeds"] = hidden.mean(dim=1)
        return output


class ToyStyleModel:
    """The toy Redux projection with ComfyUI's STYLE_MODEL interface (what StyleModelApply calls)."""

    def __init__(self, encoder: ToyReferenceEncoder):
        self.encoder = encoder

    @torch.no_grad()
    def get_cond(self, clip_vision_output) -> torch.Tensor:
        hidden = getattr(clip_vision_output, "last_hidden_state", None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[-1] != 64:
            got = None if not isinstance(hidden, torch.Tensor) else list(hidden.shape)
            raise ValueError(
                f"The toy style model needs the toy CLIP vision output (last_hidden_state [batch, 16, 64]) but got "
                f"{got}. Encode the reference with CLIPVisionEncode on the clip_vision of Load BFS Toy Model."
            )
        return self.encoder.redux(hidden.float())  # [B, 16, 32]: toy text tokens


class ReferenceModeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSReferenceMode",
            display_name="BFS Reference Mode",
            category="BFS/conditioning",
            description="How the reference tokens of StyleModelApply (Flux Redux) meet the caption: 'replace' keeps "
            "only the reference tokens (the paper's reference-guided synthesis: the caption embedding is "
            "substituted), 'append' keeps caption + reference tokens (what StyleModelApply gives). The pooled "
            "vector stays the caption's either way.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="StyleModelApply's output."),
                io.Conditioning.Input(
                    "caption", tooltip="The text CONDITIONING that went into StyleModelApply's `conditioning`."
                ),
                io.Combo.Input(
                    "reference_mode",
                    options=[m.value for m in ReferenceMode],
                    default=ReferenceMode.REPLACE.value,
                    tooltip="replace: reference tokens only (paper). append: caption tokens, then reference tokens.",
                ),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, caption, reference_mode) -> io.NodeOutput:
        mode = combo_value(ReferenceMode, reference_mode, "reference_mode")
        tokens, _ = flux_text(conditioning, "conditioning")
        caption_tokens, _ = flux_text(caption, "caption")
        joined = apply_reference_mode(tokens, caption_tokens.to(tokens.device), mode)
        return io.NodeOutput([[joined, conditioning[0][1].copy()]])


class ToyReferenceImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSToyReferenceImage",
            display_name="Toy Reference Image",
            category="BFS/toy",
            description=f"A {SIZE}×{SIZE} picture of one toy object in a scene of its own (its own background, sun, "
            "size and place): the toy world's reference image, for CLIPVisionEncode with the toy clip_vision.",
            inputs=[
                io.Combo.Input("colour", options=list(COLOURS), default="red"),
                io.Combo.Input("shape", options=list(SHAPES), default="cube"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Which scene the object is shown in."),
            ],
            outputs=[io.Image.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, colour, shape, seed) -> io.NodeOutput:
        for name, value, options in (("colour", colour, COLOURS), ("shape", shape, SHAPES)):
            if value not in options:  # ComfyUI does not check V3 combo values sent through the API
                raise ValueError(f"`{name}` must be one of {', '.join(options)} but got {value!r}.")
        return io.NodeOutput(image_from_core(reference_image(colour, shape, seed)))


class ReferenceNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ReferenceModeNode, ToyReferenceImage]
