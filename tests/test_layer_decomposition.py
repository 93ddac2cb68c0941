"""Outpaint-and-Remove model (bfs_core/models/layer_decomposition.py) and the Decompose Layers node, tiny, on CPU."""

import copy
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bfs_core.conditioning import canny_edges
from bfs_core.models.layer_decomposition import (
    FILL_IN_CHANNELS,
    DecompositionConfig,
    FluxFillBaseline,
    apply_decomposition_weights,
    initial_decomposition_model,
    save_decomposition_weights,
)
from bfs_core.models.multimodal_fusion import MultiModalLatentFusion
from bfs_core.models.rgba_vae import ReleaseTransparencyVAE
from bfs_core.pipelines.codec import DiffusersFluxVAE
from bfs_core.pipelines.decomposition import DecompositionPipeline
from bfs_core.sampling.flow_match import latent_image_ids
from bfs_core.tiny import make_tiny_flux, tiny_release_vae


REPO = Path(__file__).resolve().parents[1]
TINY = DecompositionConfig(lora_rank=4, joint_rank=4, fusion_dim=32, fusion_latents=8, fusion_heads=2)
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _randomize(model, seed=3, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("fusion.") or "lora_" in name or ".joint." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name == "transformer.x_embedder.weight":
                p[:, FILL_IN_CHANNELS:] = torch.randn(p.shape[0], p.shape[1] - FILL_IN_CHANNELS, generator=gen) * std


def _inputs(n=1, hw=(8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = (hw[0] // 2) * (hw[1] // 2)
    return dict(
        bg_latents=torch.randn(n, length, 64, generator=gen),
        fg_latents=torch.randn(n, length, 64, generator=gen),
        condition=torch.randn(n, length, TINY.condition_channels, generator=gen),
        prompt_embeds=torch.randn(n, 6, 32, generator=gen),
        pooled=torch.randn(n, 32, generator=gen),
        timestep_bg=torch.tensor([0.6] * n),
        timestep_fg=torch.tensor([0.6] * n),
        img_ids=latent_image_ids(*hw),
    )


@pytest.fixture(scope="module")
def codecs():
    import tempfile

    from diffusers import AutoencoderKL

    from bfs_core.tiny import write_tiny_flux_vae

    with tempfile.TemporaryDirectory() as d:
        vae = AutoencoderKL.from_pretrained(write_tiny_flux_vae(Path(d) / "vae"))
    return DiffusersFluxVAE(vae.eval()), ReleaseTransparencyVAE(tiny_release_vae(0).eval())


class TestInitialModelIsFluxFill:
    def test_background_rows_equal_flux_fill_and_adapters_break_it(self):
        plain = make_tiny_flux()
        model = initial_decomposition_model(copy.deepcopy(plain), TINY)
        x = _inputs(n=2)
        with torch.no_grad():
            v_bg, v_fg = model(**x)
            ref, _ = FluxFillBaseline(plain)(**x)
        # Exact up to the summation order of the grown input projection (448 vs 384 columns).
        torch.testing.assert_close(v_bg, ref, atol=2e-6, rtol=0)
        assert (v_fg - ref).abs().max() > 1e-2  # the fg sequence has its own context: not the same computation
        _randomize(model)
        with torch.no_grad():
            assert (model(**x)[0] - ref).abs().max() > 1e-3

    def test_pipeline_background_equals_flux_fill_baseline(self, codecs):
        codec, rgba = codecs
        plain = make_tiny_flux()
        model = initial_decomposition_model(copy.deepcopy(plain), TINY).eval()
        gen = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, 64, 64, generator=gen)
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:40, 20:44] = 1
        text = (torch.randn(1, 6, 32, generator=gen), torch.randn(1, 32, generator=gen))
        common = dict(steps=2, short_side=0, seed=1)
        ours = DecompositionPipeline(model, codec, rgba, SCHEDULER).decompose(image, mask, *text, **common)
        ref = DecompositionPipeline(FluxFillBaseline(plain), codec, None, SCHEDULER).decompose(
            image, mask, *text, **common
        )
        torch.testing.assert_close(ours.bg_latent, ref.bg_latent, atol=1e-5, rtol=0)
        assert ref.foreground is None and ours.foreground.shape == (1, 4, 64, 64)
        outside = (torch.nn.functional.max_pool2d(mask, 5, 1, 2) == 0).expand(-1, 3, -1, -1)
        assert torch.equal(ours.background[outside], image[outside])  # paste-back keeps the input's pixels


def test_pipeline_feeds_masked_contexts_to_the_right_sequences(codecs):
    """What reaches the transformer: background rows get Flux-Fill's context (the image with the object blanked +
    mask), foreground rows the image inside the mask only + mask. Expected tensors are built by hand, not with the
    pipeline's own context code."""
    from bfs_core.sampling.flow_match import fill_condition

    codec, rgba = codecs
    model = initial_decomposition_model(make_tiny_flux(), TINY).eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 0.6 + 0.3  # nowhere black: a zeroed pixel is recognisable
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 8:24] = 1  # an L: a tall bar ...
    mask[..., 32:40, 24:56] = 1  # ... and a foot
    outside_only, inside_only = image.clone(), torch.zeros_like(image)
    for ys, xs in ((slice(8, 40), slice(8, 24)), (slice(32, 40), slice(24, 56))):
        outside_only[..., ys, xs] = 0
        inside_only[..., ys, xs] = image[..., ys, xs]
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    try:
        text = (torch.zeros(1, 6, 32), torch.zeros(1, 32))
        DecompositionPipeline(model, codec, rgba, SCHEDULER).decompose(image, mask, *text, steps=1, short_side=0)
    finally:
        hook.remove()
    with torch.no_grad():
        want_bg = fill_condition(codec.encode_images(outside_only).float(), mask)
        want_fg = fill_condition(codec.encode_images(inside_only).float(), mask)
    hidden = seen[0]  # [2N, L, 64 + 320 + F]: background rows, then foreground rows
    assert hidden.shape[0] == 2
    torch.testing.assert_close(hidden[0, :, 64:384], want_bg[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1, :, 64:384], want_fg[0], atol=1e-5, rtol=0)
    assert (want_bg - want_fg)[..., :64].abs().max() > 0.1  # the two contexts really differ
    with torch.no_grad():
        unmasked = fill_condition(codec.encode_images(image).float(), mask)
    assert (unmasked - want_bg)[..., :64].abs().max() > 0.1 and (unmasked - want_fg)[..., :64].abs().max() > 0.1


class TestSaveLoad:
    def test_round_trip_reproduces_outputs_and_metadata(self, tmp_path):
        model = initial_decomposition_model(make_tiny_flux(), TINY)
        _randomize(model)
        path = save_decomposition_weights(model, tmp_path / "w.safetensors")
        loaded = apply_decomposition_weights(make_tiny_flux(), path)
        assert loaded.config == TINY
        x = _inputs(n=2, seed=5)
        with torch.no_grad():
            for a, b in zip(model(**x), loaded(**x)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            tokens = {"edge": torch.randn(2, 16, 64), "depth": torch.randn(2, 16, 64)}
            assert torch.equal(
                model.fuse(tokens, x["bg_latents"], x["img_ids"]), loaded.fuse(tokens, x["bg_latents"], x["img_ids"])
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "bfs-decomposition" and meta["lora_rank"] == "4"
        assert '"fused_multimodal", 64' in meta["channel_layout"] and "depth" in meta["contexts"]

    def test_wrong_file_is_a_clear_error(self, tmp_path):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "bfs-dual-flux"})
        with pytest.raises(ValueError, match="not a decomposition weights file"):
            apply_decomposition_weights(make_tiny_flux(), tmp_path / "other.safetensors")


class TestFusion:
    def test_absent_modalities_give_zero_and_present_ones_matter(self):
        torch.manual_seed(0)
        fusion = MultiModalLatentFusion(dim=32, num_latents=4, heads=2, out_channels=8)
        ids, query = latent_image_ids(8, 8), torch.randn(1, 16, 64)
        assert torch.equal(fusion({}, query, ids), torch.zeros(1, 16, 8))
        edge = torch.randn(1, 16, 64)
        a = fusion({"edge": edge}, query, ids)
        b = fusion({"edge": edge + 1}, query, ids)
        c = fusion({"edge": edge, "depth": torch.randn(1, 16, 64)}, query, ids)
        assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
        with pytest.raises(ValueError, match="Unknown modalities"):
            fusion({"normals": edge}, query, ids)

    def test_time_and_memory_grow_linearly_in_tokens(self):
        class PeakLive(TorchDispatchMode):
            """Peak bytes of live tensors created by ops (dispatch level; frees tracked by weakref)."""

            def __init__(self):
                super().__init__()
                self.live, self.peak = 0, 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                import weakref

                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t._base is None:
                        n = t.untyped_storage().nbytes()
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(t, self._free, n)
                return out

            def _free(self, n):
                self.live -= n

        torch.manual_seed(0)
        fusion = MultiModalLatentFusion(dim=64, num_latents=16, heads=4, out_channels=64).eval().requires_grad_(False)
        full = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval().requires_grad_(False)  # quadratic control
        sizes, rows = [(24, 24), (48, 48), (96, 48)], []
        for h, w in sizes:
            n_tok = h * w
            tokens = {m: torch.randn(1, n_tok, 64) for m in ("edge", "segmentation", "depth")}
            query, ids = torch.randn(1, n_tok, 64), latent_image_ids(2 * h, 2 * w)
            with torch.no_grad():
                fusion(tokens, query, ids)  # warm-up
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fusion(tokens, query, ids)
                    times.append(time.perf_counter() - t0)
                with PeakLive() as mem:
                    fusion(tokens, query, ids)
                with FlopCounterMode(display=False) as flops:  # exact and load-independent, unlike time
                    fusion(tokens, query, ids)
                x = torch.randn(1, n_tok, 64)
                t0 = time.perf_counter()
                full(x, x, x, need_weights=True)
                t_full = time.perf_counter() - t0
                with FlopCounterMode(display=False) as full_flops:  # written out: MHA's fast path is not counted
                    torch.softmax(x @ x.transpose(1, 2) / 8, dim=-1) @ x
            rows.append((n_tok, min(times), mem.peak, t_full, flops.get_total_flops(), full_flops.get_total_flops()))
        print("\nfusion linearity (3 modalities, d=64, K=16):")
        for n_tok, t, m, tf, _, _ in rows:
            print(
                f"  tokens/map {n_tok:6d}: {t * 1e3:8.2f} ms, peak live {m / 2**20:7.2f} MiB | full attention "
                f"{tf * 1e3:8.2f} ms"
            )
        token_ratio = rows[-1][0] / rows[0][0]
        time_ratio, mem_ratio = rows[-1][1] / rows[0][1], rows[-1][2] / rows[0][2]
        full_ratio = rows[-1][3] / rows[0][3]
        print(
            f"  ×{token_ratio:.0f} tokens -> time ×{time_ratio:.2f}, memory ×{mem_ratio:.2f} "
            f"(quadratic full attention: time ×{full_ratio:.1f})"
        )
        flop_ratio, full_flop_ratio = rows[-1][4] / rows[0][4], rows[-1][5] / rows[0][5]
        print(f"  FLOPs ×{flop_ratio:.2f} (quadratic full attention: FLOPs ×{full_flop_ratio:.1f})")
        # Time is printed, not asserted (a loaded machine makes it noisy); FLOPs and live memory are exact.
        assert 0.8 * token_ratio < flop_ratio <= 1.01 * token_ratio  # linear; quadratic would be ×64
        assert full_flop_ratio > 4 * flop_ratio
        assert mem_ratio < 1.3 * token_ratio


def test_canny_marks_the_square_boundary_only():
    img = torch.zeros(1, 3, 32, 32)
    img[..., 8:24, 8:24] = 1
    edges = canny_edges(img)
    assert edges.shape == (1, 3, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    ys, xs = torch.nonzero(edges[0, 0], as_tuple=True)
    assert len(ys) > 40  # the whole outline
    assert ((ys >= 6) & (ys <= 25) & (xs >= 6) & (xs <= 25)).all()  # near the square
    assert edges[0, 0, 14:18, 14:18].sum() == 0 and edges[0, 0, :4, :4].sum() == 0  # flat areas have none


# ---------------------------------------------------------------------------------------------------------------------
# The node, with ComfyUI stubbed (thin: the core is covered above)


class _Anything:
    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *a, **k):
        return _Anything()


def _comfy_stubs(models: dict[str, Path]) -> dict[str, types.ModuleType]:
    mods = {
        name: types.ModuleType(name)
        for name in (
            "comfy",
            "comfy.model_management",
            "comfy.model_patcher",
            "comfy.utils",
            "folder_paths",
            "comfy_api",
            "comfy_api.latest",
            "server",
        )
    }
    mods["server"].PromptServer = type("PromptServer", (), {"instance": None})  # no UI to send progress text to
    mm = mods["comfy.model_management"]
    mm.get_torch_device = mm.unet_offload_device = mm.intermediate_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda patchers, **kwargs: None
    mm.throw_exception_if_processing_interrupted = lambda: None

    class ModelPatcher:
        def __init__(self, model, load_device=None, offload_device=None):
            self.model = model

    mods["comfy.model_patcher"].ModelPatcher = ModelPatcher
    progress = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            progress.append(value)

    mods["comfy.utils"].ProgressBar = ProgressBar
    mods["comfy.utils"].progress = progress
    for sub in ("model_management", "model_patcher", "utils"):
        setattr(mods["comfy"], sub, mods[f"comfy.{sub}"])
    mods["comfy_api"].latest = mods["comfy_api.latest"]
    fp = mods["folder_paths"]
    fp.models_dir = "/nonexistent"
    fp.add_model_folder_path = lambda *a, **k: None
    fp.get_folder_paths = lambda name: []
    fp.folder_names_and_paths = {}
    fp.supported_pt_extensions = {".safetensors"}
    fp.get_filename_list = lambda folder: [p.name for p in models.values()]
    fp.get_full_path_or_raise = lambda folder, name: str(next(p for p in models.values() if p.name == name))

    class NodeOutput:
        def __init__(self, *values, ui=None):
            self.values, self.ui = values, ui

    latest = mods["comfy_api.latest"]
    kinds = ("Combo", "Image", "Mask", "Conditioning", "Vae", "Int", "Float", "Latent", "String", "Model")
    latest.io = types.SimpleNamespace(
        ComfyNode=object, NodeOutput=NodeOutput, Schema=_Anything, Custom=_Anything, **{n: _Anything() for n in kinds}
    )
    latest.io.FolderType = types.SimpleNamespace(temp="temp")
    previews = []  # what the nodes save for the box editor

    def save_images(images, prefix, folder, cls, compress_level=4):
        previews.append(images)
        return [{"filename": f"{prefix}_{len(previews)}.png", "subfolder": "", "type": folder}]

    latest.ui = types.SimpleNamespace(
        ImageSaveHelper=types.SimpleNamespace(save_images=save_images), previews=previews
    )
    latest.ComfyExtension = object
    return mods


def test_nodes_load_and_decompose_end_to_end(tmp_path, monkeypatch, codecs):
    from bfs_core.tiny import write_tiny_decomposition, write_tiny_flux_fill

    base = write_tiny_flux_fill(tmp_path / "base")
    weights = write_tiny_decomposition(tmp_path / "dec", base["diffusers"])["decomposition"]
    for name, module in _comfy_stubs({"base": base["bfl_bf16"], "weights": weights}).items():
        monkeypatch.setitem(sys.modules, name, module)
    pack = types.ModuleType("bfs_pack_under_test")
    pack.__path__ = [str(REPO)]
    monkeypatch.setitem(sys.modules, "bfs_pack_under_test", pack)
    try:
        import importlib

        node_mod = importlib.import_module("bfs_pack_under_test.nodes.decompose")
        loaded = node_mod.LoadDecomposition.execute(base["bfl_bf16"].name, weights.name, "fp32").values[0]

        class ComfyLikeVAE:  # ComfyUI's VAE API: [B, H, W, C] images in, raw latents out
            latent_channels = 16

            def encode(self, pixels):
                raw = codecs[0].vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
                return raw

            def decode(self, raw):
                return (codecs[0].vae.decode(raw).sample / 2 + 0.5).clamp(0, 1).movedim(1, -1)

        image = torch.rand(1, 70, 90, 3, generator=torch.Generator().manual_seed(0))
        mask = torch.zeros(1, 70, 90)
        mask[:, 20:50, 30:60] = 1
        cond = [[torch.zeros(1, 6, 32), {"pooled_output": torch.zeros(1, 32)}]]
        with torch.no_grad():
            out = node_mod.DecomposeLayers.execute(
                loaded, image, cond, ComfyLikeVAE(), codecs[1], 0, 2, 30.0, 64, mask=mask
            )
        fg, alpha, bg, region = out.values
        assert fg.shape == (1, 70, 90, 4) and alpha.shape == (1, 70, 90) and bg.shape == (1, 70, 90, 3)
        assert torch.equal(alpha, fg[..., 3]) and torch.equal(region, mask)
        assert torch.equal(bg[:, :10, :10], image[:, :10, :10])  # native-resolution paste-back outside the mask
        assert sys.modules["comfy.utils"].progress == [1, 2]
        assert torch.equal(sys.modules["comfy_api.latest"].ui.previews[0], image)  # the box editor's background
        assert out.ui == {
            "bfs_background": [{"filename": "bfs_box_background_1.png", "subfolder": "", "type": "temp"}]
        }
    finally:
        for name in [m for m in sys.modules if m.startswith("bfs_pack_under_test")]:
            sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------------------------------
# Depth and segmentation estimators: loaded once, run on the images' (or a given) device


@pytest.fixture(scope="module")
def estimator_dirs(tmp_path_factory):
    """Tiny random Depth-Anything and SegFormer folders in the layout `from_pretrained` reads (nothing downloaded)."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    root = tmp_path_factory.mktemp("estimators")
    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=14,
        image_size=28,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    depth = DepthAnythingForDepthEstimation(
        DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=16,
            patch_size=14,
            neck_hidden_sizes=[8, 16],
            fusion_hidden_size=8,
            head_hidden_size=8,
            reassemble_factors=[1, 0.5],
        )
    )
    depth.save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False, do_pad=False).save_pretrained(
        root / "depth"
    )
    seg = SegformerForSemanticSegmentation(
        SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            num_labels=5,
        )
    )
    seg.save_pretrained(root / "seg")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "seg")
    return {"depth": root / "depth", "segmentation": root / "seg"}


@pytest.fixture
def fresh_estimators():
    from bfs_core.conditioning import clear_auxiliary_models

    clear_auxiliary_models()
    yield
    clear_auxiliary_models()


@pytest.mark.usefixtures("fresh_estimators")
@pytest.mark.parametrize("kind", ["depth", "segmentation"])
def test_estimators_load_once_and_match_a_direct_transformers_run(kind, estimator_dirs, monkeypatch):
    import transformers

    from bfs_core import conditioning

    auto = {
        "depth": transformers.AutoModelForDepthEstimation,
        "segmentation": transformers.AutoModelForSemanticSegmentation,
    }[kind]
    estimate = {"depth": conditioning.estimate_depth, "segmentation": conditioning.estimate_segmentation}[kind]
    folder = estimator_dirs[kind]
    loads, original = [], auto.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(auto, "from_pretrained", counting)
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    first = estimate(images, folder)
    second = estimate(images, str(folder / ".." / folder.name))  # the same folder spelt differently
    assert len(loads) == 1 and torch.equal(first, second)
    assert first.shape == (2, 3, 40, 48) and first.device == images.device
    # The reference: transformers called directly, post-processed as documented.
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = original(folder).eval()
    with torch.no_grad():
        out = model(**processor(images=list(images), return_tensors="pt", do_rescale=False))
    if kind == "depth":
        d = torch.nn.functional.interpolate(out.predicted_depth[:, None], size=(40, 48), mode="bilinear")
        d = (d - d.amin(dim=(1, 2, 3), keepdim=True)) / (
            d.amax(dim=(1, 2, 3), keepdim=True) - d.amin(dim=(1, 2, 3), keepdim=True)
        ).clamp_min(1e-6)
        torch.testing.assert_close(first, d.expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    else:
        labels = torch.nn.functional.interpolate(out.logits, size=(40, 48), mode="bilinear").argmax(dim=1)
        for label in labels.unique():  # one colour per label, the same wherever it occurs
            colours = first.permute(0, 2, 3, 1)[labels == label].unique(dim=0)
            assert colours.shape[0] == 1
        assert labels.unique().numel() == first.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0).shape[0] > 1
    import shutil

    other = shutil.copytree(folder, folder.parent / f"{kind}_copy", dirs_exist_ok=True)
    assert torch.equal(estimate(images, other), first) and len(loads) == 2  # another folder is loaded on its own


@pytest.mark.usefixtures("fresh_estimators")
@pytest.mark.parametrize("kind", ["depth", "segmentation"])
def test_estimators_run_on_the_requested_device(kind, estimator_dirs):
    """`meta` stands in for CUDA: any tensor the estimator left on the CPU would raise."""
    from bfs_core import conditioning

    estimate = {"depth": conditioning.estimate_depth, "segmentation": conditioning.estimate_segmentation}[kind]
    images = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    out = estimate(images, estimator_dirs[kind], device="meta")
    assert out.device.type == "meta" and out.shape == (1, 3, 40, 48)


def test_decompose_command_runs_the_estimators_on_its_device(monkeypatch):
    """`python -m bfs_core decompose --device X`: depth / segmentation run on X, their maps come back beside the image
    (the estimators themselves are tested above; here only what the command asks of them)."""
    import argparse

    from bfs_core import conditioning
    from bfs_core.cli.decompose import estimated_maps

    calls = []

    def spy(kind, value):
        def estimate(images, model_dir, device=None):
            calls.append((kind, model_dir, device))
            return torch.full_like(images, value)

        return estimate

    monkeypatch.setattr(conditioning, "estimate_depth", spy("depth", 0.25))
    monkeypatch.setattr(conditioning, "estimate_segmentation", spy("segmentation", 0.75))
    image = torch.rand(1, 3, 8, 8)
    args = argparse.Namespace(depth_model="d", segmentation_model="s", device="cuda:3")
    maps = estimated_maps(args, image, {"edge": None, "depth": None, "segmentation": None})
    assert calls == [("depth", "d", "cuda:3"), ("segmentation", "s", "cuda:3")]
    assert torch.equal(maps["depth"], torch.full_like(image, 0.25)) and maps["depth"].device == image.device
    given = torch.zeros(1, 3, 8, 8)
    assert estimated_maps(args, image, {"depth": given})["depth"] is given  # a map the user gave is kept
