"""RGBA decoding of Flux latents: the BFS release "transparency VAE" and the single format-detecting entry point.

Two on-disk formats decode a Flux latent to a straight-alpha RGBA image:

* ``bfs-release`` - the BFS release's transparency VAE (``shared/specs/bfs-official-release.md`` §4): a diffusers
  ``AutoencoderKL`` with 4 input/output channels (R, G, B, A in [-1, 1], straight alpha) and 16 latent channels, with
  its own ``scaling_factor``/``shift_factor``. Read from a diffusers folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) or from one ``.safetensors`` file whose config is inferred from the tensor
  shapes; what shapes cannot tell (``scaling_factor``, ``shift_factor``, ``norm_num_groups``) comes from the file's
  ``config`` metadata, a ``config.json``/``<stem>.json`` beside it, or ``config_overrides``.
* ``layerdiffuse-flux`` - the LayerDiffuse-Flux ``TransparentVAE.pth`` (:mod:`bfs_core.models.transparent_vae`).

Latent convention (shared by every module of the pack): a *normalised* Flux latent is
``(raw - shift_factor) * scaling_factor``, 16 channels, ``[B, 16, H/8, W/8]``. Latent files written by the
sampler (``LATENT.safetensors``) hold one tensor named ``latent`` in that space, with metadata
``{"space": "flux_normalized"}``.
The release VAE decodes ``latent / its scaling_factor + its shift_factor`` (release §3.8); the LayerDiffuse decoder
de-normalises with the FLUX.1 VAE constants and also needs the Flux-VAE RGB decode of the latent.

Every decoder returned by :func:`load_rgba_decoder` has ``decode(latent, rgb=None, **options) -> [B, 4, H, W]``
straight-alpha RGBA in [0, 1] (R, G, B, A), ``needs_rgb``, ``format_name`` and ``encode``.
"""

import json
import logging
import pathlib
from typing import Protocol, runtime_checkable

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import UserInputError, open_safetensors, reading_folder
from ..finite import check_finite
from .transparent_vae import (
    TransparentVAE,
    read_state_dict,
)


logger = logging.getLogger(__name__)

RELEASE_FORMAT = "bfs-release"
LAYERDIFFUSE_FORMAT = TransparentVAE.format_name
LATENT_SPACE = "flux_normalized"
# Config fields of the release VAE that tensor shapes cannot reveal.
NON_SHAPE_FIELDS = ("scaling_factor", "shift_factor", "norm_num_groups")


@runtime_checkable
class RGBADecoder(Protocol):
    """What :func:`load_rgba_decoder` returns, whatever the file format."""

    format_name: str
    needs_rgb: bool

    def decode(self, latent: torch.Tensor, rgb: torch.Tensor | None = None, **options) -> torch.Tensor: ...

    def encode(self, rgba: torch.Tensor, **options) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------------
# latent files


def save_latent_file(path: str | pathlib.Path, latent: torch.Tensor) -> pathlib.Path:
    """Write a normalised Flux latent [B, 16, h, w] as ``{"latent": ...}`` with ``space=flux_normalized`` metadata."""
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        save_file({"latent": latent.detach().float().cpu().contiguous()}, str(tmp), metadata={"space": LATENT_SPACE})
    return path


def load_latent_file(path: str | pathlib.Path, name: str = "latent") -> torch.Tensor:
    """Read a latent file written by :func:`save_latent_file` (or the sampler) -> [B, 16, h, w] float32."""
    path = pathlib.Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise UserInputError(
            f"`{name}` file {str(path)!r} must be an existing .safetensors file holding a `latent` tensor (as "
            "`generate` writes: fg_latent.safetensors)."
        )
    with open_safetensors(path, name) as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        if "latent" not in keys:
            raise UserInputError(
                f"`{name}` file {str(path)!r} must hold a tensor named `latent` (a latent file `generate` writes) but "
                f"has {keys[:5]}."
            )
        latent = f.get_tensor("latent").float()
    space = metadata.get("space", LATENT_SPACE)
    if space != LATENT_SPACE:
        raise ValueError(
            f"`{name}` file {str(path)!r} says space={space!r}; expected {LATENT_SPACE!r} (normalised Flux latents)."
        )
    if latent.ndim == 3:
        latent = latent.unsqueeze(0)
    if latent.ndim != 4 or latent.shape[1] != 16:
        raise ValueError(f"`latent` in {str(path)!r} must be [B, 16, H/8, W/8] but is {tuple(latent.shape)}.")
    return latent


# ---------------------------------------------------------------------------------------------------------------
# BFS release transparency VAE


def is_autoencoder_kl_state_dict(keys: list[str] | set[str]) -> bool:
    keys = set(keys)
    return {"encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"} <= keys and any(
        k.startswith("decoder.up_blocks.") for k in keys
    )


def infer_release_vae_config(
    state_dict: dict[str, torch.Tensor], known: dict | None = None, source: str = "state dict"
) -> dict:
    """Recover an ``AutoencoderKL`` config from diffusers-layout tensor shapes plus ``known`` non-shape fields.

    Raises a ValueError naming each field that neither the shapes nor ``known`` provide.
    """
    keys = list(state_dict)
    if not is_autoencoder_kl_state_dict(keys):
        if any(k.startswith("encoder.down.") for k in keys):
            raise ValueError(
                f"{source} is in the original (non-diffusers) VAE key layout (`encoder.down.N.block...`). Save it "
                "as a diffusers AutoencoderKL (folder or diffusion_pytorch_model.safetensors) first."
            )
        raise ValueError(
            f"{source} is not a diffusers AutoencoderKL state dict (no encoder/decoder conv_in/conv_out)."
        )
    levels = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.down_blocks.")})
    widths = tuple(int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    config = {
        "in_channels": int(state_dict["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(state_dict["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": widths,
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "layers_per_block": len({k.split(".")[4] for k in keys if k.startswith("encoder.down_blocks.0.resnets.")}),
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in keys),
    }
    known = dict(known or {})
    for field in ("force_upcast", "sample_size", "act_fn", "latents_mean", "latents_std"):
        if field in known:
            config[field] = known[field]
    if (config["in_channels"], config["out_channels"], config["latent_channels"]) != (4, 4, 16):
        raise UserInputError(
            f"{source} is not an RGBA VAE: it is an AutoencoderKL with {config['in_channels']}/"
            f"{config['out_channels']} in/out and {config['latent_channels']} latent channels"
            f"{_rgb_vae_hint(config)}, but an RGBA VAE for Flux latents has 4/4 and 16. Pass the BFS release "
            "transparency VAE or LayerDiffuse's TransparentVAE."
        )
    missing = [f for f in NON_SHAPE_FIELDS if known.get(f) is None]
    if missing == ["norm_num_groups"] and all(w % 32 == 0 for w in widths):
        known["norm_num_groups"] = 32  # the diffusers default; the only other field shapes cannot show
        missing = []
    if missing:
        raise ValueError(
            f"{source}: the shapes give the architecture but not {missing}. Put them in a `config.json` (or "
            f"`<file stem>.json`) beside the file, in the safetensors metadata key `config`, or pass "
            f"`config_overrides={{...}}` (CLI: --scaling-factor/--shift-factor/--norm-num-groups)."
        )
    config.update({f: known[f] for f in NON_SHAPE_FIELDS})
    return config


def _rgb_vae_hint(config) -> str:
    if config["in_channels"] == 3 and config["latent_channels"] == 4:
        return " (an SD1.5/SDXL-style RGB VAE)"
    if config["in_channels"] == 3 and config["latent_channels"] == 16:
        return " (the FLUX.1 RGB VAE)"
    return ""


def _single_file_known_config(path: pathlib.Path, metadata: dict[str, str], overrides: dict | None) -> dict:
    known: dict = {}
    for sidecar in (path.with_suffix(".json"), path.parent / "config.json"):
        if sidecar.is_file():
            known.update(json.loads(sidecar.read_text()))
            break
    if "config" in metadata:
        known.update(json.loads(metadata["config"]))
    known.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return known


class ReleaseTransparencyVAE:
    """The BFS release transparency VAE: 16-channel Flux latent <-> straight-alpha RGBA.

    Args:
        vae: A diffusers ``AutoencoderKL`` with ``out_channels == 4`` and ``latent_channels == 16``.
    """

    format_name = RELEASE_FORMAT
    needs_rgb = False

    def __init__(self, vae: AutoencoderKL, source: str = "The VAE"):
        cfg = vae.config
        problems = []
        if cfg.latent_channels != 16:
            problems.append(f"latent_channels={cfg.latent_channels} (expected 16, Flux latents)")
        if cfg.out_channels != 4 or cfg.in_channels != 4:
            problems.append(f"in/out_channels={cfg.in_channels}/{cfg.out_channels} (expected 4/4, RGBA)")
        if cfg.shift_factor is None:
            problems.append("shift_factor=None (expected a number)")
        if problems:
            raise UserInputError(
                f"{source} is not an RGBA VAE (BFS transparency VAE){_rgb_vae_hint(cfg)}: {'; '.join(problems)}. "
                "Pass the BFS release transparency VAE or LayerDiffuse's TransparentVAE."
            )
        self.vae = vae.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def to(self, *args, **kwargs) -> "ReleaseTransparencyVAE":
        self.vae.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, rgb: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Normalised Flux latent [B,16,H/8,W/8] -> straight RGBA [B,4,H,W] in [0,1]; ``rgb`` is not used."""
        if latent.ndim != 4 or latent.shape[1] != 16:
            raise ValueError(f"`latent` must be [B, 16, H/8, W/8] but got {tuple(latent.shape)}.")
        check_finite("latent", latent, "the foreground latent to decode")
        if options:
            logger.debug("bfs-release decoder ignores options %s", sorted(options))
        z = latent.float() / self.scaling_factor + self.shift_factor
        out = self.vae.decode(z.to(self.device, self.dtype)).sample
        return (out.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, rgba: torch.Tensor, **options) -> torch.Tensor:
        """Straight RGBA [B,4,H,W] in [0,1] -> normalised Flux latent (posterior mean) [B,16,H/8,W/8]."""
        if rgba.ndim != 4 or rgba.shape[1] != 4:
            raise ValueError(f"`rgba` must be [B, 4, H, W] in [0, 1] but got {tuple(rgba.shape)}.")
        x = (rgba.float().clamp(0, 1) * 2 - 1).to(self.device, self.dtype)
        raw = self.vae.encode(x).latent_dist.mean.float()
        return (raw - self.shift_factor) * self.scaling_factor

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path, name: str = "rgba_vae", **kwargs) -> "ReleaseTransparencyVAE":
        folder = pathlib.Path(folder)
        if not (folder / "config.json").is_file():
            raise UserInputError(
                f"`{name}` folder {str(folder)!r} must be a diffusers AutoencoderKL folder with a config.json."
            )
        with reading_folder(folder, name, "a diffusers AutoencoderKL folder"):
            vae = AutoencoderKL.from_pretrained(str(folder), **kwargs)
        return cls(vae, source=f"`{name}` folder {str(folder)!r}")

    @classmethod
    def from_single_file(
        cls,
        path: str | pathlib.Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, str] | None = None,
        config_overrides: dict | None = None,
        name: str = "rgba_vae",
    ) -> "ReleaseTransparencyVAE":
        path = pathlib.Path(path)
        if state_dict is None:
            state_dict, metadata = read_state_dict(path, name)
        known = _single_file_known_config(path, metadata or {}, config_overrides)
        config = infer_release_vae_config(state_dict, known, source=f"`{name}` file {str(path)!r}")
        vae = AutoencoderKL(**config)
        missing, unexpected = vae.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(path)}: AutoencoderKL keys do not match the inferred config (missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}). Provide a diffusers folder with its config.json instead."
            )
        return cls(vae, source=f"`{name}` file {str(path)!r}")


def save_release_vae_single_file(vae: AutoencoderKL, path: str | pathlib.Path) -> pathlib.Path:
    """Write an AutoencoderKL as one safetensors file, with its non-shape config fields in the metadata."""
    path = pathlib.Path(path)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    meta = {"config": json.dumps({f: vae.config[f] for f in NON_SHAPE_FIELDS}), "format": RELEASE_FORMAT}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


# ---------------------------------------------------------------------------------------------------------------
# format detection and the entry point


def detect_rgba_vae_format(path: str | pathlib.Path, name: str = "rgba_vae") -> str:
    """``"bfs-release"`` or ``"layerdiffuse-flux"`` from the folder's config or the file's keys."""
    path = pathlib.Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_file() and json.loads(config_path.read_text()).get("_class_name") == "AutoencoderKL":
            return RELEASE_FORMAT
        raise ValueError(
            f"Folder {str(path)!r} is not a diffusers AutoencoderKL folder (config.json with "
            '"_class_name": "AutoencoderKL"). For LayerDiffuse, pass the TransparentVAE.pth file itself.'
        )
    if path.suffix == ".safetensors" and path.is_file():
        with open_safetensors(path, name) as f:
            keys = list(f.keys())
    else:
        keys = list(read_state_dict(path, name)[0])
    return _format_from_keys(keys, f"`{name}` file {str(path)!r}")


def _format_from_keys(keys: list[str], source: str) -> str:
    if "decoder.latent_conv_in.weight" in keys:
        return LAYERDIFFUSE_FORMAT
    if is_autoencoder_kl_state_dict(keys):
        return RELEASE_FORMAT
    raise ValueError(
        f"{source} is neither a BFS release transparency VAE (diffusers AutoencoderKL keys) nor a LayerDiffuse-Flux "
        f"TransparentVAE (`decoder.latent_conv_in.weight`); first keys: {sorted(keys)[:4]}."
    )


def load_rgba_decoder(
    path: str | pathlib.Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    flux_vae: AutoencoderKL | None = None,
    config_overrides: dict | None = None,
    emulate_release_bf16: bool = True,
    name: str = "rgba_vae",
) -> RGBADecoder:
    """Load any supported RGBA VAE and return a decoder with one interface.

    Args:
        path: A diffusers folder or a ``.safetensors``/``.pt``/``.pth`` file; the format is detected from it.
        device: Where to put the model (default CPU).
        dtype: Compute dtype (default float32).
        flux_vae: FLUX.1 ``AutoencoderKL`` for formats that need the RGB decode (LayerDiffuse) when no ``rgb`` is
            passed to ``decode``, and for LayerDiffuse ``encode``.
        config_overrides: Non-shape config fields for a single-file release VAE (``scaling_factor``,
            ``shift_factor``, ``norm_num_groups``).
        emulate_release_bf16: The release casts its transparency VAE to bf16 and back to fp32 (release §4); do the
            same so weights carry the same rounding.
        name: the input as the user knows it (`rgba_vae`, `--rgba-vae`), named in every error message.
    Returns:
        An :class:`RGBADecoder`: ``decode(latent, rgb=None, **options)`` -> straight RGBA [B, 4, H, W] in [0, 1].
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UserInputError(
            f"`{name}` path {str(path)!r} does not exist. Pass an RGBA VAE diffusers folder or weights file."
        )
    dtype = dtype if dtype is not None else torch.float32
    if path.is_dir():
        decoder: RGBADecoder = ReleaseTransparencyVAE.from_folder(path, name=name)
        fmt = RELEASE_FORMAT
    else:
        state_dict, metadata = read_state_dict(path, name)
        fmt = _format_from_keys(list(state_dict), f"`{name}` file {str(path)!r}")
        if fmt == LAYERDIFFUSE_FORMAT:
            decoder = TransparentVAE.from_state_dict(state_dict, source=str(path), dtype=dtype)
            decoder.flux_vae = flux_vae
        else:
            decoder = ReleaseTransparencyVAE.from_single_file(path, state_dict, metadata, config_overrides, name)
    if fmt == RELEASE_FORMAT:
        with torch.no_grad():
            # In place rather than ModelMixin.to(dtype), which warns about keep-in-fp32 modules AutoencoderKL lacks.
            for tensor in list(decoder.vae.parameters()) + list(decoder.vae.buffers()):
                if tensor.is_floating_point():
                    rounded = tensor.data.to(torch.bfloat16) if emulate_release_bf16 else tensor.data
                    tensor.data = rounded.to(dtype)
        cfg = decoder.vae.config
        logger.info(
            "Loaded BFS release transparency VAE from %s: widths %s, scaling %.4f, shift %.4f, dtype %s",
            path,
            tuple(cfg.block_out_channels),
            cfg.scaling_factor,
            cfg.shift_factor,
            dtype,
        )
    return decoder.to(device) if device is not None else decoder


__all__ = [
    "RGBADecoder",
    "ReleaseTransparencyVAE",
    "detect_rgba_vae_format",
    "load_latent_file",
    "load_rgba_decoder",
    "save_latent_file",
]
