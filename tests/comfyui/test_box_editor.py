"""The box editor (web/box_editor.js) in the real frontend (headless Chromium) against the real server.

A box dragged with the mouse on BG2FG Sample's background is stored in image pixels ("x,y,w,h" in the `box` widget),
is the region the node uses (its `region` output, saved through MaskToImage), survives save and reload, lands in
image pixels at any canvas zoom and node size; a connected mask wins; with no picture known the numbers still work,
and after a run the editor shows the run's input. The embedded toy model runs each graph in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
from PIL import Image

from .comfy_browser import ComfyFrontend, frontend_available
from .comfy_client import ComfyClient
from .comfy_harness import REPO, ComfyServer


SAMPLER = 4  # node ids of the graph below
LOAD, BOX_TO_MASK, SAVE = 1, 7, 6
EDITOR_JS = """(id) => {
    const node = app.graph.getNodeById(id), ed = node?.bfsBoxEditor;
    if (!ed) return null;
    const r = ed.frame.getBoundingClientRect();
    return {left: r.left, top: r.top, width: r.width, height: r.height, size: ed.size,
            value: node.widgets.find((w) => w.name === "box").value,
            numbers: ["x", "y", "w", "h"].map((k) => ed.inputs[k].value),
            stageShown: ed.stage.style.display !== "none", note: ed.note.textContent,
            src: ed.img.getAttribute("src"), unused: ed.rect.classList.contains("bfs-box-unused"),
            rect: ed.rect.getBoundingClientRect().toJSON()};
}"""
VIEW_JS = """({id, scale, x, y, size}) => {
    const node = app.graph.getNodeById(id), ds = app.canvas.ds;
    if (size) node.setSize(size);
    ds.scale = scale;
    ds.offset[0] = x / scale - node.pos[0];
    ds.offset[1] = y / scale - node.pos[1];
    app.canvas.setDirty(true, true);
}"""
HIT_JS = """({id, x, y}) => app.graph.getNodeById(id).bfsBoxEditor.frame.contains(document.elementFromPoint(x, y))"""
PROMPT_JS = "async () => (await app.graphToPrompt()).output"
SAVE_JS = "() => app.graph.serialize()"
QUEUE_JS = """async () => {
    const p = await app.graphToPrompt();
    return {prompt: p.output, prompt_id: (await window.comfyAPI.api.api.queuePrompt(0, p)).prompt_id};
}"""


def _make_workflows():
    spec = importlib.util.spec_from_file_location("bfs_make_workflows", REPO / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def background(comfy: ComfyClient, tmp_path_factory) -> str:
    """The toy background (64×64) uploaded to the input folder: the LoadImage value."""
    from bfs_core.toy.demo import background_image

    path = tmp_path_factory.mktemp("box") / "bfs_box_background.png"
    array = (background_image(3)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return comfy.upload_image(path)


@pytest.fixture(scope="module")
def frontend(comfy_server: ComfyServer, background: str):
    if os.environ.get("BFS_COMFY_BROWSER", "1") == "0":
        pytest.skip("browser check disabled (BFS_COMFY_BROWSER=0)")
    reason = frontend_available()
    if reason:
        pytest.fail(f"browser check cannot run: {reason}; set BFS_COMFY_BROWSER=0 to skip it", pytrace=False)
    ui = ComfyFrontend(comfy_server.url).open()
    ui.page.set_viewport_size({"width": 1600, "height": 1200})
    yield ui
    ui.close()


def toy_graph(info: dict, image: str | None, mask_box: tuple | None = None, prefix: str = "bfs_box/region") -> dict:
    """Load Image (or the Toy Background when `image` is None) -> BG2FG Sample (toy, 2 steps), its region saved."""
    nodes = {
        LOAD: ("LoadImage", {"image": image}, {}) if image else ("BFSToyBackground", {"seed": 3}, {}),
        2: ("BFSLoadToyModel", {}, {}),
        3: ("BFSToyTextEncode", {"text": "a red cube"}, {"text_encoder": (2, 3)}),
        SAMPLER: (
            "BFSBG2FGSample",
            {"seed": 10, "steps": 2, "guidance": 30.0, "short_side": 512},
            {"bfs_model": (2, 0), "background": (LOAD, 0), "positive": (3, 0), "vae": (2, 1)},
        ),
        5: ("MaskToImage", {}, {"mask": (SAMPLER, 2)}),
        SAVE: ("SaveImage", {"filename_prefix": prefix}, {"images": (5, 0)}),
    }
    if mask_box is not None:
        nodes[BOX_TO_MASK] = ("BFSBoxToMask", dict(zip(("x0", "y0", "x1", "y1"), mask_box)), {"image": (LOAD, 0)})
        nodes[SAMPLER][2]["mask"] = (BOX_TO_MASK, 0)
    return _make_workflows().to_ui(nodes, info)


def show(frontend: ComfyFrontend, scale: float = 1.0, size: list | None = None, timeout_s: float = 20.0) -> dict:
    """Put the sampler node at (200, 120) on screen at `scale`; wait until its editor shows the picture, still."""
    frontend.page.evaluate(VIEW_JS, {"id": SAMPLER, "scale": scale, "x": 200, "y": 120, "size": size})
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        editor = frontend.page.evaluate(EDITOR_JS, SAMPLER)
        if editor and editor["size"] and editor["width"] > 0 and editor == last:
            return editor
        last = editor
    raise AssertionError(f"the box editor did not settle: {last}")


def screen(editor: dict, px: float, py: float) -> tuple[float, float]:
    """Image pixel (px, py) -> screen point a quarter pixel inside it (the editor rounds to the nearest pixel)."""
    width, height = editor["size"]
    return (
        editor["left"] + (px + 0.25) * editor["width"] / width,
        editor["top"] + (py + 0.25) * editor["height"] / height,
    )


def drag(frontend: ComfyFrontend, editor: dict, start: tuple, end: tuple) -> dict:
    page = frontend.page
    (ax, ay), (bx, by) = screen(editor, *start), screen(editor, *end)
    assert page.evaluate(HIT_JS, {"id": SAMPLER, "x": ax, "y": ay}), "the editor is not what is under the mouse"
    page.mouse.move(ax, ay)
    page.mouse.down()
    page.mouse.move(bx, by, steps=6)
    page.mouse.up()
    return frontend.page.evaluate(EDITOR_JS, SAMPLER)


def region_box(comfy: ComfyClient, run, node: int = SAVE) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1) of the white pixels of the saved region mask."""
    png = np.asarray(Image.open(comfy.file_path(run.files(str(node))[0])).convert("L")) > 127
    ys, xs = np.nonzero(png)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def run_ui_prompt(frontend: ComfyFrontend, comfy: ComfyClient):
    prompt = frontend.page.evaluate(PROMPT_JS)
    run = comfy.run(prompt, timeout=180)
    assert run.ok, run.error
    return prompt, run


def test_drawn_box_is_stored_in_image_pixels_and_is_the_region_used(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict, background: str
):
    result = frontend.load(toy_graph(comfy_object_info, background), "box.json")
    assert result.missing == [] and result.prompt_error is None, result
    editor = show(frontend)
    assert editor["size"] == [64, 64] and editor["value"] == "" and editor["stageShown"]
    assert "/view?" in editor["src"] and "type=input" in editor["src"]  # the Load Image's picture, before any run

    editor = drag(frontend, editor, (10, 38), (26, 54))  # draw
    assert editor["value"] == "10,38,16,16"
    assert editor["numbers"] == ["10", "38", "16", "16"]
    editor = drag(frontend, editor, (18, 46), (23, 48))  # move: grab inside, 5 right and 2 down
    assert editor["value"] == "15,40,16,16"
    editor = drag(frontend, editor, (31, 56), (40, 60))  # resize: the bottom-right corner's handle
    assert editor["value"] == "15,40,25,20"

    prompt, run = run_ui_prompt(frontend, comfy)
    assert prompt[str(SAMPLER)]["inputs"]["box"] == "15,40,25,20"
    assert "mask" not in prompt[str(SAMPLER)]["inputs"]
    assert region_box(comfy, run) == (15, 40, 40, 60)
    assert frontend.page_errors == []


def test_typed_numbers_and_save_reload_keep_the_box(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict, background: str
):
    frontend.load(toy_graph(comfy_object_info, background), "box.json")
    editor = show(frontend)
    editor = drag(frontend, editor, (5, 6), (45, 30))
    assert editor["value"] == "5,6,40,24"
    field = frontend.page.evaluate_handle(f"() => app.graph.getNodeById({SAMPLER}).bfsBoxEditor.inputs.w")
    field.as_element().fill("30")
    field.as_element().press("Enter")
    editor = frontend.page.evaluate(EDITOR_JS, SAMPLER)
    assert editor["value"] == "5,6,30,24"
    assert editor["rect"]["width"] == pytest.approx(30 / 64 * editor["width"], abs=1.0)  # the drawing follows

    saved = frontend.page.evaluate(SAVE_JS)  # what Save writes
    sampler = next(n for n in saved["nodes"] if n["id"] == SAMPLER)
    assert "5,6,30,24" in sampler["widgets_values"]
    frontend.load(toy_graph(comfy_object_info, background), "other.json")  # something else, then the saved file
    assert frontend.page.evaluate(EDITOR_JS, SAMPLER)["value"] == ""
    result = frontend.load(saved, "saved.json")
    assert result.prompt[str(SAMPLER)]["inputs"]["box"] == "5,6,30,24"
    editor = show(frontend)
    assert editor["value"] == "5,6,30,24" and editor["numbers"] == ["5", "6", "30", "24"]
    _, run = run_ui_prompt(frontend, comfy)
    assert region_box(comfy, run) == (5, 6, 35, 30)


@pytest.mark.parametrize(
    ("scale", "size"), [(0.45, [760, 900]), (1.7, None)], ids=["zoomed-out-big-node", "zoomed-in"]
)
def test_drag_lands_in_image_pixels_at_any_zoom_and_node_size(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict, background: str, scale, size
):
    frontend.load(toy_graph(comfy_object_info, background), "box.json")
    plain = show(frontend)
    editor = show(frontend, scale=scale, size=size)
    assert editor["width"] != pytest.approx(plain["width"], rel=0.05)  # the picture really is drawn at another size
    editor = drag(frontend, editor, (7, 9), (50, 33))
    assert editor["value"] == "7,9,43,24"
    _, run = run_ui_prompt(frontend, comfy)
    assert region_box(comfy, run) == (7, 9, 50, 33)


def test_connected_mask_wins_and_the_node_says_so(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict, background: str
):
    frontend.load(toy_graph(comfy_object_info, background, mask_box=(30, 5, 50, 20)), "mask.json")
    editor = show(frontend)
    assert "Mask connected" in editor["note"]
    editor = drag(frontend, editor, (10, 38), (26, 54))
    assert editor["value"] == "10,38,16,16" and editor["unused"]
    _, run = run_ui_prompt(frontend, comfy)
    assert region_box(comfy, run) == (30, 5, 50, 20)
    assert "A mask is connected, so it is the region: the drawn box is not used." in run.outputs[str(SAMPLER)]["text"]


def test_without_a_picture_the_numbers_work_and_a_run_shows_its_input(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict
):
    frontend.load(toy_graph(comfy_object_info, None, prefix="bfs_box/toy_bg"), "toy.json")
    frontend.page.evaluate(VIEW_JS, {"id": SAMPLER, "scale": 1.0, "x": 200, "y": 120, "size": None})
    time.sleep(0.5)
    editor = frontend.page.evaluate(EDITOR_JS, SAMPLER)
    assert not editor["stageShown"] and "No background yet" in editor["note"]
    for key, value in zip("xywh", (12, 20, 18, 14)):
        field = frontend.page.evaluate_handle(f"() => app.graph.getNodeById({SAMPLER}).bfsBoxEditor.inputs.{key}")
        field.as_element().fill(str(value))
        field.as_element().press("Enter")
    assert frontend.page.evaluate(EDITOR_JS, SAMPLER)["value"] == "12,20,18,14"
    queued = frontend.page.evaluate(QUEUE_JS)  # as the Run button does, from this page: its websocket gets the results
    assert queued["prompt"][str(SAMPLER)]["inputs"]["box"] == "12,20,18,14"
    run = comfy.wait(queued["prompt_id"], timeout=180)
    assert run.ok, run.error
    assert region_box(comfy, run) == (12, 20, 30, 34)
    editor = show(frontend)  # the node's input of that run, sent back as `bfs_background`, is now the picture
    assert editor["size"] == [64, 64] and "type=temp" in editor["src"], editor
    assert editor["value"] == "12,20,18,14" and editor["rect"]["width"] > 0


@pytest.mark.parametrize("node_type", ["BFSExtractForeground", "BFSDecomposeLayers"])
def test_the_other_region_nodes_have_the_editor(
    frontend: ComfyFrontend, comfy_object_info: dict, background: str, node_type: str
):
    """Extract Foreground (on its `background`) and Decompose Layers (on its `image`) get the same editor; the drawn
    box goes into their prompt (their runs need real model files, so only the prompt is checked)."""
    image_input = {"BFSExtractForeground": "background", "BFSDecomposeLayers": "image"}[node_type]
    nodes = {
        LOAD: ("LoadImage", {"image": background}, {}),
        SAMPLER: (node_type, {}, {image_input: (LOAD, 0)}),
    }
    frontend.load(_make_workflows().to_ui(nodes, comfy_object_info), "other_node.json")
    editor = show(frontend)
    assert editor["size"] == [64, 64] and "type=input" in editor["src"]
    editor = drag(frontend, editor, (20, 10), (8, 40))  # drawn up and to the left: the box is normalised
    assert editor["value"] == "8,10,12,30"
    prompt = frontend.page.evaluate(PROMPT_JS)
    assert prompt[str(SAMPLER)]["inputs"]["box"] == "8,10,12,30"
