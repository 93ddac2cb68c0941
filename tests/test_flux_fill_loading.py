"""Offline FLUX.1-Fill transformer loading: key mapping, fp8 / scaled fp8, config inference, error paths."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from bfs_core.models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
from bfs_core.models.flux_keys import bfl_to_diffusers, diffusers_to_bfl
from bfs_core.models.fp8 import dequantize_state_dict, quantize_state_dict_fp8
from bfs_core.tiny import write_tiny_flux_fill


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_flux_fill(tmp_path_factory.mktemp("tiny_flux"), seed=0)


@pytest.fixture(scope="module")
def reference(tiny):
    return load_flux_fill_transformer(tiny["diffusers"])


def _inputs(model, batch=2, s_img=16, s_txt=8):
    generator = torch.Generator("cpu").manual_seed(0)
    cfg = model.config
    rows = torch.arange(s_img) // 4
    cols = torch.arange(s_img) % 4
    return {
        "hidden_states": torch.randn(batch, s_img, cfg.in_channels, generator=generator).bfloat16(),
        "encoder_hidden_states": torch.randn(batch, s_txt, cfg.joint_attention_dim, generator=generator).bfloat16(),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=generator).bfloat16(),
        "timestep": torch.tensor([0.0, 0.7]).bfloat16(),
        "guidance": torch.full([batch], 30.0).bfloat16(),
        "img_ids": torch.stack([torch.zeros(s_img), rows, cols], dim=1),
        "txt_ids": torch.zeros(s_txt, 3),
        "return_dict": False,
    }


def _forward(model):
    with torch.no_grad():
        return model(**_inputs(model))[0].float()


class TestShippedConfigs:
    def test_transformer_config_is_fill(self):
        cfg = load_shipped_config("flux_fill_transformer")
        assert cfg["_class_name"] == "FluxTransformer2DModel"
        assert (cfg["in_channels"], cfg["out_channels"], cfg["axes_dims_rope"]) == (384, 64, [16, 56, 56])

    def test_scheduler_config_builds(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(load_shipped_config("flux_fill_scheduler.json"))
        assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="must be one of"):
            load_shipped_config("nope")


class TestKeyMapping:
    def test_round_trip_is_identity(self, reference):
        sd = reference.state_dict()
        back = bfl_to_diffusers(diffusers_to_bfl(sd))
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)

    def test_bfl_round_trip_is_identity(self, tiny):
        bfl = load_file(tiny["bfl_bf16"])
        back = diffusers_to_bfl(bfl_to_diffusers(bfl))
        assert set(back) == set(bfl)
        assert all(torch.equal(back[k], bfl[k]) for k in bfl)

    def test_fused_and_swapped_layouts(self, reference):
        sd = reference.state_dict()
        bfl = diffusers_to_bfl(sd)
        hidden = sd["x_embedder.weight"].shape[0]
        linear1 = bfl["single_blocks.1.linear1.weight"]
        assert linear1.shape[0] == 7 * hidden  # [q | k | v | mlp (4D)]
        assert torch.equal(linear1[2 * hidden : 3 * hidden], sd["single_transformer_blocks.1.attn.to_v.weight"])
        assert torch.equal(linear1[3 * hidden :], sd["single_transformer_blocks.1.proj_mlp.weight"])
        assert torch.equal(
            bfl["double_blocks.0.txt_attn.qkv.bias"][hidden : 2 * hidden],
            sd["transformer_blocks.0.attn.add_k_proj.bias"],
        )
        assert torch.equal(
            bfl["double_blocks.0.img_attn.norm.key_norm.scale"], sd["transformer_blocks.0.attn.norm_k.weight"]
        )
        # BFL final modulation is (shift, scale); diffusers norm_out.linear is (scale, shift).
        ada = bfl["final_layer.adaLN_modulation.1.weight"]
        assert torch.equal(ada[:hidden], sd["norm_out.linear.weight"][hidden:])
        assert torch.equal(ada[hidden:], sd["norm_out.linear.weight"][:hidden])

    @pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
    def test_prefixes_are_stripped(self, tiny, prefix):
        bfl = load_file(tiny["bfl_bf16"])
        plain = bfl_to_diffusers(bfl)
        prefixed = bfl_to_diffusers({prefix + k: v for k, v in bfl.items()})
        assert set(prefixed) == set(plain)

    def test_unknown_keys_are_listed(self, tiny):
        bfl = load_file(tiny["bfl_bf16"])
        bfl["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
        with pytest.raises(ValueError, match=r"my_file\.safetensors.*1 key\(s\).*lora_up"):
            bfl_to_diffusers(bfl, source="my_file.safetensors")

    def test_bfl_to_diffusers_equals_diffusers_own_converter(self, reference):
        """Checked against diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, not only against itself.

        diffusers hard-codes the real width (3072) in its split of `linear1`, so the BFL dict here has the real row
        counts for every fused or swapped tensor and two columns; the other tensors are small. All values are
        distinct, so any wrong split, order or swap changes some value.
        """
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        hidden = 3072
        rows = {
            "img_in.weight": hidden,
            "img_in.bias": hidden,
            "final_layer.adaLN_modulation.1.weight": 2 * hidden,
            "final_layer.adaLN_modulation.1.bias": 2 * hidden,
        }
        gen = torch.Generator().manual_seed(0)
        bfl = {}
        for key, tensor in diffusers_to_bfl(reference.state_dict()).items():
            n = rows.get(key, 3 * hidden if ".qkv." in key else 7 * hidden if ".linear1." in key else 5)
            bfl[key] = torch.randn(n, 2, generator=gen) if tensor.ndim == 2 else torch.randn(n, generator=gen)
        theirs_input = dict(bfl)
        theirs = convert_flux_transformer_checkpoint_to_diffusers(theirs_input)  # pops what it converts
        ours = bfl_to_diffusers(bfl)
        assert theirs_input == {}  # diffusers consumed every key we name in the BFL layout
        assert set(theirs) == set(reference.state_dict())  # ... and produced every parameter of the model
        assert set(ours) == set(theirs)
        assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
        back = diffusers_to_bfl(theirs)
        assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)


class TestSingleFileLoading:
    def test_bf16_state_dict_is_exact(self, tiny, reference):
        model = load_flux_fill_transformer(tiny["bfl_bf16"])
        ref, got = reference.state_dict(), model.state_dict()
        assert set(ref) == set(got)
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)
        assert model.config.axes_dims_rope == [4, 14, 14]  # inferred, since the shapes are not the shipped config

    def test_bf16_forward_equals_diffusers_folder(self, tiny, reference):
        out = _forward(load_flux_fill_transformer(tiny["bfl_bf16"]))
        ref = _forward(reference)
        assert out.shape == (2, 16, 64)
        assert ref.std() > 0.1  # the random weights make the output sensitive
        assert torch.equal(out, ref)

    def test_transformer_subfolder_and_diffusers_key_file(self, tiny, reference, tmp_path):
        sub = load_flux_fill_transformer(tiny["diffusers"] / "transformer")
        path = tmp_path / "diffusers_keys.safetensors"
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
        single = load_flux_fill_transformer(path)
        for model in (sub, single):
            assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())

    def test_plain_fp8_is_upcast(self, tiny, reference):
        raw = load_file(tiny["bfl_fp8"])
        assert {t.dtype for t in raw.values()} == {torch.float8_e4m3fn}
        model = load_flux_fill_transformer(tiny["bfl_fp8"])
        bfl = diffusers_to_bfl(model.state_dict())
        assert all(torch.equal(bfl[k], raw[k].to(torch.bfloat16)) for k in raw)  # e4m3 -> bf16 is exact
        out, ref = _forward(model), _forward(reference)
        # fp8 keeps 3 mantissa bits (<= 6.25 % relative rounding per weight); through 3 blocks the output moves
        # by a few percent of its scale.
        assert (out - ref).abs().max() < 0.15 * ref.abs().max()
        assert (out - ref).norm() < 0.1 * ref.norm()

    @pytest.mark.parametrize("name", ["bfl_fp8_scaled", "bfl_fp8_comfy_quant"])
    def test_scaled_fp8_is_dequantised(self, tiny, reference, name):
        raw = load_file(tiny[name])
        scale_suffix = ".scale_weight" if name == "bfl_fp8_scaled" else ".weight_scale"
        scaled = [k[: -len(scale_suffix)] for k in raw if k.endswith(scale_suffix)]
        assert len(scaled) == 26  # every Linear of the tiny model
        model = load_flux_fill_transformer(tiny[name])
        got = diffusers_to_bfl(model.state_dict())
        bf16 = load_file(tiny["bfl_bf16"])
        for layer in scaled:
            fp8, scale = raw[f"{layer}.weight"], raw[f"{layer}{scale_suffix}"]
            assert fp8.dtype == torch.float8_e4m3fn and scale.ndim == 0
            assert torch.equal(got[f"{layer}.weight"], (fp8.float() * scale).to(torch.bfloat16))
            # Ignoring the scale would give fp8 values near +-448: far from the bf16 weights.
            ref = bf16[f"{layer}.weight"].float()
            assert (got[f"{layer}.weight"].float() - ref).abs().max() <= 0.07 * ref.abs().max()
        out, ref_out = _forward(model), _forward(reference)
        assert (out - ref_out).norm() < 0.1 * ref_out.norm()

    def test_scale_input_and_metadata_formats(self, tiny, reference, tmp_path):
        # Legacy file with a scale_input and a prefixed marker, as a ComfyUI all-in-one checkpoint stores it.
        raw = load_file(tiny["bfl_fp8_scaled"])
        raw["img_in.scale_input"] = torch.tensor(1.0)
        raw = {"model.diffusion_model." + k: v for k, v in raw.items()}
        raw["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a VAE tensor of an all-in-one file
        legacy = tmp_path / "legacy.safetensors"
        save_file(raw, str(legacy))
        # Newer layout with the per-layer config in the safetensors header instead of comfy_quant tensors.
        new = load_file(tiny["bfl_fp8_comfy_quant"])
        layers = {k[: -len(".comfy_quant")]: {"format": "float8_e4m3fn"} for k in new if k.endswith(".comfy_quant")}
        new = {k: v for k, v in new.items() if not k.endswith(".comfy_quant")}
        header = tmp_path / "header.safetensors"
        save_file(new, str(header), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
        expected = load_flux_fill_transformer(tiny["bfl_fp8_scaled"]).state_dict()
        for path in (legacy, header):
            got = load_flux_fill_transformer(path).state_dict()
            assert all(torch.equal(got[k], expected[k]) for k in expected)

    def test_unsupported_comfy_quant_format(self, tiny, tmp_path):
        raw = load_file(tiny["bfl_fp8_comfy_quant"])
        raw["img_in.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
        path = tmp_path / "nvfp4.safetensors"
        save_file(raw, str(path))
        with pytest.raises(ValueError, match="'nvfp4'.*bf16 or fp8"):
            load_flux_fill_transformer(path)

    def test_logs_one_summary_line(self, tiny, caplog):
        with caplog.at_level(logging.INFO, logger="bfs_core.models.flux_fill_loading"):
            load_flux_fill_transformer(tiny["bfl_fp8_scaled"])
        lines = [r.getMessage() for r in caplog.records if r.name == "bfs_core.models.flux_fill_loading"]
        assert len(lines) == 1
        assert "26 scaled fp8 layers dequantised" in lines[0] and "float8_e4m3fn" in lines[0]


class TestScaledFp8Format:
    def test_scaled_beats_plain_cast_on_small_weights(self):
        # Real FLUX weights are small (std ~0.02): a plain e4m3 cast flushes much of them into subnormals
        # (min normal 2**-6), while scaling by amax/448 keeps them in the normal range.
        weight = torch.randn(64, 64, generator=torch.Generator("cpu").manual_seed(0)) * 0.004
        quantized = quantize_state_dict_fp8({"x.weight": weight}, scaled=True)
        assert quantized["scaled_fp8"].dtype == torch.float8_e4m3fn and quantized["scaled_fp8"].numel() == 0
        assert quantized["x.scale_weight"].dtype == torch.float32
        dequantized, n_scaled = dequantize_state_dict(quantized, dtype=torch.float32)
        assert n_scaled == 1 and set(dequantized) == {"x.weight"}
        scaled_error = (dequantized["x.weight"] - weight).norm()
        plain_error = (weight.to(torch.float8_e4m3fn).float() - weight).norm()
        assert scaled_error < 0.2 * plain_error
        ignored_scale = quantized["x.weight"].float()  # what a loader that only casts would produce
        assert (ignored_scale - weight).norm() > 100 * weight.norm()

    def test_per_row_scale(self):
        weight = torch.randn(4, 8)
        scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
        fp8 = (weight / scale[:, None]).to(torch.float8_e4m3fn)
        sd, _ = dequantize_state_dict({"x.weight": fp8, "x.weight_scale": scale}, dtype=torch.float32)
        assert torch.equal(sd["x.weight"], fp8.float() * scale[:, None])


class TestErrors:
    def test_non_fill_file(self, tiny):
        with pytest.raises(ValueError) as info:
            load_flux_fill_transformer(tiny["bfl_non_fill"])
        message = str(info.value)
        assert tiny["bfl_non_fill"].name in message
        assert "FLUX.1-dev" in message and "64 input channels" in message
        assert "BFS needs FLUX.1-Fill-dev" in message

    def test_non_fill_diffusers_folder(self, tmp_path, reference):
        cfg = {k: v for k, v in reference.config.items() if not k.startswith("_")} | {"in_channels": 64}
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="BFS needs FLUX.1-Fill-dev"):
            load_flux_fill_transformer(tmp_path)

    def test_non_flux_file(self, tmp_path):
        path = tmp_path / "vae.safetensors"
        save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
        with pytest.raises(ValueError, match=r"vae\.safetensors.*not a FLUX transformer.*FLUX\.1-Fill-dev"):
            load_flux_fill_transformer(path)

    def test_missing_keys_are_reported(self, tiny, tmp_path):
        raw = load_file(tiny["bfl_bf16"])
        del raw["single_blocks.1.linear2.bias"]
        path = tmp_path / "incomplete.safetensors"
        save_file(raw, str(path))
        with pytest.raises(ValueError, match=r"1 are missing.*single_transformer_blocks\.1\.proj_out\.bias"):
            load_flux_fill_transformer(path)

    def test_config_mismatch_and_head_dim(self, tiny, reference, tmp_path):
        with pytest.raises(ValueError, match="num_layers"):
            load_flux_fill_transformer(tiny["bfl_bf16"], config=dict(reference.config) | {"num_layers": 2})
        given = load_flux_fill_transformer(tiny["bfl_bf16"], config=str(tiny["diffusers"]))
        assert given.config.axes_dims_rope == [4, 14, 14]

    def test_missing_path(self, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            load_flux_fill_transformer(tmp_path / "nope.safetensors")
