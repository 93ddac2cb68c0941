"""BFS release transparency VAE (diffusers folder / single file), format detection, latent files, tiny writer."""

import json
import pathlib

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from bfs_core.models import rgba_vae
from bfs_core.models.rgba_vae import (
    ReleaseTransparencyVAE,
    detect_rgba_vae_format,
    load_latent_file,
    load_rgba_decoder,
    save_latent_file,
)
from bfs_core.models.transparent_vae import TransparentVAE
from bfs_core.tiny import tiny_release_vae, write_tiny_rgba_vaes


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    return write_tiny_rgba_vaes(tmp_path_factory.mktemp("rgba_vaes"))


def latent(batch: int = 1, h: int = 8, w: int = 12) -> torch.Tensor:
    return torch.randn(batch, 16, h, w, generator=torch.Generator("cpu").manual_seed(0))


class TestTinyWriter:
    def test_writes_every_format_and_detects_it(self, tiny_files):
        assert set(tiny_files) == {
            "bfs_release_folder",
            "bfs_release_single",
            "layerdiffuse_pth",
            "layerdiffuse_safetensors",
        }
        assert (tiny_files["bfs_release_folder"] / "config.json").is_file()
        assert detect_rgba_vae_format(tiny_files["bfs_release_folder"]) == "bfs-release"
        assert detect_rgba_vae_format(tiny_files["bfs_release_single"]) == "bfs-release"
        assert detect_rgba_vae_format(tiny_files["layerdiffuse_pth"]) == "layerdiffuse-flux"
        assert detect_rgba_vae_format(tiny_files["layerdiffuse_safetensors"]) == "layerdiffuse-flux"
        pth = torch.load(str(tiny_files["layerdiffuse_pth"]), weights_only=True)
        assert all(v.dtype == torch.bfloat16 for v in pth.values())
        assert any(k.startswith("sd_vae.") for k in pth)

    def test_every_format_decodes_through_one_interface(self, tiny_files):
        z = latent(2)
        for name, path in tiny_files.items():
            decoder = load_rgba_decoder(path)
            assert isinstance(decoder, rgba_vae.RGBADecoder), name
            rgb = torch.rand(2, 3, 64, 96, generator=torch.Generator("cpu").manual_seed(1))
            out = decoder.decode(z, rgb if decoder.needs_rgb else None)
            assert out.shape == (2, 4, 64, 96), name
            assert out.min() >= 0 and out.max() <= 1 and out.std() > 0.01, name


class TestReleaseVAE:
    def test_real_key_layout(self, tiny_files):
        # The AlphaVAE-like release config (widths 128/256/512/512, 2 resnets, mid attention) has these exact keys;
        # the tiny file repeats the width pattern, so it carries the full key set.
        with torch.device("meta"):
            full = AutoencoderKL(
                in_channels=4,
                out_channels=4,
                latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        tiny_config = tiny_release_vae().config
        tiny2 = AutoencoderKL(**{**tiny_config, "layers_per_block": 2, "block_out_channels": (8, 16, 32, 32)})
        assert set(tiny2.state_dict()) == set(full.state_dict())
        path = tiny_files["bfs_release_single"].parent / "release_full_keys.safetensors"
        rgba_vae.save_release_vae_single_file(tiny2, path)
        decoder = load_rgba_decoder(path, emulate_release_bf16=False)
        cfg = decoder.vae.config
        assert tuple(cfg.block_out_channels) == (8, 16, 32, 32) and cfg.layers_per_block == 2
        for k, v in tiny2.state_dict().items():
            assert torch.equal(decoder.vae.state_dict()[k], v), k

    def test_decode_formula_and_bf16_round_trip(self, tiny_files):
        decoder = load_rgba_decoder(tiny_files["bfs_release_folder"])
        reference = AutoencoderKL.from_pretrained(str(tiny_files["bfs_release_folder"]))
        w = reference.decoder.conv_out.weight
        assert torch.equal(decoder.vae.decoder.conv_out.weight, w.to(torch.bfloat16).float())
        assert not torch.equal(decoder.vae.decoder.conv_out.weight, w)
        z = latent()
        ref_vae = reference.to(torch.bfloat16).to(torch.float32)
        with torch.no_grad():
            expected = (ref_vae.decode(z / 0.3611 + 0.1159).sample / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(decoder.decode(z), expected, atol=1e-6)

    def test_folder_and_single_file_agree(self, tiny_files):
        z = latent()
        a = load_rgba_decoder(tiny_files["bfs_release_folder"]).decode(z)
        b = load_rgba_decoder(tiny_files["bfs_release_single"]).decode(z)
        assert torch.equal(a, b)

    def test_single_file_without_factors_fails_clearly(self, tiny_files, tmp_path):
        vae = AutoencoderKL.from_pretrained(str(tiny_files["bfs_release_folder"]))
        bare = tmp_path / "bare.safetensors"
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(bare))
        with pytest.raises(ValueError, match=r"not \['scaling_factor', 'shift_factor', 'norm_num_groups'\]"):
            load_rgba_decoder(bare)
        overrides = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "norm_num_groups": 4}
        z = latent()
        expected = load_rgba_decoder(tiny_files["bfs_release_folder"]).decode(z)
        assert torch.equal(load_rgba_decoder(bare, config_overrides=overrides).decode(z), expected)
        (tmp_path / "bare.json").write_text(json.dumps(overrides))
        assert torch.equal(load_rgba_decoder(bare).decode(z), expected)

    def test_encode_decode_shapes(self, tiny_files):
        decoder = load_rgba_decoder(tiny_files["bfs_release_folder"])
        rgba = torch.rand(1, 4, 64, 64, generator=torch.Generator("cpu").manual_seed(0))
        z = decoder.encode(rgba)
        assert z.shape == (1, 16, 8, 8)
        with torch.no_grad():
            raw = decoder.vae.encode(rgba * 2 - 1).latent_dist.mean
        assert torch.allclose(z, (raw - 0.1159) * 0.3611, atol=1e-6)

    def test_rejects_non_rgba_autoencoder(self):
        with pytest.raises(ValueError, match="in/out_channels=3/3"):
            ReleaseTransparencyVAE(
                AutoencoderKL(latent_channels=16, shift_factor=0.0, block_out_channels=(8,), norm_num_groups=4)
            )


class TestDetectionAndLatents:
    def test_unknown_files_are_named(self, tmp_path):
        path = tmp_path / "other.safetensors"
        save_file({"model.weight": torch.zeros(2)}, str(path))
        with pytest.raises(ValueError, match="neither a BFS release"):
            load_rgba_decoder(path)
        with pytest.raises(ValueError, match="does not exist"):
            load_rgba_decoder(tmp_path / "missing.pth")
        (tmp_path / "folder").mkdir()
        with pytest.raises(ValueError, match="not a diffusers AutoencoderKL folder"):
            detect_rgba_vae_format(tmp_path / "folder")

    def test_latent_file_round_trip_and_space_check(self, tmp_path):
        z = latent(2)
        path = save_latent_file(tmp_path / "fg.safetensors", z)
        assert torch.equal(load_latent_file(path), z)
        raw = tmp_path / "raw.safetensors"
        save_file({"latent": z}, str(raw), metadata={"space": "flux_raw"})
        with pytest.raises(ValueError, match="flux_normalized"):
            load_latent_file(raw)
        wrong = tmp_path / "wrong.safetensors"
        save_file({"samples": z}, str(wrong))
        with pytest.raises(ValueError, match="named `latent`"):
            load_latent_file(wrong)

    def test_layerdiffuse_entry_point_type(self, tiny_files):
        assert isinstance(load_rgba_decoder(tiny_files["layerdiffuse_pth"]), TransparentVAE)


class TestCLI:
    def run_cli(self, *argv: str) -> None:
        from bfs_core.__main__ import main

        assert main(list(argv)) == 0

    def test_rgba_decode_both_formats(self, tiny_files, tmp_path, capsys):
        import numpy as np
        from PIL import Image

        z = latent(1, 8, 8)
        lat = save_latent_file(tmp_path / "fg.safetensors", z)
        out = tmp_path / "fg.png"
        self.run_cli(
            "rgba-decode", "--vae", str(tiny_files["bfs_release_single"]), "--latent", str(lat), "--out", str(out)
        )
        expected = load_rgba_decoder(tiny_files["bfs_release_single"]).decode(z)[0]
        got = np.asarray(Image.open(out))
        assert got.shape == (64, 64, 4)
        assert np.abs(got / 255 - expected.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6

        rgb = tmp_path / "rgb.png"
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(rgb)
        out2 = tmp_path / "fg_ld.png"
        args = ["--vae", str(tiny_files["layerdiffuse_pth"]), "--latent", str(lat), "--out", str(out2), "--no-tta"]
        self.run_cli("rgba-decode", *args, "--rgb", str(rgb))
        decoder = load_rgba_decoder(tiny_files["layerdiffuse_pth"])
        expected = decoder.decode(z, torch.full((1, 3, 64, 64), 128 / 255), tta=False)[0]
        assert np.abs(np.asarray(Image.open(out2)) / 255 - expected.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
        from bfs_core.__main__ import main

        capsys.readouterr()
        assert main(["rgba-decode", *args]) == 2  # a clear message, no traceback
        assert "--rgb RGB.png" in capsys.readouterr().err

    def test_convert_command_module(self, tiny_files, tmp_path):
        import argparse

        from bfs_core.cli import convert_rgba_vae

        parser = argparse.ArgumentParser()
        convert_rgba_vae.add_arguments(parser)
        out = tmp_path / "c.safetensors"
        assert convert_rgba_vae.run(parser.parse_args([str(tiny_files["layerdiffuse_pth"]), "--out", str(out)])) == 0
        assert detect_rgba_vae_format(out) == "layerdiffuse-flux"
