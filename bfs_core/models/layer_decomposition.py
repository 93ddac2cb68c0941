"""Outpaint-and-Remove layer decomposition on FLUX.1-Fill-dev: image + mask -> RGBA foreground + clean background.

Sequence design (the paper's "two separate sequences, one per layer, in one DiT call"):
    the two sequences are the two halves of one transformer batch, laid out exactly as the BFS dual-branch model lays
    out its branches (`dual_flux.py`): rows [0, N) are the **background** sequence (dual_flux branch name `comp`),
    rows [N, 2N) the **foreground** sequence (branch `fg`). They interact through dual_flux's joint module: in every
    single-stream block each sequence's queries attend to the other sequence's keys/values (cross-layer attention at
    aligned positions) and the message is added to the block's attention output through a zero-initialised post
    projection. We chose this over one joint sequence of 2L tokens (with a position offset between the layers)
    because
      * at the initial values the background rows are *exactly* Flux-Fill's computation (the joint message is an
        exact zero and the LoRA deltas are exact zeros); a joint sequence would let background tokens attend to
        foreground tokens from step 0 and only approximate Flux-Fill;
      * attention cost is the same 4·L² scores either way, the whole machinery (per-branch LoRA, joint module,
        fp8 storage, gradient checkpointing) is already written and tested once in `dual_flux.py`.
    The price: the LoRA is per layer (each sequence has its own adapter, BranchLoRALinear), i.e. twice the
    parameters of the paper's single adapter at the same rank; it also lets the two very different tasks (removal vs
    outpainting with alpha) adapt separately.

Per-token channel layout of both sequences (`CHANNEL_LAYOUT`, 64 + 320 + F = 448 with the default F = 64):
    [noisy latent 64 | context image latent 64 | context mask 256 | fused multi-modal context F]
    background context = Flux-Fill's own: latent of I·(1 − M) and the packed mask M;
    foreground context = the paper's c^f_{I−M}: latent of I·M (what to preserve of the object) and the packed mask M.
    The first 384 channels are Flux-Fill's input layout, so the grown input projection (`x_embedder`, trainable) keeps
    the pretrained columns and gets zero columns for the fused context.

Multi-modal context: edge (Canny), segmentation and depth maps (`bfs_core/conditioning.py`) are VAE-encoded like
images and packed into tokens; `MultiModalLatentFusion` (`multimodal_fusion.py`) summarises all of them with a
constant number of latent queries (read: latents <- all modality tokens; process: latent self-attention; write:
every image position <- the latents), so time and memory are linear in the number of tokens. Absent modalities are
left out; with none, the fused channels are zero (the paper's "w/o multi-modal" ablation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from .dual_flux import (
    DualBranchConfig,
    _as_rows,
    bfs_state_dict,
    dual_branch_config,
    parameter_group,
    patch_dual_branch,
    prepare_for_inference,
    reset_inference_state,
    run_two_branches,
)
from .multimodal_fusion import LATENT_CHANNELS, MODALITIES, MultiModalLatentFusion


logger = logging.getLogger(__name__)

FORMAT_NAME = "bfs-decomposition"
FORMAT_VERSION = "1"
# Processing short side of decomposition: the paper trains and evaluates at 1024² (training/configs/decompose.yaml
# `resolution`); the CLI, the pipeline and the node all default to it.
DEFAULT_SHORT_SIDE = 1024
FILL_CONTEXT_CHANNELS = 320  # packed image latent 64 | packed mask 256
FILL_IN_CHANNELS = LATENT_CHANNELS + FILL_CONTEXT_CHANNELS  # 384, FLUX.1-Fill-dev's input


@dataclass(frozen=True)
class DecompositionConfig:
    """The decomposition model on top of a Flux-Fill transformer.

    Args:
        lora_rank: rank of the per-layer LoRA on every attention and feed-forward Linear (paper: 256; 128 and 1024
            are its ablations).
        lora_alpha: LoRA alpha (`None` = rank, scale 1).
        joint_rank: rank of the cross-layer (joint) module's direction-specific LoRAs.
        joint_placement: `"single"` (the 38 single-stream blocks) or `"all"` blocks get the joint module.
        joint_post: `"linear"` (zero-init D×D) or `"mlp"` post projection of the joint messages.
        modalities: the multi-modal contexts the fusion module knows (subset of `MODALITIES`, in order).
        fusion_dim: width of the fusion module.
        fusion_latents: number of latent queries (constant, independent of the image size).
        fusion_heads: attention heads of the fusion module.
        fusion_channels: channels the fusion output adds to every token (F in the channel layout).
        noise: starting noise of the two sequences: `"independent"` draws or one `"shared"` draw.
    """

    lora_rank: int = 256
    lora_alpha: float | None = None
    joint_rank: int = 16
    joint_placement: str = "single"
    joint_post: str = "linear"
    modalities: tuple[str, ...] = MODALITIES
    fusion_dim: int = 256
    fusion_latents: int = 32
    fusion_heads: int = 4
    fusion_channels: int = 64
    noise: str = "independent"

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        checks = [
            ("lora_rank", self.lora_rank >= 1, "an integer >= 1"),
            ("joint_rank", self.joint_rank >= 1, "an integer >= 1"),
            ("modalities", set(self.modalities) <= set(MODALITIES), f"a subset of {list(MODALITIES)}"),
            ("fusion_dim", self.fusion_dim % max(self.fusion_heads, 1) == 0, "a multiple of fusion_heads"),
            ("fusion_dim", self.fusion_dim % 4 == 0, "a multiple of 4 (2-D sine positions)"),
            ("fusion_latents", self.fusion_latents >= 1, "an integer >= 1"),
            ("fusion_channels", self.fusion_channels >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"DecompositionConfig `{name}` must be {expected} but got {getattr(self, name)!r}.")
        DualBranchConfig(**self.dual_fields())  # validates placement, post and noise

    def dual_fields(self) -> dict:
        return dict(
            content_rank=self.lora_rank,
            content_alpha=self.lora_alpha,
            joint_rank=self.joint_rank,
            joint_placement=self.joint_placement,
            joint_post=self.joint_post,
            noise=self.noise,
        )

    @property
    def in_channels(self) -> int:
        return FILL_IN_CHANNELS + self.fusion_channels

    @property
    def condition_channels(self) -> int:
        """Channels of the per-sample condition tensor: bg context 320 | fg context 320 | fused F."""
        return 2 * FILL_CONTEXT_CHANNELS + self.fusion_channels

    def channel_layout(self) -> list[tuple[str, int]]:
        return [
            ("noisy_latent", LATENT_CHANNELS),
            ("context_image_latent", 64),
            ("context_mask", 256),
            ("fused_multimodal", self.fusion_channels),
        ]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecompositionConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Decomposition config has unknown fields {unknown}; this pack knows {sorted(known)}.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------------
# Input projection grown to the new channel count


def grow_input_projection(transformer: FluxTransformer2DModel, in_channels: int) -> nn.Linear:
    """Replace `x_embedder` by a Linear with `in_channels` inputs: old columns copied, new columns zero."""
    old = transformer.x_embedder
    if old.in_features == in_channels:
        return old
    if old.in_features != FILL_IN_CHANNELS or in_channels < FILL_IN_CHANNELS:
        raise ValueError(
            f"The transformer's input projection must have {FILL_IN_CHANNELS} inputs (FLUX.1-Fill-dev) to grow to "
            f"{in_channels}, but has {old.in_features}. Load FLUX.1-Fill-dev as the base."
        )
    new = nn.Linear(in_channels, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        new.bias.copy_(old.bias)
    transformer.x_embedder = new
    return new


def _group(name: str) -> str:
    """Trainable group of a LayerDecomposition parameter: lora_bg, lora_fg, joint, input_proj, fusion, or base."""
    if name.startswith("fusion."):
        return "fusion"
    if name.startswith("transformer.x_embedder."):
        return "input_proj"
    inner = parameter_group(name.removeprefix("transformer."))
    return {"comp": "lora_bg", "fg": "lora_fg", "joint": "joint"}.get(inner, "base")


TRAINABLE_GROUPS = ("lora_bg", "lora_fg", "joint", "input_proj", "fusion")


# ---------------------------------------------------------------------------------------------------------------------
# The model


class LayerDecomposition(nn.Module):
    """Outpaint-and-Remove: a Flux-Fill transformer with per-layer LoRA, the joint module between the background and
    foreground sequences, a grown input projection and the multi-modal fusion module.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` with the Fill layout (384 inputs); patched in place.
        config: a `DecompositionConfig`.
    """

    has_foreground = True

    def __init__(self, transformer: FluxTransformer2DModel, config: DecompositionConfig):
        super().__init__()
        dual = DualBranchConfig(**config.dual_fields())
        current = dual_branch_config(transformer)
        if current is None:
            patch_dual_branch(transformer, dual)
        elif current != dual:
            raise ValueError(f"The transformer is already patched with {current}, not {dual}.")
        grow_input_projection(transformer, config.in_channels)
        self.transformer = transformer
        self.config = config
        like = transformer.x_embedder.weight
        self.fusion = MultiModalLatentFusion(
            modalities=config.modalities,
            dim=config.fusion_dim,
            num_latents=config.fusion_latents,
            heads=config.fusion_heads,
            out_channels=config.fusion_channels,
        ).to(like.device)
        with torch.no_grad():  # in place rather than ModelMixin.to(dtype), which warns about keep-in-fp32 modules
            for param in self.fusion.parameters():
                param.data = param.data.to(like.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def latent_channels(self) -> int:
        return LATENT_CHANNELS

    @property
    def fusion_channels(self) -> int:
        return self.config.fusion_channels

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter that is not frozen Flux: LoRAs, joint modules, the input projection, the fusion module."""
        out = {f"transformer.{k}": v for k, v in bfs_state_dict(self.transformer).items()}
        out.update({f"transformer.x_embedder.{k}": v for k, v in self.transformer.x_embedder.state_dict().items()})
        out.update({f"fusion.{k}": v for k, v in self.fusion.state_dict().items()})
        return out

    def set_trainable(self, groups: set[str] | frozenset[str] = frozenset(TRAINABLE_GROUPS)) -> list[nn.Parameter]:
        unknown = set(groups) - set(TRAINABLE_GROUPS)
        if unknown:
            raise ValueError(f"Trainable groups must be among {list(TRAINABLE_GROUPS)} but got {sorted(unknown)}.")
        params = []
        for name, param in self.named_parameters():
            param.requires_grad_(_group(name) in groups)
            if param.requires_grad:
                params.append(param)
        return params

    def fuse(
        self, modality_tokens: Mapping[str, torch.Tensor], query_tokens: torch.Tensor, img_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.fusion(modality_tokens, query_tokens, img_ids)

    def forward(
        self,
        bg_latents: torch.Tensor,
        fg_latents: torch.Tensor,
        condition: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        timestep_bg: torch.Tensor | float,
        timestep_fg: torch.Tensor | float,
        img_ids: torch.Tensor,
        guidance: torch.Tensor | float = 30.0,
        txt_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities of both sequences in one transformer call (the call signature of `sample_dual`'s model).

        Args:
            bg_latents, fg_latents: packed noisy latents [N, L, 64] (background: Flux latents; foreground: the RGBA
                VAE's latents).
            condition: [N, L, 320 + 320 + F] = background context | foreground context | fused multi-modal context.
            prompt_embeds [N, T, J], pooled [N, P]: text conditioning (an empty prompt is fine).
            timestep_bg, timestep_fg: sigma per sequence (number or [N]).
            img_ids: [L, 3]; txt_ids: [T, 3] (zeros when None); guidance: 30 for Fill.

        Returns:
            (v_bg, v_fg), each [N, L, 64].
        """
        n, length, channels = bg_latents.shape
        if fg_latents.shape != bg_latents.shape or channels != LATENT_CHANNELS:
            raise ValueError(
                f"`bg_latents` and `fg_latents` must both be [N, L, {LATENT_CHANNELS}] but got "
                f"{list(bg_latents.shape)} and {list(fg_latents.shape)}."
            )
        expected = (n, length, self.config.condition_channels)
        if tuple(condition.shape) != expected:
            raise ValueError(
                f"`condition` must be {list(expected)} (bg context 320 | fg context 320 | fused "
                f"{self.config.fusion_channels}) but got {list(condition.shape)}."
            )
        if prompt_embeds.shape[0] != n or pooled.shape[0] != n:
            raise ValueError(f"Text conditioning has batch {prompt_embeds.shape[0]}/{pooled.shape[0]}, expected {n}.")
        c = FILL_CONTEXT_CHANNELS
        bg_ctx, fg_ctx, fused = condition[..., :c], condition[..., c : 2 * c], condition[..., 2 * c :]
        # Background rows take dual_flux's `comp` place, foreground rows its `fg` place: [N, L, 64 + 320 + F] each.
        return run_two_branches(
            self.transformer,
            torch.cat([bg_latents, bg_ctx, fused], -1).to(self.dtype),
            torch.cat([fg_latents, fg_ctx, fused], -1).to(self.dtype),
            prompt_embeds,
            pooled,
            timestep_bg,
            timestep_fg,
            img_ids,
            guidance,
            txt_ids,
        )


class FluxFillBaseline(nn.Module):
    """Plain FLUX.1-Fill-dev behind the decomposition call signature: the background sequence only (object removal
    by inpainting, the paper's baseline row). The foreground output mirrors the background and is never decoded."""

    has_foreground = False
    fusion_channels = 0

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__()
        if transformer.x_embedder.in_features != FILL_IN_CHANNELS:
            raise ValueError(
                f"The baseline needs plain FLUX.1-Fill-dev ({FILL_IN_CHANNELS} inputs) but the transformer has "
                f"{transformer.x_embedder.in_features}. Load the base model without decomposition weights."
            )
        self.transformer = transformer
        self.config = DecompositionConfig()  # only `noise` is read (by the sampler)

    dtype = LayerDecomposition.dtype
    device = LayerDecomposition.device
    latent_channels = LayerDecomposition.latent_channels

    def fuse(self, modality_tokens, query_tokens: torch.Tensor, img_ids) -> torch.Tensor:
        return query_tokens.new_zeros(*query_tokens.shape[:2], 0)

    def forward(
        self,
        bg_latents,
        fg_latents,
        condition,
        prompt_embeds,
        pooled,
        timestep_bg,
        timestep_fg,
        img_ids,
        guidance=30.0,
        txt_ids=None,
    ):
        n = bg_latents.shape[0]
        hidden = torch.cat([bg_latents, condition[..., :FILL_CONTEXT_CHANNELS]], -1).to(self.dtype)
        if txt_ids is None:
            txt_ids = prompt_embeds.new_zeros(prompt_embeds.shape[1], 3)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            timestep=_as_rows(timestep_bg, n, "timestep_bg", hidden).to(hidden.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=_as_rows(guidance, n, "guidance", hidden) if self.transformer.config.guidance_embeds else None,
            return_dict=False,
        )[0]
        return out, out


# ---------------------------------------------------------------------------------------------------------------------
# Save / load (our safetensors format)


def save_decomposition_weights(model: LayerDecomposition, path: str | os.PathLike) -> Path:
    """Write the trainable weights with metadata (format, config, channel layout, contexts) as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "channel_layout": json.dumps(model.config.channel_layout()),
        "contexts": json.dumps(
            {"image_mask": ["background", "foreground"], "multimodal": list(model.config.modalities)}
        ),
        "lora_rank": str(model.config.lora_rank),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_decomposition_weights(
    path: str | os.PathLike, name: str = "weights"
) -> tuple[DecompositionConfig, dict[str, torch.Tensor]]:
    from ..errors import UserInputError, open_safetensors

    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        raise UserInputError(
            f"`{name}` must be a decomposition .safetensors file but got {str(path)!r}. Train one with "
            "`python -m training decompose` (or write a tiny one with `bfs_core.tiny.write_tiny_decomposition`)."
        )
    with open_safetensors(path, name) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise UserInputError(
                f"`{name}` file {str(path)!r} is not a decomposition weights file (metadata format "
                f"{metadata.get('format')!r}, expected {FORMAT_NAME!r}). BFS weights load with Load BFS; this needs "
                "Outpaint-and-Remove weights."
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = DecompositionConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(
            f"`{name}` file {str(path)!r} has no readable `config` metadata ({err!r}): re-download it."
        ) from err
    return config, tensors


def apply_decomposition_weights(
    transformer: FluxTransformer2DModel, path: str | os.PathLike, *, source: str | None = None, name: str = "weights"
) -> LayerDecomposition:
    """Build the decomposition model around `transformer` from the file's config and load its weights exactly."""
    config, tensors = read_decomposition_weights(path, name)
    model = LayerDecomposition(transformer, config)
    expected = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"`{source or path}` does not fit this base model: {len(missing)} missing (first {missing[:3]}), "
            f"{len(unexpected)} unexpected (first {unexpected[:3]}), {len(wrong)} of the wrong shape (first "
            f"{wrong[:3]}). Use the FLUX.1-Fill-dev base the weights were trained on."
        )
    dtype = model.dtype
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"Unexpected keys while loading `{path}`: {result.unexpected_keys[:5]}.")
    prepare_for_inference(transformer, fold=False)  # skips joint modules that are exactly zero; numerics unchanged
    logger.info(
        "Loaded decomposition weights %s: LoRA rank %d, joint rank %d (%s), modalities %s, %d tensors",
        path,
        config.lora_rank,
        config.joint_rank,
        config.joint_placement,
        list(config.modalities),
        len(tensors),
    )
    return model


def load_decomposition_model(
    base: str | os.PathLike,
    weights: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    names: tuple[str, str] = ("base", "weights"),
) -> LayerDecomposition:
    """One call: FLUX.1-Fill-dev (any layout `load_flux_fill_transformer` reads) + decomposition weights.

    `names` are the two inputs as the user knows them (`--base`, `--weights`), named in error messages."""
    from ..errors import UserInputError
    from .flux_fill_loading import load_flux_fill_transformer

    if not Path(weights).exists():
        raise UserInputError(
            f"`{names[1]}` path {str(weights)!r} does not exist; pass the decomposition .safetensors file."
        )
    transformer = load_flux_fill_transformer(base, torch_dtype=torch_dtype, device=device, name=names[0])
    return apply_decomposition_weights(transformer, weights, name=names[1]).to(device)


def initial_decomposition_model(
    transformer: FluxTransformer2DModel, config: DecompositionConfig
) -> LayerDecomposition:
    """A fresh (untrained) model: adapters and new input columns at their initial values; ready for training."""
    model = LayerDecomposition(transformer, config)
    reset_inference_state(transformer)
    return model


__all__ = [
    "DecompositionConfig",
    "FluxFillBaseline",
    "LayerDecomposition",
    "apply_decomposition_weights",
    "initial_decomposition_model",
    "load_decomposition_model",
    "read_decomposition_weights",
    "save_decomposition_weights",
]
