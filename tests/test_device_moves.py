"""Every model the nodes and the CLI build, loaded as they load it and moved as ComfyUI moves it.

CI has no GPU, so the `meta` device stands in for CUDA: a model is built on the CPU (as Load BFS, Load RGBA VAE, Load
Decomposition Model and the toy loader do), moved with `.to("meta")` (ComfyUI's ModelPatcher moves the whole module it
wraps this way; the real ModelPatcher path is tested in tests/comfyui/test_model_patcher.py), then run once. Any
tensor the model uses that did not move — a cache held in a dict, a table made at load time, noise drawn on the CPU —
meets meta tensors and raises "Tensor on device cpu is not on the expected device meta".

The same models are loaded in bf16, as the nodes load them for a GPU, and compared with the fp32 load: the relative
L2 error ‖bf16 − fp32‖ / ‖fp32‖ of each output stays under `BF16_REL_TOL` (fp8 storage: `FP8_REL_TOL`), or for models
on the tiny random Flux-Fill under 1.25× that base's own bf16 error (see `_plain_fill_bf16_error`). Measured: the toy
models 0.040 / 0.060 (velocities), 0.007 (VAE latent), 0.018 (RGBA layer); the tiny random base 0.36 alone, and every
BFS build on it within 1 % of that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from bfs_core.models.bfs_checkpoint import load_bfs
from bfs_core.models.dual_flux import DualBranchFlux, JointAttention, store_weights_in_fp8
from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
from bfs_core.sampling.flow_match import latent_image_ids
from bfs_core.tiny import write_tiny_set
from bfs_core.tiny.flux import dual_inputs


BF16_REL_TOL = 0.08
FP8_REL_TOL = 0.15
META = torch.device("meta")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_set(tmp_path_factory.mktemp("tiny_moves"))


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen)


def _to(tensors: dict, device=None, dtype=None) -> dict:
    return {
        k: (v.to(device=device, dtype=dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v)
        for k, v in tensors.items()
    }


@dataclass
class Case:
    """A model as its loader builds it (`build(dtype)`), the module a ComfyUI ModelPatcher (or `.to`) moves, and one
    call of it as the pipeline makes it (`run(model, device, dtype)` -> output tensors)."""

    build: Callable[[torch.dtype], object]
    run: Callable[[object, torch.device, torch.dtype], tuple[torch.Tensor, ...]]
    rel_tol: float = BF16_REL_TOL
    # fp8 storage is a bf16-only build: its fp32 reference is the same weights loaded without it (this case).
    fp32_twin: Case | None = None


# -- the dual-branch BFS model, from every weight format ------------------------------------------------------------
def _bfs_inputs(transformer):
    return dual_inputs(width=transformer.config.joint_attention_dim)


def _run_bfs(model: DualBranchFlux, device, dtype):
    inputs = _to(_bfs_inputs(model.transformer), device, dtype)
    with torch.no_grad():
        return model(**inputs)


def _bfs_case(tiny_key: str, bfs_key: str, fp8: bool = False) -> Case:
    def build(dtype):
        # As Load BFS: the base on the CPU in the compute dtype, BFS weights applied (and folded), fp8 storage last.
        compute = torch.bfloat16 if fp8 else dtype
        transformer = load_flux_fill_transformer(TINY[tiny_key], torch_dtype=compute, device="cpu")
        dual = load_bfs(transformer, TINY[bfs_key])
        if fp8:
            store_weights_in_fp8(transformer, compute_dtype=compute)
        return dual

    if fp8:
        return Case(build, _run_bfs, rel_tol=FP8_REL_TOL, fp32_twin=_bfs_case(tiny_key, bfs_key))
    return Case(build, _run_bfs)


# -- the decomposition model ----------------------------------------------------------------------------------------
def _build_decomposition(dtype):
    from bfs_core.models.layer_decomposition import apply_decomposition_weights

    transformer = load_flux_fill_transformer(TINY["diffusers"], torch_dtype=dtype, device="cpu")
    return apply_decomposition_weights(transformer, TINY["decomposition"])


def _run_decomposition(model, device, dtype):
    gen = torch.Generator().manual_seed(0)
    cfg = model.transformer.config
    h = w = 8
    length = (h // 2) * (w // 2)
    tokens = {k: _randn(1, length, 64, gen=gen).to(device, dtype) for k in model.config.modalities}
    query = _randn(1, length, 64, gen=gen).to(device, dtype)
    ids = latent_image_ids(h, w, device=device, dtype=dtype)
    contexts = _randn(1, length, 640, gen=gen).to(device, dtype)
    with torch.no_grad():
        fused = model.fuse(tokens, query, ids)
        condition = torch.cat([contexts, fused.to(dtype)], -1)
        v_bg, v_fg = model(
            _randn(1, length, 64, gen=gen).to(device, dtype),
            _randn(1, length, 64, gen=gen).to(device, dtype),
            condition,
            _randn(1, 6, cfg.joint_attention_dim, gen=gen).to(device, dtype),
            _randn(1, cfg.pooled_projection_dim, gen=gen).to(device, dtype),
            0.6,
            0.6,
            ids,
        )
    return fused, v_bg, v_fg


# -- Φ --------------------------------------------------------------------------------------------------------------
def _build_phi(dtype):
    from bfs_core.models.composition_unet import build_composition_unet

    torch.manual_seed(0)
    return build_composition_unet(block_out_channels=(32, 64), norm_num_groups=8).to(dtype).eval()


def _run_phi(phi, device, dtype):
    from bfs_core.models.composition_unet import compose_latents

    gen = torch.Generator().manual_seed(0)
    z_fg, z_bg = (_randn(1, 16, 8, 8, gen=gen).to(device, dtype) for _ in range(2))
    with torch.no_grad():
        return (compose_latents(phi, z_fg, z_bg),)


# -- the RGBA VAEs (as Load RGBA VAE: load_rgba_decoder) -------------------------------------------------------------
def _rgba_case(tiny_key: str) -> Case:
    def build(dtype):
        from bfs_core.models.rgba_vae import load_rgba_decoder

        return load_rgba_decoder(TINY[tiny_key], device="cpu", dtype=dtype)

    def run(decoder, device, dtype):
        gen = torch.Generator().manual_seed(0)
        latent = _randn(1, 16, 8, 8, gen=gen).to(device, dtype)
        rgb = torch.rand(1, 3, 64, 64, generator=gen).to(device, dtype) if decoder.needs_rgb else None
        with torch.no_grad():
            return (decoder.decode(latent, rgb=rgb, tta=False),)

    return Case(build, run)


# -- the toy models (as Load BFS Toy Model: load_toy) ----------------------------------------------------------------
def _build_toy(dtype):
    from bfs_core.toy.models import load_toy

    pipe, rgba = load_toy()
    pipe.model.to(dtype)
    pipe.codec.vae.to(dtype)
    rgba.to(dtype=dtype)
    return pipe, rgba


def _run_toy(models, device, dtype):
    from bfs_core.toy.models import encode_toy_prompt

    pipe, rgba = models
    embeds, pooled = encode_toy_prompt(pipe.text_encoders, "a red cube")
    inputs = _to(_bfs_inputs(pipe.model.transformer), device, dtype)
    inputs["prompt_embeds"], inputs["pooled"] = embeds.to(device, dtype), pooled.to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v_comp, v_fg = pipe.model(**inputs)
        image = torch.rand(1, 3, 64, 64, generator=gen).to(device, dtype)
        latent = pipe.codec.encode_images(image)
        decoded = pipe.codec.decode_latents(latent)
        layer = rgba.decode(latent.to(dtype))
    return v_comp, v_fg, latent, decoded, layer


def _move_toy(models, device=None, dtype=None):
    pipe, rgba = models
    pipe.model.to(device=device, dtype=dtype)
    pipe.codec.vae.to(device=device, dtype=dtype)
    rgba.to(device=device, dtype=dtype)


# -- the headless CLI's Flux VAE and text encoders (load_pipeline) ----------------------------------------------------
def _build_flux_vae(dtype):
    from diffusers import AutoencoderKL

    from bfs_core.pipelines.codec import DiffusersFluxVAE

    return DiffusersFluxVAE(AutoencoderKL.from_pretrained(TINY["vae"], torch_dtype=dtype, local_files_only=True))


def _run_flux_vae(codec, device, dtype):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    latent = codec.encode_images(image)
    return latent, codec.decode_latents(latent)


def _build_text_encoders(dtype):
    from bfs_core.text_encoders import FluxTextEncoders

    return FluxTextEncoders.from_pretrained(TINY["text_encoders"], torch_dtype=dtype, device="cpu")


def _run_text_encoders(encoders, device, dtype):
    # The tokenizers make their ids on the CPU: `encode` must bring them to the encoders' device.
    return encoders.encode(["a ceramic vase on a table"], max_sequence_length=32)


CASES: dict[str, Case] = {
    "bfs official .pt on diffusers folder": _bfs_case("diffusers", "bfs_official_pt"),
    "bfs release safetensors": _bfs_case("diffusers", "bfs_release"),
    "bfs paper safetensors": _bfs_case("diffusers", "bfs_paper"),
    "bfs official .pt on BFL bf16 file": _bfs_case("bfl_bf16", "bfs_official_pt"),
    "bfs official .pt on BFL fp8 file": _bfs_case("bfl_fp8", "bfs_official_pt"),
    "bfs official .pt on ComfyUI scaled fp8": _bfs_case("bfl_fp8_scaled", "bfs_official_pt"),
    "bfs official .pt on ComfyUI comfy_quant fp8": _bfs_case("bfl_fp8_comfy_quant", "bfs_official_pt"),
    "bfs official .pt, fp8 storage": _bfs_case("diffusers", "bfs_official_pt", fp8=True),
    "bfs paper, fp8 storage": _bfs_case("diffusers", "bfs_paper", fp8=True),
    "decomposition": Case(_build_decomposition, _run_decomposition),
    "phi": Case(_build_phi, _run_phi),
    "rgba release transparency VAE folder": _rgba_case("rgba_bfs_release_folder"),
    "rgba release transparency VAE file": _rgba_case("rgba_bfs_release_single"),
    "rgba LayerDiffuse TransparentVAE .pth": _rgba_case("rgba_layerdiffuse_pth"),
    "toy models": Case(_build_toy, _run_toy),
    "flux vae (headless codec)": Case(_build_flux_vae, _run_flux_vae),
    "text encoders (headless)": Case(_build_text_encoders, _run_text_encoders),
}
TINY: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _tiny_paths(tiny):
    TINY.clear()
    TINY.update({k: str(v) for k, v in tiny.items()})
    yield
    TINY.clear()


def _move(model, device=None, dtype=None):
    if isinstance(model, tuple):
        _move_toy(model, device, dtype)
    elif not isinstance(model, torch.nn.Module) and not hasattr(model, "to"):
        for module in _modules(model):
            module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    else:
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _modules(model) -> list[torch.nn.Module]:
    if isinstance(model, tuple):
        pipe, rgba = model
        return [pipe.model, pipe.codec.vae, getattr(rgba, "vae", rgba)]
    if hasattr(model, "text_encoder_2"):
        return [model.text_encoder, model.text_encoder_2]
    return [getattr(model, "vae", model)]


@pytest.mark.parametrize("name", list(CASES))
def test_model_runs_on_another_device_after_the_move(name):
    case = CASES[name]
    dtype = torch.bfloat16 if case.fp32_twin else torch.float32
    model = case.build(dtype)
    cpu_out = case.run(model, torch.device("cpu"), dtype)
    _move(model, META)
    left = [
        f"{type(module).__name__}.{n}"
        for module in _modules(model)
        for n, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device != META
    ]
    assert not left, f"{name}: tensors not moved with the model: {left[:5]}"
    meta_out = case.run(model, META, dtype)
    assert len(meta_out) == len(cpu_out)
    for m, c in zip(meta_out, cpu_out):
        assert m.device == META and m.shape == c.shape


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


_BASE_ERRORS: dict[str, float] = {}


def _plain_fill_bf16_error(tiny_key: str) -> float:
    """The bf16 error of the plain Flux-Fill base on the same inputs: the floor any model built on it can reach.

    The tiny random base is badly conditioned for bf16 (≈ 0.36 relative error on its own; the trained toy base ≈ 0.05),
    so BFS models are held to "no worse than their base": a BFS part computed in the wrong precision or a dtype mix-up
    adds error on top of it.
    """
    from bfs_core.models.dual_flux import run_two_branches

    if tiny_key not in _BASE_ERRORS:
        outs = []
        for dtype in (torch.float32, torch.bfloat16):
            transformer = load_flux_fill_transformer(TINY[tiny_key], torch_dtype=dtype, device="cpu")
            x = _to(_bfs_inputs(transformer), None, dtype)
            with torch.no_grad():
                outs.append(
                    run_two_branches(
                        transformer,
                        torch.cat([x["comp_latents"], x["fill_cond"]], -1),
                        torch.cat([x["fg_latents"], x["fill_cond"]], -1),
                        x["prompt_embeds"],
                        x["pooled"],
                        x["timestep_comp"],
                        x["timestep_fg"],
                        x["img_ids"],
                    )
                )
        _BASE_ERRORS[tiny_key] = max(_rel_err(a, b) for a, b in zip(outs[1], outs[0]))
    return _BASE_ERRORS[tiny_key]


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_load_matches_fp32_within_tolerance(name):
    case = CASES[name]
    reference_case = case.fp32_twin or case
    reference = reference_case.run(reference_case.build(torch.float32), torch.device("cpu"), torch.float32)
    low = case.run(case.build(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    errors = [_rel_err(a, b) for a, b in zip(low, reference)]
    tolerance = case.rel_tol
    if name.startswith("bfs") or name == "decomposition":
        tolerance = max(tolerance, 1.25 * _plain_fill_bf16_error("diffusers"))
    assert all(torch.isfinite(t.float()).all() for t in low)
    assert max(errors) < tolerance, f"{name}: relative errors {errors} vs tolerance {tolerance}"
    # And bf16 is really in use (a build that silently stayed in fp32 would match to ~1e-7).
    assert max(errors) > 1e-5, f"{name}: the bf16 build gives fp32 numbers ({errors}): is it still fp32?"


def test_folded_post_moves_with_the_model(tiny):
    """The release's double-block `conv1n` is folded into `to_out` at load time: the fold lives in buffers."""
    model = _bfs_case("diffusers", "bfs_official_pt").build(torch.float32)
    folded = [m for m in model.modules() if isinstance(m, JointAttention) and m.folded]
    assert folded, "the release preset folds its double-block post projections at load time"
    model.to(torch.bfloat16)
    assert all(m.folded_weight.dtype == torch.bfloat16 for m in folded)
    assert all(not any(k.startswith("folded") for k in m.state_dict()) for m in folded)  # never saved
