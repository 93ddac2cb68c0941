"""The embedded toy model in ComfyUI: Load BFS Toy Model, Toy Text Encode and Toy Background.

The toy model (`bfs_core/toy`, 64×64 scenes) ships inside the pack, so a fresh install runs a whole BFS graph on CPU
with no download. Its VAE and text encoders are far smaller than anything ComfyUI's VAELoader/DualCLIPLoader accept,
so the loader hands out the toy VAE behind ComfyUI's VAE interface (it plugs into BG2FG Sample, Extract Foreground,
RGBA Decode, and ComfyUI's VAEEncode/VAEDecode) and its own text encoder for Toy Text Encode, whose CONDITIONING has
Flux's structure at toy width.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..bfs_core.pipelines.codec import DiffusersFluxVAE
from ..bfs_core.toy.demo import background_image
from ..bfs_core.toy.models import NEUTRAL_PROMPT, encode_toy_prompt, load_toy
from ..bfs_core.toy.reference import load_toy_reference
from ..bfs_core.toy.world import COLOURS, SHAPES, SIZE, vocabulary
from .common import PatchedModel, image_from_core, normalized_from_raw, raw_from_normalized
from .loaders import BFS_MODEL, RGBA_VAE
from .reference import ToyClipVision, ToyStyleModel


TOY_TEXT_ENCODER = io.Custom("BFS_TOY_TEXT_ENCODER")
CATEGORY = "BFS/toy"


class ToyVAE:
    """The toy VAE with ComfyUI's VAE interface: `encode(pixels [B, H, W, C]) -> LATENT samples` and `decode`.

    LATENT samples follow ComfyUI's Flux convention (raw VAE latents); the toy VAE's own normalisation maps to the
    same normalised space the BFS model works in, so the pack's nodes treat it exactly like the real Flux VAE.
    """

    latent_channels = 16
    downscale_ratio = upscale_ratio = 8

    def __init__(self, codec: DiffusersFluxVAE):
        self.codec = codec

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return raw_from_normalized(self.codec.encode_images(pixels[..., :3].movedim(-1, 1).float()))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_latents(normalized_from_raw(samples.float())).movedim(1, -1).float().cpu()

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio


class ToyModelHandle(PatchedModel):
    """The toy model's BFS_MODEL: the sampling nodes see this type and run it through `bfs_core.toy.guard`, which
    maps any image into the 64×64 toy world and back and warns about boxes the model was not trained on."""


class LoadToyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSLoadToyModel",
            display_name="Load BFS Toy Model",
            category=CATEGORY,
            description="The tiny BFS model shipped inside this pack (64×64 toy world: a sky, a ground, a sun; "
            "coloured cubes, balls, cones and pillars with shadows). No download; runs on CPU in "
            "seconds. Use it with Toy Background and Toy Text Encode to try every BFS node. It was "
            "trained at 64×64: the samplers resize any image into that world and back, and warn on the "
            "node when a box is too small, too large or off the ground.",
            inputs=[],
            outputs=[
                BFS_MODEL.Output(display_name="bfs_model", tooltip="For BG2FG Sample / Extract Foreground."),
                io.Vae.Output(display_name="vae", tooltip="The toy Flux-VAE stand-in (16 latent channels)."),
                RGBA_VAE.Output(display_name="rgba_vae", tooltip="The toy RGBA decoder, for RGBA Decode."),
                TOY_TEXT_ENCODER.Output(display_name="text_encoder", tooltip="For Toy Text Encode."),
                io.ClipVision.Output(
                    display_name="clip_vision", tooltip="The toy reference image encoder, for CLIPVisionEncode."
                ),
                io.StyleModel.Output(
                    display_name="style_model", tooltip="The toy Redux projection, for StyleModelApply."
                ),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        pipe, rgba = load_toy()
        model = ToyModelHandle.wrap(pipe.model, pipe.scheduler_config, "BFS toy model")
        reference = load_toy_reference()
        return io.NodeOutput(
            model, ToyVAE(pipe.codec), rgba, pipe.text_encoders, ToyClipVision(reference), ToyStyleModel(reference)
        )


class ToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSToyTextEncode",
            display_name="Toy Text Encode",
            category=CATEGORY,
            description="A toy prompt -> CONDITIONING (Flux's structure: T5-like tokens + pooled CLIP-like vector).",
            inputs=[
                TOY_TEXT_ENCODER.Input("text_encoder", tooltip="From Load BFS Toy Model."),
                io.Combo.Input(
                    "text",
                    options=vocabulary() + [NEUTRAL_PROMPT],
                    default="a red cube",
                    tooltip=f"'a <colour> <shape>': colours {', '.join(COLOURS)}; shapes "
                    f"{', '.join(SHAPES)}; or '{NEUTRAL_PROMPT}' with a reference image (StyleModelApply). The toy "
                    "model knows nothing else.",
                ),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, text) -> io.NodeOutput:
        if text not in vocabulary() + [NEUTRAL_PROMPT]:  # ComfyUI 0.3.75 does not check V3 combo values sent via API
            raise ValueError(
                f"`text` must be one of the toy model's prompts ('a <colour> <shape>': colours "
                f"{', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; or '{NEUTRAL_PROMPT}') but got {text!r}."
            )
        embeds, pooled = encode_toy_prompt(text_encoder, text)
        return io.NodeOutput([[embeds.float(), {"pooled_output": pooled.float()}]])


class ToyBackground(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BFSToyBackground",
            display_name="Toy Background",
            category=CATEGORY,
            description=f"A {SIZE}×{SIZE} toy-world background: sky, ground and a sun whose side and height set "
            "where shadows fall and how long they are.",
            inputs=[io.Int.Input("seed", default=3, min=0, max=2**31 - 1, tooltip="Which background.")],
            outputs=[io.Image.Output(display_name="background")],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(image_from_core(background_image(seed)))


class ToyNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadToyModel, ToyTextEncode, ToyBackground]
