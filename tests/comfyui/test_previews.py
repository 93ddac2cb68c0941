"""Live previews in the real server: while BG2FG Sample runs, ComfyUI sends one preview image per step over the
websocket (the composite branch's clean estimate | the layer's, through ComfyUI's own Latent2RGB previewer), and
none when previews are off (`--preview-method none`, ComfyUI's default: the session server); in the browser the
frontend puts them on the sampler nodes of `workflows/toy_scene.json`.

The websocket is read with aiohttp (ComfyUI's own dependency, so present in its venv), imported where it is used.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .comfy_browser import ComfyFrontend, frontend_available
from .comfy_client import ComfyClient
from .comfy_harness import PACK_DIR, comfy_paths, prepare_base_dir, start_server


STEPS = 6
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4  # ComfyUI's protocol.BinaryEventTypes (3 is progress text)


def _graph(prefix: str, seed: int) -> dict:
    """Toy BG2FG; each test its own seed, so ComfyUI's cache never skips the sampler."""
    return {
        "bg": {"class_type": "BFSToyBackground", "inputs": {"seed": 5}},
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "text": {"class_type": "BFSToyTextEncode", "inputs": {"text_encoder": ["toy", 3], "text": "a red cube"}},
        "box": {"class_type": "BFSBoxToMask", "inputs": {"image": ["bg", 0], "x0": 16, "y0": 32, "x1": 36, "y1": 52}},
        "sample": {
            "class_type": "BFSBG2FGSample",
            "inputs": {
                "bfs_model": ["toy", 0],
                "background": ["bg", 0],
                "mask": ["box", 0],
                "positive": ["text", 0],
                "vae": ["toy", 1],
                "seed": seed,
                "steps": STEPS,
                "guidance": 30.0,
                "short_side": 512,
            },
        },
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


@dataclass
class Run:
    """What one prompt sent over the websocket: preview images (with their metadata, {} for the old message type)
    and the `progress` messages."""

    previews: list[tuple[dict, Image.Image]] = field(default_factory=list)
    progress: list[dict] = field(default_factory=list)
    status: str = ""
    error: dict = field(default_factory=dict)


async def _watch(client: ComfyClient, graph: dict, with_metadata: bool, timeout: float) -> tuple[str, Run]:
    import aiohttp

    run = Run()
    url = client.base_url.replace("http://", "ws://") + f"/ws?clientId={client.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        if with_metadata:  # what the browser sends first: then previews come with their node id
            await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        await ws.receive(timeout=30)  # the initial status (and, with flags, the server's feature flags) ...
        prompt_id = await asyncio.to_thread(client.queue_prompt, graph)
        while not run.status:
            msg = await ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.BINARY:
                kind = struct.unpack(">I", msg.data[:4])[0]
                if kind == PREVIEW_IMAGE:  # [type][image type][JPEG]
                    run.previews.append(({}, Image.open(io.BytesIO(msg.data[8:])).convert("RGB")))
                elif kind == PREVIEW_IMAGE_WITH_METADATA:  # [type][metadata length][metadata JSON][image]
                    (length,) = struct.unpack(">I", msg.data[4:8])
                    meta = json.loads(msg.data[8 : 8 + length])
                    run.previews.append((meta, Image.open(io.BytesIO(msg.data[8 + length :])).convert("RGB")))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] == "progress":
                    run.progress.append(data)
                elif event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    run.status, run.error = event["type"], data
            else:
                raise AssertionError(f"websocket closed or failed: {msg}")
    return prompt_id, run


def _failure(run: Run) -> str:
    return f"{run.status}: {run.error.get('node_type')} raised {run.error.get('exception_message')}"


def watch(client: ComfyClient, graph: dict, with_metadata: bool = True, timeout: float = 300) -> tuple[str, Run]:
    """Queue `graph` and collect what the websocket brings until the prompt finished."""
    return asyncio.run(_watch(client, graph, with_metadata, timeout))


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory):
    """A second server, started as a user turns previews on: `--preview-method latent2rgb`."""
    server = start_server(
        prepare_base_dir(tmp_path_factory.mktemp("comfyui_previews")),
        extra_args=("--preview-method", "latent2rgb"),
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def preview_client(preview_server) -> ComfyClient:
    return ComfyClient(preview_server.url, output_dir=preview_server.output_dir, timeout=60)


def _flux_latent2rgb(normalised: torch.Tensor) -> Image.Image:
    """ComfyUI's Flux Latent2RGB preview of a [16, h, w] normalised latent, computed here from its factors."""
    sys.path.insert(0, str(comfy_paths()[0]))
    try:
        from comfy.latent_formats import Flux
    finally:
        sys.path.pop(0)
    flux = Flux()
    factors, bias = torch.tensor(flux.latent_rgb_factors), torch.tensor(flux.latent_rgb_factors_bias)
    rgb = normalised.movedim(0, -1) @ factors + bias  # [h, w, 16] -> [h, w, 3] in [-1, 1]
    return Image.fromarray(((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy())


def test_bg2fg_sends_a_preview_per_step_showing_both_branches(preview_client):
    prompt_id, run = watch(preview_client, _graph("previews/on", 101))
    assert run.status == "execution_success", _failure(run)
    sample_previews = [img for meta, img in run.previews if meta.get("node_id") == "sample"]
    assert len(sample_previews) == len(run.previews) == STEPS, [m for m, _ in run.previews]
    assert all(meta["prompt_id"] == prompt_id and meta["image_type"] == "image/jpeg" for meta, _ in run.previews)
    assert [p["value"] for p in run.progress if p["node"] == "sample"] == list(range(1, STEPS + 1))

    # The last step lands on sigma 0, where the x0 estimate is the output: the right half of the last preview is
    # ComfyUI's Flux Latent2RGB of the saved foreground latent (raw in the LATENT -> normalised), the left half the
    # composite branch (it differs).
    history = preview_client.history(prompt_id)
    record = history["outputs"]["save"]["latents"][0]
    raw = load_file(str(preview_client.file_path(record)))["latent_tensor"][0].float()  # [16, h, w]
    h, w = raw.shape[-2:]
    expected_fg = _flux_latent2rgb((raw - 0.1159) * 0.3611)
    last = sample_previews[-1]
    assert last.width * h == last.height * 2 * w, (last.size, (h, w))  # composite | layer, each h × w
    # ComfyUI scales previews to --preview-size (512) keeping the aspect; undo that to compare at latent size
    small = torch.from_numpy(np.asarray(last.resize((2 * w, h), Image.Resampling.BOX))).float()  # [h, 2w, 3]
    want_fg = torch.from_numpy(np.asarray(expected_fg)).float()
    fg_error, comp_error = (small[:, w:] - want_fg).abs().mean(), (small[:, :w] - want_fg).abs().mean()
    print(
        f"preview {last.size}, latent {h}x{w}: layer half {fg_error:.2f} levels off, composite half {comp_error:.2f}"
    )
    assert fg_error < 8, f"layer half is {fg_error:.1f} levels from Latent2RGB of the output latent"
    assert comp_error > 3 * fg_error, (comp_error, fg_error)


def test_old_clients_get_the_plain_preview_message(preview_client):
    _, run = watch(preview_client, _graph("previews/plain", 102), with_metadata=False)
    assert run.status == "execution_success", _failure(run)
    assert len(run.previews) == STEPS and all(meta == {} for meta, _ in run.previews)


def test_no_previews_when_comfyui_previews_are_off(comfy):
    _, run = watch(comfy, _graph("previews/off", 103))
    assert run.status == "execution_success", _failure(run)
    assert [p["value"] for p in run.progress if p["node"] == "sample"] == list(range(1, STEPS + 1))
    assert run.previews == []


WATCH_JS = """() => {
    const api = window.app.api, seen = {previews: [], progress: [], done: null};
    window.__bfsSeen = seen;
    api.addEventListener('b_preview_with_metadata', ({detail}) => {
        const id = detail.displayNodeId;
        // the frontend's own handler runs first: the node's preview image is set by now
        seen.previews.push({id, type: detail.blob.type, size: detail.blob.size,
                            onNode: (window.app.nodePreviewImages[id] || []).length});
    });
    api.addEventListener('progress', ({detail}) => seen.progress.push({id: detail.node, max: detail.max}));
    for (const kind of ['execution_success', 'execution_error']) {
        api.addEventListener(kind, ({detail}) => { seen.done = {kind, message: detail.exception_message}; });
    }
}"""


def test_the_browser_shows_the_previews_on_the_sampler_nodes(preview_server):
    reason = frontend_available()
    if reason:
        pytest.skip(reason)
    workflow = json.loads((PACK_DIR / "workflows" / "toy_scene.json").read_text())
    samplers = sorted(str(n["id"]) for n in workflow["nodes"] if n["type"] == "BFSBG2FGSample")
    assert len(samplers) == 2, samplers
    frontend = ComfyFrontend(preview_server.url).open()
    try:
        loaded = frontend.load(workflow, "toy_scene.json")
        assert not loaded.missing and loaded.prompt, loaded
        frontend.page.evaluate(WATCH_JS)
        frontend.page.evaluate("() => window.app.queuePrompt(0, 1)")  # what the Run button does
        frontend.page.wait_for_function("() => window.__bfsSeen.done", timeout=300_000)
        seen = frontend.page.evaluate("() => window.__bfsSeen")
    finally:
        frontend.close()
    assert seen["done"]["kind"] == "execution_success", seen["done"]
    for node in samplers:
        steps = {p["max"] for p in seen["progress"] if p["id"] == node}
        previews = [p for p in seen["previews"] if p["id"] == node]
        assert len(steps) == 1 and len(previews) == steps.pop() > 0, (node, steps, len(previews))
        assert all(p["type"] == "image/jpeg" and p["size"] > 0 and p["onNode"] == 1 for p in previews), previews
    assert {p["id"] for p in seen["previews"]} == set(samplers)  # only the samplers preview
