"""Decompose Layers with both methods on the embedded toy models, in a real ComfyUI server: the layers equal the
headless pipelines' (to 2/255), the method's missing model input is named, and workflows/toy_decompose.json runs.

fill_then_extract runs on Load BFS Toy Model (its Fill base with the BFS adapters off, then BFS extraction);
outpaint_and_remove on Load Toy Decomposition Model. Each scene is a held-out toy decomposition scene (occlusion,
shadows, a rough mask) from `bfs_core.toy.decomposition`.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from .comfy_browser import ComfyFrontend, frontend_available
from .comfy_harness import REPO, ComfyServer


SCENE = 7  # held-out scene index (Toy Decomposition Scene's `scene` widget)
STEPS = 8
TOLERANCE = 2 / 255


def _premultiplied(rgba: np.ndarray) -> np.ndarray:
    return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)


def _png(comfy, result, node: str) -> np.ndarray:
    return np.asarray(Image.open(comfy.file_path(result.files(node)[0]))).astype(np.float32) / 255


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()  # [1, C, H, W] -> [H, W, C]


@pytest.fixture(scope="module")
def frontend(comfy_server: ComfyServer):
    """The real ComfyUI web app in headless Chromium, as in test_workflows.py (BFS_COMFY_BROWSER=0 skips it)."""
    if os.environ.get("BFS_COMFY_BROWSER", "1") == "0":
        pytest.skip("browser check disabled (BFS_COMFY_BROWSER=0)")
    reason = frontend_available()
    if reason:
        pytest.fail(f"browser check cannot run: {reason}; set BFS_COMFY_BROWSER=0 to skip it", pytrace=False)
    ui = ComfyFrontend(comfy_server.url).open()
    yield ui
    ui.close()


@pytest.fixture(scope="module")
def scene():
    from bfs_core.toy.decomposition import HELDOUT_SEEDS, make_decomposition_scene

    return make_decomposition_scene(HELDOUT_SEEDS[0] + SCENE)


def _scene_tensors(scene):
    """(image [1, 3, H, W], rough mask [1, 1, H, W]) as Toy Decomposition Scene hands them on (the same floats)."""
    image = torch.from_numpy(scene.composite).permute(2, 0, 1)[None].float()
    mask = torch.from_numpy(scene.mask)[None, None].float()
    return image, mask


def _graph(method: str, with_model: bool = True, **decompose_inputs) -> dict:
    g = {
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "toy_dec": {"class_type": "BFSLoadToyDecomposition", "inputs": {}},
        "scene": {"class_type": "BFSToyDecompositionScene", "inputs": {"text_encoder": ["toy", 3], "scene": SCENE}},
        "decompose": {
            "class_type": "BFSDecomposeLayers",
            "inputs": {
                "image": ["scene", 0],
                "mask": ["scene", 1],
                "positive": ["scene", 2],
                "vae": ["toy", 1],
                "rgba_vae": ["toy", 2],
                "seed": 0,
                "steps": STEPS,
                "guidance": 30.0,
                "short_side": 0,
                "method": method,
                "dilation": 2,
                **decompose_inputs,
            },
        },
        "save_fg": {"class_type": "SaveImage", "inputs": {"images": ["decompose", 0], "filename_prefix": "t/tdfg"}},
        "save_bg": {"class_type": "SaveImage", "inputs": {"images": ["decompose", 2], "filename_prefix": "t/tdbg"}},
    }
    if with_model:
        key, source = ("bfs_model", ["toy", 0]) if method == "fill_then_extract" else ("decomposition_model", None)
        g["decompose"]["inputs"][key] = source or ["toy_dec", 0]
    return g


def test_fill_then_extract_from_decompose_layers_equals_headless(comfy, scene):
    from bfs_core.pipelines.decomposition import FillThenExtractPipeline
    from bfs_core.toy.models import encode_toy_prompt, load_toy

    result = comfy.run(_graph("fill_then_extract"), timeout=300)
    assert result.ok, result.error
    pipe, rgba = load_toy()
    image, mask = _scene_tensors(scene)
    embeds, pooled = encode_toy_prompt(pipe.text_encoders, scene.caption)
    expected = FillThenExtractPipeline(pipe.model, pipe.codec, rgba, pipe.scheduler_config).decompose(
        image, mask, embeds, pooled, dilation=2, seed=0, steps=STEPS, short_side=0
    )
    foreground, background = _png(comfy, result, "save_fg"), _png(comfy, result, "save_bg")
    assert np.abs(_premultiplied(foreground) - _premultiplied(_hwc(expected.foreground))).max() <= TOLERANCE
    assert np.abs(background - _hwc(expected.background)).max() <= TOLERANCE
    # The background is the scene outside the grown mask, and something else under the object.
    from bfs_core.layer_math import dilate_mask

    grown = dilate_mask(mask, 2)[0, 0].bool().numpy()
    assert np.abs(background[~grown] - scene.composite[~grown]).max() <= 1 / 255
    assert np.abs(background[grown] - scene.composite[grown]).mean() > 0.02


def test_outpaint_and_remove_from_decompose_layers_equals_headless(comfy, scene):
    from bfs_core.toy.decomposition import load_toy_decomposition

    g = _graph("outpaint_and_remove", segmentation=["scene", 3], depth=["scene", 4])
    g["decompose"]["inputs"].update(vae=["toy_dec", 1], rgba_vae=["toy_dec", 2])
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    toy = load_toy_decomposition()
    image, mask = _scene_tensors(scene)
    maps = {k: torch.from_numpy(getattr(scene, k)).permute(2, 0, 1)[None].float() for k in ("segmentation", "depth")}
    expected = toy.pipeline.decompose(
        image, mask, *toy.encode_prompt(scene.caption), **maps, seed=0, steps=STEPS, short_side=0
    )
    foreground, background = _png(comfy, result, "save_fg"), _png(comfy, result, "save_bg")
    assert np.abs(_premultiplied(foreground) - _premultiplied(_hwc(expected.foreground))).max() <= TOLERANCE
    assert np.abs(background - _hwc(expected.background)).max() <= TOLERANCE


@pytest.mark.parametrize(
    "method, with_model, extra, message",
    [
        ("fill_then_extract", False, {}, "method 'fill_then_extract' needs `bfs_model`"),
        ("outpaint_and_remove", False, {}, "method 'outpaint_and_remove' needs `decomposition_model`"),
        ("fill_then_extract", True, {"depth": ["scene", 4]}, "`depth` is only read by method 'outpaint_and_remove'"),
        ("not_a_method", True, {}, "`method` must be one of 'outpaint_and_remove', 'fill_then_extract'"),
    ],
)
def test_decompose_layers_names_what_the_method_is_missing(comfy, method, with_model, extra, message):
    result = comfy.run(_graph(method, with_model, **extra), timeout=120)
    assert not result.ok
    assert message in str(result.error), result.error


def test_toy_decompose_workflow_runs_and_equals_headless(frontend, comfy):
    """workflows/toy_decompose.json needs no model file: loaded in the real frontend, its prompt runs and its PSD holds
    the same layers as the headless pipelines (both methods)."""
    from psd_tools import PSDImage

    from bfs_core.pipelines.decomposition import FillThenExtractPipeline
    from bfs_core.toy.decomposition import HELDOUT_SEEDS, load_toy_decomposition, make_decomposition_scene
    from bfs_core.toy.models import encode_toy_prompt, load_toy

    path = REPO / "workflows" / "toy_decompose.json"
    loaded = frontend.load(json.loads(path.read_text()), path.name)
    assert loaded.missing == [] and loaded.prompt_error is None, (loaded.missing, loaded.prompt_error)
    prompt = loaded.prompt
    run = comfy.run(prompt, timeout=300)
    assert run.ok, run.error

    nodes = {n["class_type"]: (i, n) for i, n in prompt.items()}
    scene = make_decomposition_scene(HELDOUT_SEEDS[0] + nodes["BFSToyDecompositionScene"][1]["inputs"]["scene"])
    image, mask = _scene_tensors(scene)
    decompose = {
        n["inputs"]["method"]: n["inputs"] for n in prompt.values() if n["class_type"] == "BFSDecomposeLayers"
    }
    assert set(decompose) == {"outpaint_and_remove", "fill_then_extract"}
    toy = load_toy_decomposition()
    ours = decompose["outpaint_and_remove"]
    maps = {k: torch.from_numpy(getattr(scene, k)).permute(2, 0, 1)[None].float() for k in ("segmentation", "depth")}
    expected = {
        "outpaint_and_remove": toy.pipeline.decompose(
            image,
            mask,
            *toy.encode_prompt(scene.caption),
            **maps,
            seed=ours["seed"],
            steps=ours["steps"],
            guidance=ours["guidance"],
            short_side=ours["short_side"],
        )
    }
    pipe, rgba = load_toy()
    fte = decompose["fill_then_extract"]
    expected["fill_then_extract"] = FillThenExtractPipeline(
        pipe.model, pipe.codec, rgba, pipe.scheduler_config
    ).decompose(
        image,
        mask,
        *encode_toy_prompt(pipe.text_encoders, scene.caption),
        dilation=fte["dilation"],
        seed=fte["seed"],
        steps=fte["steps"],
        guidance=fte["guidance"],
        short_side=fte["short_side"],
    )
    saves = [i for i, n in prompt.items() if n["class_type"] == "BFSSaveLayers"]
    assert len(saves) == 2
    for save in saves:
        (psd_path,) = [p for p in run.outputs[save]["text"] if p.endswith(".psd")]
        psd = PSDImage.open(psd_path)
        method = "fill_then_extract" if "fill_then_extract" in psd_path else "outpaint_and_remove"
        names = [layer.name for layer in psd]
        assert names == ["Background", "object"], names
        width, height = psd.size
        for layer, want in zip(psd, (expected[method].background, expected[method].foreground)):
            canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
            canvas.paste(layer.topil().convert("RGBA"), layer.offset)
            got = np.asarray(canvas).astype(np.float32) / 255
            want = _hwc(want)
            if want.shape[-1] == 3:
                assert np.abs(got[..., :3] - want).max() <= TOLERANCE, (method, layer.name)
            else:
                assert np.abs(_premultiplied(got) - _premultiplied(want)).max() <= TOLERANCE, (method, layer.name)


def test_committed_workflow_is_the_builders_output(comfy):
    """workflows/toy_decompose.json is scripts/make_workflows.py's toy_decompose() for this server's /object_info."""
    spec = importlib.util.spec_from_file_location("bfs_make_workflows", REPO / "scripts" / "make_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = json.loads((REPO / "workflows" / "toy_decompose.json").read_text())
    assert committed == json.loads(json.dumps(builder.to_ui(builder.toy_decompose(), comfy.object_info())))
