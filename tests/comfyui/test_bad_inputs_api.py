"""The bad-input sweep through ComfyUI's HTTP API: one table of (case, graph change, expected message), one test.

Every case is a graph a user could queue: the embedded toy model (no model files) with one thing wrong. The server must
refuse it with a message that names the input (at validation, `POST /prompt` -> 400, or at execution, the node's
`execution_error`), keep serving, and a good graph after the sweep must give exactly the result it gave before it.
Bad tensors no stock node makes (NaN, inf, odd channel counts, batches) come from the test-only `BFSTestTensor` and
`BFSTestConditioning` nodes (nodes/testing.py, registered with BFS_TEST_NODES=1 as the harness does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from PIL import Image

from .comfy_client import ComfyClient, PromptRejected


STEPS = 1


def base_graph() -> dict:
    """The good graph: toy background -> box -> BG2FG (toy) -> RGBA Decode -> SaveImage; Save Layers beside it."""
    return {
        "bg": {"class_type": "BFSToyBackground", "inputs": {"seed": 3}},
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "text": {"class_type": "BFSToyTextEncode", "inputs": {"text_encoder": ["toy", 3], "text": "a red cube"}},
        "box": {"class_type": "BFSBoxToMask", "inputs": {"image": ["bg", 0], "x0": 14, "y0": 34, "x1": 30, "y1": 50}},
        "sample": {
            "class_type": "BFSBG2FGSample",
            "inputs": {
                "bfs_model": ["toy", 0],
                "background": ["bg", 0],
                "mask": ["box", 0],
                "positive": ["text", 0],
                "vae": ["toy", 1],
                "seed": 0,
                "steps": STEPS,
                "guidance": 30.0,
                "short_side": 512,
            },
        },
        "decode": {
            "class_type": "BFSRGBADecode",
            "inputs": {"rgba_vae": ["toy", 2], "foreground": ["sample", 0], "tta": False},
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sweep/fg"}},
    }


def tensor(g: dict, name: str, *, width=64, height=64, batch=1, channels=3, value=0.5, poison="none") -> list:
    """Add a BFSTestTensor node; returns its [node, 0] (IMAGE) link; [node, 1] is the MASK, [node, 2] the LATENT."""
    g[name] = {
        "class_type": "BFSTestTensor",
        "inputs": {
            "width": width,
            "height": height,
            "batch": batch,
            "channels": channels,
            "value": value,
            "poison": poison,
        },
    }
    return [name, 0]


def conditioning(g: dict, name: str = "cond", **inputs) -> list:
    g[name] = {
        "class_type": "BFSTestConditioning",
        "inputs": {
            "text": "a red cube",
            "width": 32,
            "pooled_width": 32,
            "text_tokens": 16,
            "image_tokens": 0,
            **inputs,
        },
    }
    return [name, 0]


def extract(g: dict) -> dict:
    """Turn the sampler into Extract Foreground with the background as its own composite."""
    g["sample"] = {"class_type": "BFSExtractForeground", "inputs": {**g["sample"]["inputs"], "composite": ["bg", 0]}}
    return g


def composite_layer(g: dict, layer: list, background: list | None = None, alpha: list | None = None) -> dict:
    g["over"] = {"class_type": "BFSCompositeLayer", "inputs": {"background": background or ["bg", 0], "layer": layer}}
    if alpha is not None:
        g["over"]["inputs"]["alpha"] = alpha
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["over", 0], "filename_prefix": "sweep/over"}}
    return g


def save_layers(g: dict, **inputs) -> dict:
    g["layers"] = {
        "class_type": "BFSSaveLayers",
        "inputs": {
            "background": ["bg", 0],
            "layer_1": ["decode", 0],
            "names": "cube",
            "format": "psd",
            "filename_prefix": "sweep/scene",
            **inputs,
        },
    }
    return g


def _set(node: str, **inputs) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        g[node]["inputs"].update(inputs)
        return g

    return change


def _chain(*changes: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        for c in changes:
            g = c(g)
        return g

    return change


def _bad_background(**kwargs) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        g["sample"]["inputs"]["background"] = tensor(g, "bad_bg", **kwargs)
        g["box"]["inputs"]["image"] = ["bad_bg", 0]
        return g

    return change


def _bad_mask(**kwargs) -> Callable[[dict], dict]:
    kwargs = {"value": 1.0, **kwargs}

    def change(g: dict) -> dict:
        tensor(g, "bad_mask", **kwargs)
        g["sample"]["inputs"]["mask"] = ["bad_mask", 1]
        return g

    return change


def _bad_latent(**kwargs) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        tensor(g, "bad_latent", **kwargs)
        g["decode"]["inputs"]["foreground"] = ["bad_latent", 2]
        return g

    return change


def _bad_positive(**inputs) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        g["sample"]["inputs"]["positive"] = conditioning(g, **inputs)
        return g

    return change


def _nan_model(step: int, branch: str) -> Callable[[dict], dict]:
    """The toy model copied by BFSTestNaNModel: `branch` turns NaN at `step` of 3 (the toy itself is left alone)."""

    def change(g: dict) -> dict:
        g["nan_model"] = {
            "class_type": "BFSTestNaNModel",
            "inputs": {"bfs_model": ["toy", 0], "step": step, "branch": branch},
        }
        g["sample"]["inputs"].update(bfs_model=["nan_model", 0], steps=3)
        return g

    return change


def _link(node: str, name: str, link: list) -> Callable[[dict], dict]:
    return _set(node, **{name: link})


def _drop(node: str, name: str) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        del g[node]["inputs"][name]
        return g

    return change


def _files_in_bfs(files: dict[str, bytes]) -> Callable[[dict], dict]:
    """Marks a case that needs files in models/bfs (written by the test before queueing)."""

    def change(g: dict) -> dict:
        g["__files__"] = files
        return g

    return change


def _load_rgba(name: str) -> Callable[[dict], dict]:
    def change(g: dict) -> dict:
        g["rgba"] = {"class_type": "BFSLoadRGBAVAE", "inputs": {"rgba_vae": name}}
        g["decode"]["inputs"]["rgba_vae"] = ["rgba", 0]
        return g

    return change


TRUNCATED = b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":'  # a safetensors header cut short


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable[[dict], dict]
    expected: tuple[str, ...]  # every fragment must be in the message
    stage: str = "execution"  # or "validation": refused by POST /prompt
    known_gap: str = ""  # why the message does not yet name the input: the case runs as a strict xfail


CASES = [
    # -- non-finite values -------------------------------------------------------------------------------------------
    Case("nan-background", _bad_background(poison="nan"), ("`background`", "NaN")),
    Case("inf-background", _bad_background(poison="inf"), ("`background`", "infinite")),
    Case("nan-mask", _bad_mask(poison="nan"), ("`mask`", "NaN")),
    Case("inf-mask", _bad_mask(poison="inf"), ("`mask`", "infinite")),
    Case(
        "nan-composite",
        _chain(extract, lambda g: _link("sample", "composite", tensor(g, "bad", poison="nan"))(g)),
        ("`composite`", "NaN"),
    ),
    Case("nan-background-extract", _chain(extract, _bad_background(poison="nan")), ("`background`", "NaN")),
    Case("nan-latent", _bad_latent(poison="nan"), ("`foreground`", "NaN")),
    Case("inf-latent", _bad_latent(poison="inf"), ("`foreground`", "infinite")),
    Case("nan-positive", _bad_positive(poison="nan"), ("`positive`", "NaN")),
    Case("inf-positive", _bad_positive(poison="inf"), ("`positive`", "infinite")),
    Case("nan-layer", lambda g: composite_layer(g, tensor(g, "bad", channels=4, poison="nan")), ("`layer`", "NaN")),
    Case(
        "nan-save-background",
        lambda g: save_layers(g, background=tensor(g, "bad", poison="nan")),
        ("`background`", "NaN"),
    ),
    Case(
        "nan-save-layer",
        lambda g: save_layers(g, layer_1=tensor(g, "bad", channels=4, poison="nan")),
        ("`layer_1", "NaN"),
    ),
    Case("nan-during-sampling-comp", _nan_model(step=2, branch="comp"), ("`comp` branch at step 2 of 3",)),
    Case("nan-during-sampling-fg", _nan_model(step=1, branch="fg"), ("`fg` branch at step 1 of 3",)),
    # -- regions and sizes -------------------------------------------------------------------------------------------
    Case("empty-mask", _bad_mask(value=0.0), ("`mask`", "empty")),
    Case("mask-wrong-size", _bad_mask(width=32, height=32), ("`mask`", "64×64", "[1, 32, 32]")),
    Case("box-outside-image", _set("box", x0=100, y0=100, x1=120, y1=120), ("`box`", "outside")),
    Case("box-empty", _set("box", x0=30, x1=20), ("box", "x1 must exceed x0")),
    Case(
        "composite-size-mismatch",
        _chain(extract, lambda g: _link("sample", "composite", tensor(g, "bad", width=32, height=32))(g)),
        ("`composite`", "`background`", "same size"),
    ),
    Case("background-2-channels", _bad_background(channels=2), ("`background`", "3 channels")),
    Case("background-rgba", _bad_background(channels=4), ("`background`", "3 channels")),
    Case("mask-batch-mismatch", _chain(_bad_background(batch=3), _bad_mask(batch=2)), ("`mask`", "batch")),
    Case(
        "positive-batch-mismatch",
        _chain(_bad_background(batch=3), _bad_positive(batch=2)),
        ("conditioning batch 2", "3 images"),
    ),
    # -- latents, layers and conditioning of the wrong kind ---------------------------------------------------------
    Case(
        "sd-latent",
        lambda g: _link("decode", "foreground", ["sd", 0])(
            {**g, "sd": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
        ),
        ("`foreground`", "16 channels"),
    ),
    Case("rgb-layer-without-alpha", lambda g: composite_layer(g, tensor(g, "bad", channels=3)), ("`layer`", "alpha")),
    Case(
        "layer-size-mismatch",
        lambda g: composite_layer(g, tensor(g, "bad", width=32, height=32, channels=4)),
        ("`layer`", "`background`", "32×32"),
    ),
    Case("positive-wrong-width", _bad_positive(width=48), ("conditioning", "32")),
    Case("positive-without-pooled", _bad_positive(pooled=False), ("`positive`", "pooled")),
    Case(
        "positive-two-entries",
        lambda g: _link("sample", "positive", ["combined", 0])(
            {
                **g,
                "combined": {
                    "class_type": "ConditioningCombine",
                    "inputs": {"conditioning_1": ["text", 0], "conditioning_2": ["text", 0]},
                },
            }
        ),
        ("`positive`", "2 conditioning entries"),
    ),
    Case("toy-prompt-not-in-vocabulary", _set("text", text="a cat"), ("`text`", "'a cat'", "colours red")),
    # -- widgets out of range, missing or mistyped links -------------------------------------------------------------
    Case("seed-negative", _set("sample", seed=-1), ("seed", "-1"), "validation"),
    Case("seed-too-large", _set("sample", seed=2**64), ("seed",), "validation"),
    Case("steps-zero", _set("sample", steps=0), ("steps", "0"), "validation"),
    Case("steps-too-many", _set("sample", steps=100000), ("steps", "100000"), "validation"),
    Case("guidance-too-high", _set("sample", guidance=1000.0), ("guidance", "1000"), "validation"),
    Case("toy-background-seed-negative", _set("bg", seed=-5), ("seed", "-5"), "validation"),
    Case("save-format-unknown", lambda g: save_layers(g, format="tiff"), ("`format`", "tiff", "psd")),
    Case("positive-missing", _drop("sample", "positive"), ("positive",), "validation"),
    Case("image-into-mask", _link("sample", "mask", ["bg", 0]), ("mask", "IMAGE", "MASK"), "validation"),
    Case(
        "mask-into-background",
        _link("sample", "background", ["box", 0]),
        ("background", "MASK", "IMAGE"),
        "validation",
    ),
    # -- model files -------------------------------------------------------------------------------------------------
    Case("rgba-vae-file-missing", _load_rgba("no_such_vae.safetensors"), ("`rgba_vae`", "no_such_vae"), "validation"),
    Case(
        "rgba-vae-truncated",
        _chain(_files_in_bfs({"sweep_truncated.safetensors": TRUNCATED}), _load_rgba("sweep_truncated.safetensors")),
        ("`rgba_vae`", "sweep_truncated.safetensors"),
        "validation",
    ),
    Case(
        "rgba-vae-not-safetensors",
        _chain(_files_in_bfs({"sweep_text.safetensors": b"not weights\n" * 8}), _load_rgba("sweep_text.safetensors")),
        ("`rgba_vae`", "sweep_text.safetensors"),
        "validation",
    ),
]


def _message(comfy: ComfyClient, g: dict) -> tuple[str, str]:
    """(stage, message): 'validation' and the node errors of a refused graph, or 'execution' and the exception
    message, or ('success', '') when the graph ran."""
    try:
        prompt_id = comfy.queue_prompt(g)
    except PromptRejected as err:
        parts = [err.error.get("message", ""), err.error.get("details", "")]
        for node in err.node_errors.values():
            for e in node.get("errors", []):
                parts += [e.get("message", ""), e.get("details", ""), str(e.get("extra_info", {}).get("input_name"))]
        return "validation", " | ".join(p for p in parts if p)
    result = comfy.wait(prompt_id, timeout=180)
    if result.status == "error":
        return "execution", result.error.exception_message
    return result.status, ""


def _png_digest(comfy: ComfyClient, g: dict) -> str:
    """sha256 of the saved foreground's pixels (not the file: PNG metadata carries the prompt)."""
    result = comfy.run(g, timeout=180)
    assert result.ok, result.error
    cached = [n for event, data in result.messages if event == "execution_cached" for n in data.get("nodes", [])]
    assert "sample" not in cached, cached  # computed now, not served from ComfyUI's cache
    image = Image.open(comfy.file_path(result.files("save")[0]))
    return hashlib.sha256(image.mode.encode() + image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(comfy: ComfyClient) -> str:
    """The good graph's foreground PNG before any bad input (a fresh seed, so the server cannot reuse a cache)."""
    return _png_digest(comfy, _set("sample", seed=12345)(base_graph()))


def test_sweep_has_enough_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.known_gap)) if c.known_gap else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input_is_refused_naming_it_and_the_server_keeps_serving(comfy, comfy_server, reference, case: Case):
    g = case.change(base_graph())
    for name, data in g.pop("__files__", {}).items():
        (comfy_server.models_dir / "bfs" / name).write_bytes(data)
    stage, message = _message(comfy, g)
    assert stage == case.stage, (stage, message)
    missing = [fragment for fragment in case.expected if fragment not in message]
    assert not missing, f"message lacks {missing}: {message}"
    assert "Traceback" not in message and len(message) < 2000
    # Still serving. The graph keeps the toy loader (same node, same inputs), so ComfyUI keeps the one loaded model
    # object in its cache through the whole sweep: anything a bad input did to it shows in the last test.
    ok = comfy.run(
        {
            "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
            "a": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "b": {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}},
        },
        timeout=60,
    )
    assert ok.ok, ok.error


def test_no_bad_input_changed_a_later_result(comfy, reference):
    """After the whole sweep the good graph gives the same pixels with the same (cached) toy model object: no bad
    input altered the model, its VAE or text encoder. Queued with a new seed first and then the reference seed, so
    the sampler recomputes (checked in `_png_digest`)."""
    _png_digest(comfy, _set("sample", seed=54321)(base_graph()))
    assert _png_digest(comfy, _set("sample", seed=12345)(base_graph())) == reference
