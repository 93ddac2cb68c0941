"""LayerDiffuse-Flux "TransparentVAE": the latent-transparency offset encoder and the RGBA UNet decoder.

The released checkpoint (``TransparentVAE.pth`` from RedAIGC/FireRedTeam "Flux-version-LayerDiffuse", bf16, a pickled
``OrderedDict``) holds three key groups:

* ``encoder.*`` - :class:`LatentTransparencyOffsetEncoder`, 18 tensors, 1,209,424 parameters;
* ``decoder.*`` - :class:`TransparentVAEDecoderUNet`, 538 tensors, 104,105,572 parameters;
* ``sd_vae.*`` - a copy of the FLUX.1 ``AutoencoderKL``; we note it and ignore it (the pack loads the Flux VAE itself).

Both nets were written from the structural description in ``shared/specs/layerdiffuse-and-transparent-vae.md`` §2
(no code copied). The decoder is built from diffusers' UNet blocks without a time embedding, so its key names are the
diffusers ones (``resnets.{j}.norm1``, ``attentions.{j}.to_q``, ...).

Latent convention: :meth:`TransparentVAE.decode` takes a latent in *normalised* Flux space,
``normalised = (raw - shift_factor) * scaling_factor`` with the FLUX.1 VAE constants (0.1159, 0.3611), shape
``[B, 16, H/8, W/8]``; it needs the Flux-VAE RGB decode of the same latent (``[B, 3, H, W]`` in [0, 1]) and returns
straight-alpha RGBA ``[B, 4, H, W]`` in [0, 1], channel order R, G, B, A.
"""

import logging
import pathlib

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..finite import check_finite


logger = logging.getLogger(__name__)

FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
# The offset encoder's output is scaled by this constant before it replaces the posterior's Gaussian sample.
OFFSET_SCALE = 300.0
# Six stride-2 stages in the decoder: pixel sizes must be multiples of 2**6.
SIZE_MULTIPLE = 64
FORMAT_NAME = "layerdiffuse-flux"


class LatentTransparencyOffsetEncoder(ModelMixin, ConfigMixin):
    """Maps [padded RGB, alpha] to a latent-space offset (the "latent transparency" of LayerDiffuse).

    ``blocks`` is a 17-entry ``nn.Sequential``: 3x3 convs at even indices, SiLU at odd ones, three stride-2 stages.

    Args:
        in_channels: Input channels, 4 for the Flux version in order [R, G, B, A].
        latent_channels: Output channels, 16 for Flux.
        block_out_channels: Widths of the four stages; the last three stages start with a stride-2 conv.
    """

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 4,
        latent_channels: int = 16,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 256),
    ):
        super().__init__()
        if len(block_out_channels) != 4:
            raise ValueError(f"`block_out_channels` must have 4 entries but got {block_out_channels!r}.")
        layers: list[torch.nn.Module] = []
        prev = in_channels
        for stage, width in enumerate(block_out_channels):
            layers += [torch.nn.Conv2d(prev, width, 3, stride=1 if stage == 0 else 2, padding=1), torch.nn.SiLU()]
            layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU()]
            prev = width
        head = torch.nn.Conv2d(prev, latent_channels, 3, padding=1)
        # Zero-initialised so a fresh encoder adds no offset.
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        layers.append(head)
        self.blocks = torch.nn.Sequential(*layers)

    def forward(self, rgba: torch.Tensor) -> torch.Tensor:
        """[B, 4, H, W] padded RGB + alpha in [0, 1] -> [B, latent_channels, H/8, W/8] (unscaled offset)."""
        return self.blocks(rgba)


class TransparentVAEDecoderUNet(ModelMixin, ConfigMixin):
    """The LayerDiffuse RGBA decoder: a time-free diffusers UNet fed with the decoded RGB and the raw latent.

    The raw latent enters through a 1x1 conv and is added to the hidden state right before down block
    ``latent_injection_block`` (at 1/8 resolution); skip tensors stored before that point do not contain it.

    Args:
        in_channels: Channels of the RGB input (3).
        out_channels: Output channels (4: R, G, B, A, values roughly in [0, 1] before clipping).
        latent_channels: Channels of the raw VAE latent (16 for Flux, 4 for SD/SDXL).
        block_out_channels: Width of each resolution level (7 levels, six downsamples).
        down_block_types: diffusers down-block class names, one per level.
        up_block_types: diffusers up-block class names, one per level.
        layers_per_block: Resnets per down block; up blocks use one more.
        norm_num_groups: GroupNorm groups everywhere.
        norm_eps: GroupNorm epsilon.
        attention_head_dim: Channels per attention head (heads = width / attention_head_dim).
        latent_injection_block: Index of the down block before which the latent is added.
    """

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 4,
        latent_channels: int = 16,
        block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512),
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
        layers_per_block: int = 2,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        attention_head_dim: int = 8,
        latent_injection_block: int = 3,
    ):
        super().__init__()
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ValueError(
                f"`down_block_types` ({len(down_block_types)}) and `up_block_types` ({len(up_block_types)}) must have "
                f"one entry per level of `block_out_channels` ({n})."
            )
        if not 1 <= latent_injection_block < n:
            raise ValueError(f"`latent_injection_block` must be in [1, {n - 1}] but got {latent_injection_block}.")
        self.conv_in = torch.nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.latent_conv_in = torch.nn.Conv2d(latent_channels, block_out_channels[latent_injection_block - 1], 1)
        torch.nn.init.zeros_(self.latent_conv_in.weight)
        torch.nn.init.zeros_(self.latent_conv_in.bias)
        common = {
            "temb_channels": None,
            "resnet_eps": norm_eps,
            "resnet_act_fn": "silu",
            "resnet_groups": norm_num_groups,
            "attention_head_dim": attention_head_dim,
        }

        self.down_blocks = torch.nn.ModuleList()
        prev = block_out_channels[0]
        for i, (block_type, width) in enumerate(zip(down_block_types, block_out_channels)):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=prev,
                    out_channels=width,
                    add_downsample=i < n - 1,
                    downsample_padding=1,
                    downsample_type="conv",
                    **common,
                )
            )
            prev = width

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            temb_channels=None,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            output_scale_factor=1.0,
            resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
        )

        self.up_blocks = torch.nn.ModuleList()
        reversed_widths = list(reversed(block_out_channels))
        prev = reversed_widths[0]
        for i, (block_type, width) in enumerate(zip(up_block_types, reversed_widths)):
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=reversed_widths[min(i + 1, n - 1)],
                    out_channels=width,
                    prev_output_channel=prev,
                    add_upsample=i < n - 1,
                    resolution_idx=i,
                    upsample_type="conv",
                    **common,
                )
            )
            prev = width

        self.conv_norm_out = torch.nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, rgb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """rgb [B, 3, H, W] in [0, 1] and raw latent [B, C_lat, H/8, W/8] -> [B, 4, H, W] (unclipped).

        H and W must be multiples of 64 (see :func:`pad_to_multiple`).
        """
        h = self.conv_in(rgb)
        skips: list[torch.Tensor] = [h]
        for i, block in enumerate(self.down_blocks):
            if i == self.config.latent_injection_block:
                h = h + self.latent_conv_in(latent)
            h, block_skips = block(h)
            skips.extend(block_skips)
        h = self.mid_block(h)
        for block in self.up_blocks:
            n_res = len(block.resnets)
            h = block(h, tuple(skips[-n_res:]))
            del skips[-n_res:]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
# pixel-space helpers


def pad_to_multiple(
    rgb: torch.Tensor, latent: torch.Tensor, multiple: int = SIZE_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate-pad rgb [B,3,H,W] and latent [B,C,H/8,W/8] at the bottom/right so H and W become multiples of 64."""
    pad_h = -rgb.shape[-2] % multiple
    pad_w = -rgb.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return rgb, latent
    rgb = F.pad(rgb, (0, pad_w, 0, pad_h), mode="replicate")
    latent = F.pad(latent, (0, pad_w // 8, 0, pad_h // 8), mode="replicate")
    return rgb, latent


def tta_transform(x: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    """One of the 8 dihedral variants: optional horizontal flip, then ``k`` quarter turns over (H, W)."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1))


def tta_inverse(x: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    if flip:
        x = torch.flip(x, dims=(-1,))
    return x


TTA_VARIANTS: tuple[tuple[bool, int], ...] = tuple((flip, k) for flip in (False, True) for k in range(4))


def pad_rgb_by_alpha_pyramid(rgb: torch.Tensor, alpha: torch.Tensor, shrink: float = 1.2) -> torch.Tensor:
    """Fill transparent areas with colour extrapolated from the visible pixels ("alpha-pyramid padding").

    Builds a pyramid of premultiplied colour and alpha, shrinking by ``shrink`` until one side is 1 px, starts from
    the alpha-weighted mean colour and walks back to full resolution with ``est = premult + est * (1 - alpha)``.
    Exact where alpha = 1, smooth where alpha = 0.

    Args:
        rgb: [B, 3, H, W] straight colour in [0, 1].
        alpha: [B, 1, H, W] in [0, 1].
    Returns:
        [B, 3, H, W] padded straight colour.
    """
    premult = rgb * alpha
    levels: list[tuple[torch.Tensor, torch.Tensor]] = []
    colour, opacity = premult, alpha
    while True:
        levels.append((colour, opacity))
        h, w = colour.shape[-2:]
        if min(h, w) <= 1:
            break
        size = (max(1, int(h / shrink)), max(1, int(w / shrink)))
        colour = F.interpolate(colour, size=size, mode="area")
        opacity = F.interpolate(opacity, size=size, mode="area")
    total_alpha = alpha.sum(dim=(-2, -1), keepdim=True)
    est = premult.sum(dim=(-2, -1), keepdim=True) / total_alpha.clamp_min(1e-6)
    for colour, opacity in reversed(levels):
        est = F.interpolate(est, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        est = colour + est * (1.0 - opacity)
    return est


# ---------------------------------------------------------------------------------------------------------------
# checkpoint reading


def read_state_dict(
    path: str | pathlib.Path, name: str = "rgba_vae"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` or a ``.pt``/``.pth`` (``torch.load(weights_only=True)`` only) into a flat dict.

    Returns (tensors, safetensors metadata or {}). ``name`` is the input as the user knows it, named in errors.
    """
    from ..errors import UserInputError, check_file, load_torch_tensors, read_safetensors

    path = check_file(path, name, "an RGBA VAE weights file")
    if path.suffix == ".safetensors":
        return read_safetensors(path, name)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return load_torch_tensors(path, name), {}
    raise UserInputError(
        f"`{name}` file {str(path)!r} must end in .safetensors, .pt or .pth but has suffix {path.suffix!r}."
    )


def split_transparent_vae_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split into (encoder, decoder) dicts with prefixes removed; ``sd_vae.*`` is counted and dropped.

    Any other prefix is an error: the file is not a TransparentVAE checkpoint.
    """
    encoder, decoder, n_sd_vae, unknown = {}, {}, 0, []
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            encoder[key[len("encoder.") :]] = value
        elif key.startswith("decoder."):
            decoder[key[len("decoder.") :]] = value
        elif key.startswith("sd_vae."):
            n_sd_vae += 1
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source} has {len(unknown)} keys outside `encoder.*`/`decoder.*`/`sd_vae.*` (e.g. {unknown[:3]}); a "
            "LayerDiffuse-Flux TransparentVAE checkpoint has only those prefixes. Is this the right file?"
        )
    if not decoder:
        raise ValueError(f"{source} has no `decoder.*` keys; expected the LayerDiffuse-Flux TransparentVAE decoder.")
    if n_sd_vae:
        logger.info(
            "%s: ignoring %d `sd_vae.*` keys (a copy of the Flux VAE; the pack loads its own)", source, n_sd_vae
        )
    return encoder, decoder


def _level_indices(keys: list[str], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)})


def infer_decoder_config(decoder: dict[str, torch.Tensor], source: str = "state dict") -> dict:
    """Recover the :class:`TransparentVAEDecoderUNet` config from tensor shapes (decoder keys without prefix).

    ``norm_num_groups`` (4) and ``attention_head_dim`` (8) are not visible in shapes and keep the released values.
    """
    required = ["conv_in.weight", "latent_conv_in.weight", "conv_out.weight", "down_blocks.0.resnets.0.conv1.weight"]
    missing = [k for k in required if k not in decoder]
    if missing:
        raise ValueError(f"{source} lacks decoder keys {missing}; cannot infer the TransparentVAE decoder config.")
    keys = list(decoder)
    levels = _level_indices(keys, "down_blocks.")
    widths = tuple(int(decoder[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    down_types = tuple(
        "AttnDownBlock2D" if f"down_blocks.{i}.attentions.0.to_q.weight" in decoder else "DownBlock2D" for i in levels
    )
    up_types = tuple(
        "AttnUpBlock2D" if f"up_blocks.{i}.attentions.0.to_q.weight" in decoder else "UpBlock2D"
        for i in _level_indices(keys, "up_blocks.")
    )
    n_res = len({k.split(".")[3] for k in keys if k.startswith("down_blocks.0.resnets.")})
    # The injection point is not visible in shapes (widths repeat); the released net injects before block 3.
    injection = 3
    latent_width = int(decoder["latent_conv_in.weight"].shape[0])
    if len(widths) <= injection or widths[injection - 1] != latent_width:
        raise ValueError(
            f"{source}: `decoder.latent_conv_in` outputs {latent_width} channels but down block {injection - 1} has "
            f"width {widths[injection - 1] if len(widths) >= injection else 'n/a'}; not a LayerDiffuse-Flux decoder."
        )
    return {
        "in_channels": int(decoder["conv_in.weight"].shape[1]),
        "out_channels": int(decoder["conv_out.weight"].shape[0]),
        "latent_channels": int(decoder["latent_conv_in.weight"].shape[1]),
        "block_out_channels": widths,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "layers_per_block": n_res,
        "latent_injection_block": injection,
    }


def infer_encoder_config(encoder: dict[str, torch.Tensor]) -> dict:
    """Recover the :class:`LatentTransparencyOffsetEncoder` config from tensor shapes (keys without prefix)."""
    return {
        "in_channels": int(encoder["blocks.0.weight"].shape[1]),
        "latent_channels": int(encoder["blocks.16.weight"].shape[0]),
        "block_out_channels": tuple(int(encoder[f"blocks.{i}.weight"].shape[0]) for i in (0, 4, 8, 12)),
    }


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {items[:4]}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise ValueError(f"{source}: the {what} keys do not match the LayerDiffuse-Flux layout ({detail}).")
    module.load_state_dict(tensors, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# public class


class TransparentVAE(torch.nn.Module):
    """LayerDiffuse-Flux TransparentVAE: RGBA decoding (and RGBA -> latent encoding) around a Flux VAE.

    Implements the :class:`bfs_core.models.rgba_vae.RGBADecoder` interface. ``needs_rgb`` is True: decoding needs the
    Flux-VAE decode of the same latent, given as ``rgb`` or computed with ``flux_vae``.

    Args:
        decoder: The RGBA UNet decoder.
        encoder: The offset encoder, or None for decoder-only checkpoints (``encode`` then raises).
        flux_vae: Optional diffusers ``AutoencoderKL`` of FLUX.1, used when ``rgb`` is not given and for ``encode``.
        flux_scaling_factor: Flux VAE ``scaling_factor`` used to de-normalise latents.
        flux_shift_factor: Flux VAE ``shift_factor``.
    """

    format_name = FORMAT_NAME
    needs_rgb = True

    def __init__(
        self,
        decoder: TransparentVAEDecoderUNet,
        encoder: LatentTransparencyOffsetEncoder | None = None,
        flux_vae: torch.nn.Module | None = None,
        flux_scaling_factor: float = FLUX_SCALING_FACTOR,
        flux_shift_factor: float = FLUX_SHIFT_FACTOR,
    ):
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.flux_vae = flux_vae
        self.flux_scaling_factor = flux_scaling_factor
        self.flux_shift_factor = flux_shift_factor

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], source: str = "state dict", dtype: torch.dtype | None = None
    ) -> "TransparentVAE":
        encoder_sd, decoder_sd = split_transparent_vae_state_dict(state_dict, source)
        decoder = TransparentVAEDecoderUNet(**infer_decoder_config(decoder_sd, source))
        _load_strict(decoder, decoder_sd, "decoder", source)
        encoder = None
        if encoder_sd:
            encoder = LatentTransparencyOffsetEncoder(**infer_encoder_config(encoder_sd))
            _load_strict(encoder, encoder_sd, "encoder", source)
        vae = cls(decoder, encoder)
        if dtype is not None:
            vae = vae.to(dtype)
        dtypes: dict[str, int] = {}
        for v in state_dict.values():
            dtypes[str(v.dtype).removeprefix("torch.")] = dtypes.get(str(v.dtype).removeprefix("torch."), 0) + 1
        logger.info(
            "Loaded LayerDiffuse-Flux TransparentVAE from %s: decoder %d tensors, encoder %d tensors, file dtypes %s",
            source,
            len(decoder_sd),
            len(encoder_sd),
            dtypes,
        )
        return vae.eval().requires_grad_(False)

    @classmethod
    def from_file(
        cls, path: str | pathlib.Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "TransparentVAE":
        """Load ``TransparentVAE.pth`` (or its safetensors conversion); only ``encoder.*``/``decoder.*`` are used."""
        state_dict, _ = read_state_dict(path)
        vae = cls.from_state_dict(state_dict, source=str(path), dtype=dtype if dtype is not None else torch.float32)
        return vae.to(device) if device is not None else vae

    # -- decoding -------------------------------------------------------------------------------------------------

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised Flux latent -> raw Flux VAE latent."""
        return latent / self.flux_scaling_factor + self.flux_shift_factor

    @torch.no_grad()
    def decode_raw(
        self, raw_latent: torch.Tensor, rgb: torch.Tensor, *, tta: bool = True, sub_batch_size: int = 1
    ) -> torch.Tensor:
        """Raw latent [B,C,h,w] + Flux RGB decode [B,3,8h,8w] in [0,1] -> straight RGBA [B,4,8h,8w] in [0,1].

        ``tta=True`` is the reference quality: the per-pixel (lower) median of 8 flip/rotate passes; ``tta=False`` is a
        single pass, 8x faster. Sizes that are not multiples of 64 are replicate-padded and cropped back.
        """
        latent_c = self.decoder.config.latent_channels
        if raw_latent.ndim != 4 or raw_latent.shape[1] != latent_c:
            raise ValueError(
                f"`latent` must be [B, {latent_c}, H/8, W/8] but got {tuple(raw_latent.shape)}. Pass a Flux latent."
            )
        expected = (raw_latent.shape[0], 3, raw_latent.shape[2] * 8, raw_latent.shape[3] * 8)
        if tuple(rgb.shape) != expected:
            raise ValueError(
                f"`rgb` must be the Flux-VAE decode of the latent, shape {expected}, but got {tuple(rgb.shape)}. "
                "Decode the same latent with the Flux VAE (or pass `flux_vae`)."
            )
        if sub_batch_size < 1:
            raise ValueError(f"`sub_batch_size` must be >= 1 but got {sub_batch_size}.")
        height, width = rgb.shape[-2:]
        # contiguous(): an image from PIL/numpy arrives channels-last, which picks other conv kernels (and rounding).
        rgb = rgb.to(self.device, self.dtype).clamp(0, 1).contiguous()
        raw_latent = raw_latent.to(self.device, self.dtype).contiguous()
        rgb, raw_latent = pad_to_multiple(rgb, raw_latent)
        outputs = []
        for start in range(0, rgb.shape[0], sub_batch_size):
            x, z = rgb[start : start + sub_batch_size], raw_latent[start : start + sub_batch_size]
            if tta:
                passes = [
                    tta_inverse(self.decoder(tta_transform(x, f, k), tta_transform(z, f, k)).clamp(0, 1), f, k)
                    for f, k in TTA_VARIANTS
                ]
                # torch.median returns the lower of the two middle values for an even count (as the reference does).
                outputs.append(torch.stack(passes).median(dim=0).values)
            else:
                outputs.append(self.decoder(x, z).clamp(0, 1))
        return torch.cat(outputs)[..., :height, :width].float()

    def decode_flux_rgb(self, raw_latent: torch.Tensor, flux_vae: torch.nn.Module) -> torch.Tensor:
        vae_dtype = next(flux_vae.parameters()).dtype
        with torch.no_grad():
            image = flux_vae.decode(raw_latent.to(flux_vae.device, vae_dtype)).sample
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    def decode(
        self,
        latent: torch.Tensor,
        rgb: torch.Tensor | None = None,
        *,
        tta: bool = True,
        sub_batch_size: int = 1,
        flux_vae: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Normalised Flux latent [B,16,H/8,W/8] (+ RGB [B,3,H,W] in [0,1]) -> straight RGBA [B,4,H,W] in [0,1]."""
        check_finite("latent", latent, "the foreground latent to decode")
        check_finite("rgb", rgb, "the Flux-VAE decode of the latent")
        raw = self.denormalize(latent.float())
        if rgb is None:
            flux_vae = flux_vae if flux_vae is not None else self.flux_vae
            if flux_vae is None:
                raise ValueError(
                    "The LayerDiffuse-Flux TransparentVAE needs the Flux-VAE RGB decode of the latent: pass `rgb` "
                    "([B, 3, H, W] in [0, 1]) or a Flux `flux_vae` (diffusers AutoencoderKL)."
                )
            rgb = self.decode_flux_rgb(raw, flux_vae)
        return self.decode_raw(raw, rgb, tta=tta, sub_batch_size=sub_batch_size)

    # -- encoding -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        rgba: torch.Tensor,
        flux_vae: torch.nn.Module | None = None,
        *,
        use_offset: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Straight RGBA [B,4,H,W] in [0,1] -> normalised Flux latent [B,16,H/8,W/8] in the transparent latent space.

        The Flux VAE sees RGB premultiplied around grey, ``(rgb*2-1)*alpha``; the offset encoder sees the
        alpha-pyramid-padded colour plus alpha; the latent is ``mean + std * (300 * offset)``.
        """
        flux_vae = flux_vae if flux_vae is not None else self.flux_vae
        if flux_vae is None:
            raise ValueError("`encode` needs the Flux VAE: pass `flux_vae` (a diffusers AutoencoderKL).")
        if self.encoder is None:
            raise ValueError("This TransparentVAE checkpoint has no `encoder.*` keys, so it cannot encode RGBA.")
        if rgba.ndim != 4 or rgba.shape[1] != 4 or rgba.shape[-1] % 8 or rgba.shape[-2] % 8:
            raise ValueError(f"`rgba` must be [B, 4, H, W] with H, W multiples of 8 but got {tuple(rgba.shape)}.")
        rgba = rgba.to(self.device, torch.float32).clamp(0, 1)
        rgb, alpha = rgba[:, :3], rgba[:, 3:]
        vae_dtype = next(flux_vae.parameters()).dtype
        posterior = flux_vae.encode(((rgb * 2 - 1) * alpha).to(flux_vae.device, vae_dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        if use_offset:
            padded = pad_rgb_by_alpha_pyramid(rgb, alpha)
            noise = self.encoder(torch.cat([padded, alpha], dim=1).to(self.dtype)).float() * OFFSET_SCALE
        else:
            # Drawn where the generator lives (a CUDA generator cannot fill a CPU tensor), then moved.
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=noise_device)
        raw = mean + std * noise.to(mean.device)
        return (raw - self.flux_shift_factor) * self.flux_scaling_factor


def convert_transparent_vae_to_safetensors(
    src: str | pathlib.Path, dst: str | pathlib.Path, dtype: torch.dtype | None = None, name: str = "src"
) -> pathlib.Path:
    """Convert ``TransparentVAE.pth`` to safetensors holding only ``encoder.*``/``decoder.*`` (≈211 MB in bf16).

    The keys are validated by building the nets first, so a wrong file fails here and not at the first decode.
    """
    state_dict, _ = read_state_dict(src, name)
    vae = TransparentVAE.from_state_dict(state_dict, source=f"`{name}` file {str(src)!r}")  # validates structure
    del vae
    kept = {
        k: (v.to(dtype) if dtype is not None else v).contiguous()
        for k, v in state_dict.items()
        if k.startswith(("encoder.", "decoder."))
    }
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(kept, str(tmp), metadata={"format": FORMAT_NAME, "source": pathlib.Path(src).name})
    logger.info("Wrote %s (%d tensors)", dst, len(kept))
    return dst
