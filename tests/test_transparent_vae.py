"""LayerDiffuse-Flux TransparentVAE: structure against the real key list, loading, decode/TTA/padding, encode."""

import logging
import pathlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from bfs_core.models import transparent_vae as tv
from bfs_core.models.rgba_vae import load_rgba_decoder
from bfs_core.tiny import tiny_transparent_vae_state_dict


ASSETS = pathlib.Path(__file__).parent / "assets"
KEYS_FILE = ASSETS / "transparent-vae-flux-keys.txt"  # a copy of shared/specs' key list


pytestmark = pytest.mark.usefixtures("single_thread")


def reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")
            keys[name] = tuple(int(v) for v in shape.strip("[]").split(", "))
    return keys


@pytest.fixture(scope="module")
def full_meta() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        encoder, decoder = tv.LatentTransparencyOffsetEncoder(), tv.TransparentVAEDecoderUNet()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tvae") / "TransparentVAE.pth"
    torch.save(tiny_transparent_vae_state_dict(0), str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_pth) -> tv.TransparentVAE:
    return load_rgba_decoder(tiny_pth)


def inputs(batch: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=gen), torch.randn(batch, 16, h // 8, w // 8, generator=gen)


class TestStructure:
    def test_keys_and_shapes_match_reference_list(self, full_meta):
        ref = reference_keys()
        assert len(ref) == 556
        assert {k: tuple(v.shape) for k, v in full_meta.items()} == ref

    def test_parameter_counts(self, full_meta):
        dec = sum(v.numel() for k, v in full_meta.items() if k.startswith("decoder."))
        enc = sum(v.numel() for k, v in full_meta.items() if k.startswith("encoder."))
        assert (dec, enc) == (104_105_572, 1_209_424)
        assert sum(k.startswith("decoder.") for k in full_meta) == 538

    def test_config_inferred_from_shapes(self, full_meta):
        decoder_sd = {k[len("decoder.") :]: v for k, v in full_meta.items() if k.startswith("decoder.")}
        cfg = tv.infer_decoder_config(decoder_sd)
        assert cfg["block_out_channels"] == (32, 32, 64, 128, 256, 512, 512)
        assert cfg["down_block_types"] == ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3
        assert cfg["up_block_types"] == ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4
        assert (cfg["layers_per_block"], cfg["latent_channels"], cfg["out_channels"]) == (2, 16, 4)


class TestFullSizeFile:
    def test_full_pth_with_sd_vae_loads_and_decodes(self, full_meta, tmp_path, caplog):
        gen = torch.Generator("cpu").manual_seed(0)
        state = OrderedDict()
        for k, v in full_meta.items():
            fan_in = v[0].numel() if v.ndim > 1 else 1
            state[k] = (torch.randn(v.shape, generator=gen) / fan_in**0.5).to(torch.bfloat16)
        state["sd_vae.decoder.conv_out.weight"] = torch.zeros(3, 128, 3, 3, dtype=torch.bfloat16)
        path = tmp_path / "TransparentVAE.pth"
        torch.save(state, str(path))
        with caplog.at_level(logging.INFO):
            decoder = load_rgba_decoder(path)
        assert "ignoring 1 `sd_vae.*` keys" in caplog.text
        assert isinstance(decoder, tv.TransparentVAE) and decoder.needs_rgb
        loaded = decoder.decoder.state_dict()["up_blocks.0.attentions.0.to_q.weight"]
        assert torch.equal(loaded, state["decoder.up_blocks.0.attentions.0.to_q.weight"].float())
        rgb, latent = inputs(1, 64, 64)
        out = decoder.decode(latent, rgb, tta=False)
        assert out.shape == (1, 4, 64, 64) and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


class TestLoading:
    def test_strict_missing_key_named(self, tmp_path):
        state = tiny_transparent_vae_state_dict(0)
        del state["decoder.mid_block.attentions.0.to_k.weight"]
        path = tmp_path / "broken.pth"
        torch.save(state, str(path))
        with pytest.raises(ValueError, match=r"missing: \['mid_block.attentions.0.to_k.weight'\]"):
            load_rgba_decoder(path)

    def test_unknown_prefix_rejected(self, tmp_path):
        state = tiny_transparent_vae_state_dict(0)
        state["model.diffusion_model.x"] = torch.zeros(1)
        with pytest.raises(ValueError, match="outside `encoder"):
            tv.TransparentVAE.from_state_dict(state, "test")

    def test_pickled_objects_are_refused(self, tmp_path):
        path = tmp_path / "evil.pth"
        torch.save({"decoder.x": torch.zeros(1), "obj": Image.new("RGB", (1, 1))}, str(path))
        with pytest.raises(ValueError, match="weights_only=True"):
            tv.read_state_dict(path)

    def test_converter_keeps_only_encoder_decoder_and_decodes_identically(self, tiny_pth, tiny, tmp_path):
        out = tv.convert_transparent_vae_to_safetensors(tiny_pth, tmp_path / "tvae.safetensors")
        with safe_open(str(out), framework="pt") as f:
            keys = list(f.keys())
            assert f.metadata()["format"] == "layerdiffuse-flux"
        assert len(keys) == 556 and not any(k.startswith("sd_vae.") for k in keys)
        converted = load_rgba_decoder(out)
        rgb, latent = inputs(1, 64, 64)
        assert torch.equal(converted.decode(latent, rgb, tta=False), tiny.decode(latent, rgb, tta=False))


class TestDecode:
    def test_tta_is_median_of_eight_inverse_transformed_passes(self, tiny):
        rgb, latent = inputs(1, 64, 128)  # non-square: quarter turns swap H and W
        raw = tiny.denormalize(latent)
        passes = []
        with torch.no_grad():
            for flip in (False, True):
                for k in range(4):
                    x = torch.rot90(rgb.flip(-1) if flip else rgb, k, (2, 3))
                    z = torch.rot90(raw.flip(-1) if flip else raw, k, (2, 3))
                    y = torch.rot90(tiny.decoder(x, z).clamp(0, 1), -k, (2, 3))
                    passes.append(y.flip(-1) if flip else y)
        expected = torch.stack(passes).median(dim=0).values
        got = tiny.decode(latent, rgb, tta=True)
        assert got.shape == (1, 4, 64, 128)
        assert torch.allclose(got, expected, atol=1e-6)
        single = tiny.decode(latent, rgb, tta=False)
        assert torch.allclose(single, passes[0], atol=1e-6)
        assert not torch.allclose(got, single, atol=1e-3)  # the passes really differ

    def test_pads_to_multiple_of_64_and_crops_back(self, tiny):
        rgb, latent = inputs(1, 72, 80)
        got = tiny.decode(latent, rgb, tta=False)
        assert got.shape == (1, 4, 72, 80)
        padded_rgb = torch.nn.functional.pad(rgb, (0, 48, 0, 56), mode="replicate")
        padded_lat = torch.nn.functional.pad(tiny.denormalize(latent), (0, 6, 0, 7), mode="replicate")
        with torch.no_grad():
            expected = tiny.decoder(padded_rgb, padded_lat).clamp(0, 1)[..., :72, :80]
        assert torch.allclose(got, expected, atol=1e-6)

    def test_sub_batches_give_same_result(self, tiny):
        rgb, latent = inputs(3, 64, 64)
        a = tiny.decode(latent, rgb, tta=False, sub_batch_size=2)
        b = tiny.decode(latent, rgb, tta=False, sub_batch_size=3)
        assert a.shape == (3, 4, 64, 64) and torch.allclose(a, b, atol=1e-5)  # batched conv rounding only
        assert not torch.allclose(a[0], a[1])

    def test_rgb_from_flux_vae(self, tiny):
        flux = tiny_flux_vae()
        _, latent = inputs(1, 64, 64)
        with torch.no_grad():
            rgb = (flux.decode(tiny.denormalize(latent)).sample * 0.5 + 0.5).clamp(0, 1)
        assert torch.allclose(tiny.decode(latent, flux_vae=flux, tta=False), tiny.decode(latent, rgb, tta=False))
        with pytest.raises(ValueError, match="needs the Flux-VAE RGB"):
            tiny.decode(latent)

    def test_shape_errors_are_clear(self, tiny):
        rgb, latent = inputs(1, 64, 64)
        with pytest.raises(ValueError, match=r"`rgb` must be the Flux-VAE decode"):
            tiny.decode(latent, rgb[..., :32, :])
        with pytest.raises(ValueError, match=r"\[B, 16, H/8, W/8\]"):
            tiny.decode(latent[:, :4], rgb)


def tiny_flux_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


class TestEncode:
    def stamp(self) -> torch.Tensor:
        image = Image.open(ASSETS / "stamps" / "hen.png").convert("RGBA").resize((64, 64), Image.LANCZOS)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]

    def test_alpha_pyramid_padding(self):
        rgba = self.stamp()
        rgb, alpha = rgba[:, :3], rgba[:, 3:]
        padded = tv.pad_rgb_by_alpha_pyramid(rgb, alpha)
        opaque = alpha[0, 0] == 1
        assert torch.allclose(padded[0][:, opaque], rgb[0][:, opaque], atol=1e-5)
        # Transparent areas get colours from the object's range, not black.
        clear = alpha[0, 0] == 0
        lo, hi = rgb[0][:, ~clear].amin(dim=1), rgb[0][:, ~clear].amax(dim=1)
        fill = padded[0][:, clear]
        assert (fill >= lo[:, None] - 1e-4).all() and (fill <= hi[:, None] + 1e-4).all()
        # A flat-coloured object pads to that colour everywhere.
        flat = tv.pad_rgb_by_alpha_pyramid(torch.full_like(rgb, 0.25), alpha)
        assert torch.allclose(flat, torch.full_like(flat, 0.25), atol=1e-5)

    def test_encode_is_mean_plus_std_times_300_offset(self, tiny):
        flux = tiny_flux_vae()
        rgba = self.stamp()
        latent = tiny.encode(rgba, flux)
        assert latent.shape == (1, 16, 8, 8)
        rgb, alpha = rgba[:, :3], rgba[:, 3:]
        with torch.no_grad():
            posterior = flux.encode((rgb * 2 - 1) * alpha).latent_dist
            offset = tiny.encoder(torch.cat([tv.pad_rgb_by_alpha_pyramid(rgb, alpha), alpha], 1)) * 300
        expected = (posterior.mean + posterior.std * offset - 0.1159) * 0.3611
        assert torch.allclose(latent, expected, rtol=1e-4, atol=1e-4)
        assert offset.abs().mean() > 1  # the random encoder really contributes
