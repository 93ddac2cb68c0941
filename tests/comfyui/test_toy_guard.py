"""The toy model on a real ComfyUI server guards its 64×64 world: a 600×400 image comes back at 600×400, and a box it
was not trained on shows a warning in BG2FG Sample's UI output (its `text`, also sent as progress text on the node).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


W, H = 600, 400


def _graph(box, width=W, height=H) -> dict:
    x0, y0, x1, y1 = box
    return {
        "bg64": {"class_type": "BFSToyBackground", "inputs": {"seed": 3}},
        "bg": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["bg64", 0],
                "upscale_method": "bicubic",
                "width": width,
                "height": height,
                "crop": "disabled",
            },
        },
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "text": {"class_type": "BFSToyTextEncode", "inputs": {"text_encoder": ["toy", 3], "text": "a red cube"}},
        "box": {"class_type": "BFSBoxToMask", "inputs": {"image": ["bg", 0], "x0": x0, "y0": y0, "x1": x1, "y1": y1}},
        "sample": {
            "class_type": "BFSBG2FGSample",
            "inputs": {
                "bfs_model": ["toy", 0],
                "background": ["bg", 0],
                "mask": ["box", 0],
                "positive": ["text", 0],
                "vae": ["toy", 1],
                "seed": 0,
                "steps": 4,
                "guidance": 30.0,
                "short_side": 512,
            },
        },
        "decode": {
            "class_type": "BFSRGBADecode",
            "inputs": {"rgba_vae": ["toy", 2], "foreground": ["sample", 0], "tta": False},
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "toy_guard/fg"}},
        "save_comp": {
            "class_type": "SaveImage",
            "inputs": {"images": ["sample", 1], "filename_prefix": "toy_guard/comp"},
        },
    }


def _size(comfy, result, node) -> tuple[int, int]:
    return Image.open(comfy.file_path(result.files(node)[0])).size


def test_a_600x400_photo_with_a_good_box_comes_back_at_its_size(comfy):
    result = comfy.run(_graph((131, 212, 281, 312)), timeout=300)
    assert result.ok, result.error
    assert _size(comfy, result, "save") == (W, H) and _size(comfy, result, "save_comp") == (W, H)
    text = result.outputs["sample"]["text"]
    assert not any(line.startswith("Warning") for line in text), text
    assert any("600×400 input was resized to 64×64" in line for line in text)
    layer = np.asarray(Image.open(comfy.file_path(result.files("save")[0]))).astype(np.float32) / 255
    assert layer[212:312, 131:281, 3].mean() > 0.6 and layer[:150, :, 3].mean() < 0.05  # a layer in its box


@pytest.mark.parametrize(
    ("box", "warning"),
    [((300, 200, 302, 202), "too small"), ((0, 0, W, H), "too large"), ((200, 25, 350, 125), "off the ground")],
)
def test_an_untrained_box_warns_in_the_nodes_ui_output(comfy, box, warning):
    result = comfy.run(_graph(box), timeout=300)
    assert result.ok, result.error  # a warning, not an error: the result is still made and mapped back
    warnings = [line for line in result.outputs["sample"]["text"] if line.startswith("Warning")]
    assert any(warning in line for line in warnings), warnings
    assert _size(comfy, result, "save") == (W, H)


def test_the_toy_world_itself_shows_nothing(comfy):
    """At 64×64 with a box the model knows, the node adds no UI text (and the result is the demo's, see
    test_workflows)."""
    result = comfy.run(_graph((14, 34, 30, 50), 64, 64), timeout=300)
    assert result.ok, result.error
    assert "text" not in result.outputs.get("sample", {}), result.outputs.get("sample")


def test_the_warning_is_shown_on_the_node_in_the_frontend(comfy):
    """What the frontend shows: ComfyUI's progress-text websocket message for the sampler node (rendered under the
    node), read here from /ws as the frontend reads it."""
    import asyncio
    import json
    import struct

    import aiohttp

    graph = _graph((300, 200, 302, 202))
    graph["sample"]["inputs"]["seed"] = 7  # not cached from the other tests, so the node runs again

    async def collect() -> list[tuple[str, str]]:
        texts = []
        ws_url = comfy.base_url.replace("http://", "ws://") + f"/ws?clientId={comfy.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            prompt_id = comfy.queue_prompt(graph)
            while True:
                msg = await ws.receive(timeout=180)
                if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:  # TEXT
                    (length,) = struct.unpack(">I", msg.data[4:8])
                    texts.append((msg.data[8 : 8 + length].decode(), msg.data[8 + length :].decode()))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    if (
                        event["type"] in ("execution_success", "execution_error")
                        and event["data"].get("prompt_id") == prompt_id
                    ):
                        return texts
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise AssertionError(f"websocket ended: {msg}")

    texts = asyncio.run(collect())
    on_sampler = [text for node, text in texts if node == "sample"]
    assert on_sampler and "Warning: The box is too small" in on_sampler[-1], texts
