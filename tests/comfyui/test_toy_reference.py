"""Reference-guided layers in the real server: the toy loader's clip_vision and style_model go through ComfyUI's own
CLIPVisionEncode and StyleModelApply, exactly as workflows/bg2fg_redux_reference.json wires SigLIP and Flux Redux.

- workflows/toy_reference.json is the builder's output for this server (scripts/make_workflows.py), and the builder's
  graph runs on a fresh install and gives the layer of the headless run (bfs_core: reference tokens appended to the
  neutral caption, the same seed);
- BFS Reference Mode 'replace' gives the headless replace-mode layer (the paper's substitution), which differs from
  the appended one; a caption that did not go into StyleModelApply is refused, naming the input.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from .comfy_harness import REPO


def _builder():
    spec = importlib.util.spec_from_file_location("bfs_make_workflows", REPO / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_graph(nodes: dict) -> dict:
    """make_workflows' compact graph {id: (type, widgets, {input: (source id, slot)})} as an API prompt."""
    return {
        str(i): {
            "class_type": t,
            "inputs": {**widgets, **{k: [str(src), slot] for k, (src, slot) in links.items()}},
        }
        for i, (t, widgets, links) in nodes.items()
    }


def _layer(comfy, run, node: str) -> np.ndarray:
    png = Image.open(comfy.file_path(run.files(node)[0]))
    assert png.mode == "RGBA" and png.size == (64, 64)
    return np.asarray(png).astype(np.float32) / 255


def _premultiplied(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], -1)


@pytest.fixture(scope="module")
def headless():
    """The same request without ComfyUI: (layer [64, 64, 4] numpy) for a reference mode."""
    from bfs_core.conditioning import join_reference
    from bfs_core.toy.demo import background_image
    from bfs_core.toy.models import NEUTRAL_PROMPT, encode_toy_prompt, load_toy
    from bfs_core.toy.reference import load_toy_reference, reference_image

    pipe, rgba = load_toy()
    encoder = load_toy_reference()
    background = background_image(3)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 38:54, 24:40] = 1
    caption, pooled = encode_toy_prompt(pipe.text_encoders, NEUTRAL_PROMPT)
    tokens = encoder(reference_image("yellow", "ball", 0))

    def run(mode: str) -> np.ndarray:
        embeds = join_reference(caption, tokens, mode)
        with torch.no_grad():
            result = pipe.generate(background, mask, embeds, pooled, seed=42, steps=20, short_side=0)
            return rgba.decode(result.fg_latent)[0].permute(1, 2, 0).numpy()  # [4, H, W] -> [H, W, 4]

    return run


def test_committed_workflow_is_the_builders_output(comfy):
    builder = _builder()
    committed = json.loads((REPO / "workflows" / "toy_reference.json").read_text())
    assert committed == json.loads(json.dumps(builder.to_ui(builder.toy_reference(), comfy.object_info())))
    redux = json.loads((REPO / "workflows" / "bg2fg_redux_reference.json").read_text())
    stock = {"CLIPVisionEncode", "StyleModelApply"}
    assert stock <= {n["type"] for n in committed["nodes"]} and stock <= {n["type"] for n in redux["nodes"]}


def test_toy_reference_workflow_runs_with_stock_redux_nodes_as_headless(comfy, headless):
    graph = api_graph(_builder().toy_reference())
    run = comfy.run(graph, timeout=300)
    assert run.ok, run.error
    layer = _layer(comfy, run, "15")
    expected = headless("append")
    assert np.abs(_premultiplied(layer) - _premultiplied(expected)).max() <= 2 / 255
    assert layer[38:54, 24:40, 3].mean() > 0.4, "little opacity inside the box"


def test_reference_mode_replace_is_the_paper_substitution(comfy, headless):
    nodes = _builder().toy_reference()
    nodes[20] = (
        "BFSReferenceMode",
        {"reference_mode": "replace"},
        {"conditioning": (14, 0), "caption": (5, 0)},
    )
    sampler = nodes[7]
    nodes[7] = (sampler[0], sampler[1], {**sampler[2], "positive": (20, 0)})
    nodes[15] = ("SaveImage", {"filename_prefix": "bfs_toy/reference_replace"}, {"images": (9, 0)})
    run = comfy.run(api_graph(nodes), timeout=300)
    assert run.ok, run.error
    layer = _layer(comfy, run, "15")
    replaced, appended = headless("replace"), headless("append")
    assert np.abs(_premultiplied(layer) - _premultiplied(replaced)).max() <= 2 / 255
    assert np.abs(_premultiplied(replaced) - _premultiplied(appended)).max() > 4 / 255  # the mode matters


def test_reference_mode_refuses_a_caption_that_did_not_go_into_style_model_apply(comfy):
    nodes = _builder().toy_reference()
    nodes[6] = ("BFSToyTextEncode", {"text": "a red cube"}, {"text_encoder": (3, 3)})
    nodes[20] = ("BFSReferenceMode", {"reference_mode": "replace"}, {"conditioning": (14, 0), "caption": (6, 0)})
    sampler = nodes[7]
    nodes[7] = (sampler[0], sampler[1], {**sampler[2], "positive": (20, 0)})
    run = comfy.run(api_graph(nodes), timeout=300)
    assert not run.ok
    assert "`conditioning`" in str(run.error) and "StyleModelApply" in str(run.error), run.error
