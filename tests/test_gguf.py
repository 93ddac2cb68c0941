"""GGUF Flux-Fill bases (ComfyUI-GGUF files) through diffusers' GGUF support: dequantisation, outputs, BFS on top,
errors. Tiny Q8_0 / Q4_K files from `bfs_core.tiny.gguf` (what `make-tiny` writes)."""

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from bfs_core.errors import UserInputError
from bfs_core.models.bfs_checkpoint import load_bfs
from bfs_core.models.dual_flux import BranchLoRALinear, DualBranchConfig, DualBranchFlux, bfs_state_dict
from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
from bfs_core.models.gguf import dequantize_weight, quant_summary
from bfs_core.tiny import dual_inputs, randomize_bfs_parameters, write_tiny_flux_fill
from bfs_core.tiny.gguf import flux_gguf_tensors, write_gguf, write_tiny_flux_fill_gguf


gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)

# GGUF dequantisation in diffusers computes in fp16 (the block scales are fp16; with fp32 it is bit-exact); gguf's
# numpy reference works in fp32. Q4_K's d·sc·q - dmin·m cancels, so the fp16 rounding is relative to the tensor's
# range, not to each value: |a - b| <= 2^-9 max|W| (measured up to 2^-10.3 max|W|).
DEQUANT_REL_TO_MAX = 2.0**-9
# The GGUF model in fp32 against the plain fp32 model holding gguf's reference dequantisation: relative L2 error of the
# velocity (only the fp16 dequantisation rounding above differs).
FP32_REFERENCE_MAX_REL_ERROR = 2e-3
# Q8_0 vs the bf16 model it was quantised from: relative L2 error of the velocity (measured 0.4-0.6 %).
Q8_0_MAX_REL_ERROR = 0.02


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {**write_tiny_flux_fill(out / "st", seed=0), **write_tiny_flux_fill_gguf(out, seed=0)}


def _raw_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _dequantised_twin(model: FluxTransformer2DModel, dtype=torch.bfloat16, by="loader") -> FluxTransformer2DModel:
    """The same weights as a plain model, dequantised by the loader (`dequantize_weight`, checked against gguf's own
    code above) or by the gguf package's numpy code (`by="gguf"`, the reference)."""
    twin = FluxTransformer2DModel.from_config(model.config).to(dtype).eval()
    sd = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "quant_type") and by == "gguf":
            raw = tensor.as_tensor().numpy()
            sd[name] = torch.from_numpy(gguf.quants.dequantize(raw, tensor.quant_type).copy()).to(dtype)
        elif hasattr(tensor, "quant_type"):
            sd[name] = dequantize_weight(tensor, dtype)
        else:
            sd[name] = tensor.to(dtype)
    twin.load_state_dict(sd, strict=True)
    return twin


def _velocity(transformer, inputs, bfs_seed=None, preset="release"):
    model = DualBranchFlux(transformer, DualBranchConfig.preset(preset))
    if bfs_seed is not None:
        randomize_bfs_parameters(transformer, seed=bfs_seed)
    with torch.no_grad():
        return model(**inputs)


def _inputs(dtype=torch.bfloat16):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in dual_inputs(n=1).items()}


@pytest.mark.parametrize("key, quant", [("gguf_q4_k", "Q4_K"), ("gguf_q8_0", "Q8_0")])
def test_loader_dequantisation_matches_gguf_reference(files, key, quant):
    raw = _raw_tensors(files[key])
    model = load_flux_fill_transformer(files[key], torch_dtype=torch.bfloat16)
    quantised = {n: p for n, p in model.named_parameters() if getattr(p, "quant_type", None) is not None}
    assert sum(getattr(p.quant_type, "name", "") == quant for p in quantised.values()) >= 10
    # Unfused tensors map one to one (BFL img_mlp.0 = diffusers ff.net.0.proj); check every quantised one of them.
    pairs = {"transformer_blocks.0.ff.net.0.proj.weight": "double_blocks.0.img_mlp.0.weight"}
    pairs |= {f"single_transformer_blocks.{i}.proj_out.weight": f"single_blocks.{i}.linear2.weight" for i in (0, 1)}
    pairs |= {"x_embedder.weight": "img_in.weight", "context_embedder.weight": "txt_in.weight"}
    for ours, bfl in pairs.items():
        reference = gguf.quants.dequantize(raw[bfl].data, raw[bfl].tensor_type)
        mine = dequantize_weight(quantised[ours], torch.float32).numpy()
        atol = DEQUANT_REL_TO_MAX * np.abs(reference).max()
        np.testing.assert_allclose(mine, reference, rtol=0, atol=atol, err_msg=ours)
        assert np.abs(reference).max() > 0


def test_q4_k_blocks_are_valid_and_fan_in_scaled(files):
    raw = _raw_tensors(files["gguf_q4_k"])
    q4k = [t for t in raw.values() if t.tensor_type == gguf.GGMLQuantizationType.Q4_K]
    assert len(q4k) >= 20
    for tensor in q4k:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        fan_in = values.shape[-1]
        assert np.isfinite(values).all()
        assert 0.3 / np.sqrt(fan_in) < values.std() < 3 / np.sqrt(fan_in), tensor.name
        assert abs(values.mean()) < 0.5 / np.sqrt(fan_in), tensor.name


@pytest.mark.parametrize("key", ["gguf_q8_0", "gguf_q4_k"])
def test_gguf_base_gives_the_dequantised_models_output_exactly(files, key):
    model = load_flux_fill_transformer(files[key], torch_dtype=torch.bfloat16)
    twin = _dequantised_twin(model)
    inputs = _inputs()
    for got, want in zip(_velocity(model, inputs), _velocity(twin, inputs)):
        assert want.float().abs().mean() > 0.1
        assert torch.equal(got, want)


@pytest.mark.parametrize("key", ["gguf_q8_0", "gguf_q4_k"])
def test_gguf_base_matches_the_gguf_reference_dequantisation_in_fp32(files, key):
    model = load_flux_fill_transformer(files[key], torch_dtype=torch.float32)
    twin = _dequantised_twin(model, torch.float32, by="gguf")
    inputs = _inputs(torch.float32)
    for got, want in zip(_velocity(model, inputs), _velocity(twin, inputs)):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= FP32_REFERENCE_MAX_REL_ERROR, rel


def test_q8_0_stays_close_to_the_bf16_model(files):
    q8 = load_flux_fill_transformer(files["gguf_q8_0"], torch_dtype=torch.bfloat16)
    bf16 = load_flux_fill_transformer(files["bfl_bf16"], torch_dtype=torch.bfloat16)
    inputs = _inputs()
    for got, want in zip(_velocity(q8, inputs), _velocity(bf16, inputs)):
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert 0 < rel <= Q8_0_MAX_REL_ERROR


@pytest.mark.parametrize("preset", ["paper", "release"])  # paper: content LoRAs on the block Linears + joint (MLP g)
def test_bfs_runs_on_a_gguf_base_with_its_weights_left_quantised(files, preset):
    model = load_flux_fill_transformer(files["gguf_q4_k"], torch_dtype=torch.bfloat16)
    twin = _dequantised_twin(model)
    fresh = _dequantised_twin(model)
    inputs = _inputs()
    v_gguf = _velocity(model, inputs, bfs_seed=3, preset=preset)
    v_twin = _velocity(twin, inputs, bfs_seed=3, preset=preset)  # the same BFS weights (same seed and order)
    to_q = model.single_transformer_blocks[0].attn.to_q
    assert to_q.weight.quant_type == gguf.GGMLQuantizationType.Q4_K
    if preset == "paper":
        assert isinstance(to_q, BranchLoRALinear) and to_q.lora_A["comp"].weight.dtype == torch.bfloat16
    torch.testing.assert_close(bfs_state_dict(model), bfs_state_dict(twin))
    base = _velocity(fresh, inputs)  # zero adapters: the BFS weights must change the output
    for got, want, plain in zip(v_gguf, v_twin, base):
        assert torch.equal(got, want)
        assert (got.float() - plain.float()).abs().mean() > 0.05
    assert quant_summary(model)["Q4_K"] >= 20


def test_shipped_tiny_bfs_weights_load_on_the_q8_0_gguf_base(files, tmp_path):
    from bfs_core.tiny import write_tiny_set

    paths = write_tiny_set(tmp_path / "set")
    model = load_bfs(load_flux_fill_transformer(paths["gguf_q8_0"]), paths["bfs_release"], name="--bfs")
    plain = load_bfs(load_flux_fill_transformer(paths["bfl_bf16"]), paths["bfs_release"], name="--bfs")
    inputs = _inputs()
    with torch.no_grad():
        got, want = model(**inputs), plain(**inputs)
    for g, w in zip(got, want):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() <= Q8_0_MAX_REL_ERROR


# -- errors -----------------------------------------------------------------------------------------------------------
def _expect_error(path, *fragments):
    with pytest.raises(UserInputError) as info:
        load_flux_fill_transformer(path, name="--base")
    message = str(info.value)
    assert "--base" in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_file_that_is_not_gguf_is_named(files, tmp_path):
    fake = tmp_path / "flux1-fill-dev-Q8_0.gguf"
    fake.write_bytes(files["bfl_bf16"].read_bytes())  # a safetensors file renamed
    _expect_error(fake, "is not a GGUF file")


def test_a_truncated_gguf_is_named(files, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["gguf_q8_0"].read_bytes()[:5000])
    _expect_error(cut, "not a complete GGUF file")


def test_an_unsupported_quant_type_is_named(tmp_path):
    types = gguf.GGMLQuantizationType
    rows, cols = 4, 256
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[types.IQ2_XXS]
    raw = np.zeros((rows, cols // block_values * block_bytes), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq2.gguf", {"img_in.weight": (raw, types.IQ2_XXS)})
    _expect_error(path, "IQ2_XXS", "Supported")


def test_a_non_fill_gguf_is_named(tmp_path):
    from bfs_core.tiny.flux import _random_flux, _tiny_fill_config

    dev_like = _random_flux(_tiny_fill_config(in_channels=64), 1)
    path = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", flux_gguf_tensors(dev_like, "Q8_0", 0))
    _expect_error(path, "64 input channels", "FLUX.1-Fill-dev")


def test_a_gguf_that_is_not_flux_is_named(tmp_path):
    weights = np.zeros((8, 32), dtype=np.float32)
    path = write_gguf(tmp_path / "llm.gguf", {"token_embd.weight": (weights, gguf.GGMLQuantizationType.F32)}, "llama")
    _expect_error(path, "not a FLUX transformer")


# -- headless ---------------------------------------------------------------------------------------------------------
def test_headless_bg2fg_on_a_gguf_base_is_the_same_with_every_offload_mode(tmp_path):
    """`python -m bfs_core generate --base x.gguf --offload ...` (in this process: `main` is what the command runs)."""
    from PIL import Image
    from safetensors.torch import load_file

    from bfs_core.__main__ import main
    from bfs_core.tiny import write_tiny_set

    tiny = write_tiny_set(tmp_path / "tiny")
    Image.new("RGB", (64, 64), (100, 150, 200)).save(tmp_path / "bg.png")
    from bfs_core.offload import group_offloading_needs_an_accelerator

    modes = ("none", "model") if group_offloading_needs_an_accelerator() else ("none", "model", "block")
    latents = {}
    for mode in modes:
        args = ["--base", tiny["gguf_q8_0"], "--vae", tiny["vae"], "--text-encoders", tiny["text_encoders"]]
        args += ["--bfs", tiny["bfs_release"], "--background", tmp_path / "bg.png", "--box", "8,8,40,48"]
        args += ["--prompt", "a red cube", "--steps", "2", "--offload", mode, "--out", tmp_path / mode]
        assert main(["generate", "--device", "cpu", *map(str, args)]) == 0
        latents[mode] = load_file(tmp_path / mode / "fg_latent.safetensors")
    assert latents["none"] and all(v.abs().mean() > 0 for v in latents["none"].values())
    for mode in modes[1:]:  # block needs a GPU with diffusers 0.35 (see test_offload.py)
        assert latents[mode].keys() == latents["none"].keys()
        for key, value in latents["none"].items():
            assert torch.equal(latents[mode][key], value), (mode, key)
