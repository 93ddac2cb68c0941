"""Every UI-format workflow in workflows/ against the live server: statically (workflow_check) and in the real
frontend (headless Chromium). Both checks are first proven on a stock-only workflow written to a temp dir."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from .comfy_browser import ComfyFrontend, frontend_available
from .comfy_client import ComfyClient
from .comfy_harness import REPO, ComfyServer
from .workflow_check import check_value, check_workflow, input_type


WORKFLOWS_DIR = Path(os.environ.get("BFS_COMFY_WORKFLOWS_DIR", REPO / "workflows")).resolve()
WORKFLOWS = sorted(WORKFLOWS_DIR.rglob("*.json")) if WORKFLOWS_DIR.is_dir() else []
NO_WORKFLOWS = f"no workflow JSON in {WORKFLOWS_DIR} yet: nothing to validate"
workflow_params = [pytest.param(p, id=p.relative_to(WORKFLOWS_DIR).as_posix()) for p in WORKFLOWS] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(reason=NO_WORKFLOWS))
]


def stock_workflow() -> dict:
    """A small UI-format workflow of stock nodes only (what the editor saves), for the self-tests."""

    def node(id_, type_, inputs=(), outputs=(), widgets=(), mode=0):
        return {
            "id": id_,
            "type": type_,
            "pos": [id_ * 320, 100],
            "size": [300, 120],
            "flags": {},
            "order": id_ - 1,
            "mode": mode,
            "inputs": list(inputs),
            "outputs": list(outputs),
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets),
        }

    return {
        "last_node_id": 5,
        "last_link_id": 2,
        "nodes": [
            node(1, "EmptyImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}], widgets=[64, 48, 1, 0]),
            node(
                2,
                "ImageInvert",
                inputs=[{"name": "image", "type": "IMAGE", "link": 1}],
                outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
            ),
            node(3, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 2}], widgets=["bfs_wf_stock"]),
            node(4, "RandomNoise", outputs=[{"name": "NOISE", "type": "NOISE", "links": []}], widgets=[42, "fixed"]),
            node(5, "Note", widgets=["stock-only workflow for the harness self-test"]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def broken_workflow() -> dict:
    wf = copy.deepcopy(stock_workflow())
    nodes = {n["id"]: n for n in wf["nodes"]}
    nodes[1]["widgets_values"][0] = 10**9  # above EmptyImage.width max
    nodes[4]["widgets_values"][1] = "sometimes"  # not a seed control value
    wf["links"][1][5] = "MASK"  # IMAGE output, IMAGE input, link claims MASK
    extra = [
        {"id": 6, "type": "NoSuchNodeXYZ", "inputs": [], "outputs": [], "widgets_values": []},
        {"id": 7, "type": "ImageScale", "inputs": [], "outputs": [], "widgets_values": ["bogus", 64, 64, "disabled"]},
        {"id": 8, "type": "VAELoader", "inputs": [], "outputs": [], "widgets_values": ["not-here.safetensors"]},
        {"id": 9, "type": "KSamplerSelect", "inputs": [], "outputs": [], "widgets_values": ["bogus"]},
    ]
    wf["nodes"] += extra
    return wf


def frontend_prompt_problems(prompt: dict, object_info: dict) -> list[str]:
    """Check the values of the API prompt the frontend built (its own widget mapping) against /object_info."""
    from .workflow_check import WorkflowReport, all_inputs

    report = WorkflowReport("frontend prompt")
    for node_id, node in prompt.items():
        specs = all_inputs(object_info.get(node["class_type"], {}))
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                continue  # a link
            if name in specs and input_type(specs[name]) != "*":
                check_value(f"node {node_id} ({node['class_type']})", name, specs[name], value, report)
    return report.errors


# -- static check -----------------------------------------------------------------------------------------------------
def test_checker_accepts_stock_workflow(comfy_object_info: dict):
    report = check_workflow(stock_workflow(), comfy_object_info, "stock")
    assert report.ok, report
    assert report.notes == []


def test_checker_reports_each_kind_of_problem(comfy_object_info: dict):
    report = check_workflow(broken_workflow(), comfy_object_info, "broken")
    text = "\n".join(report.errors)
    assert "'NoSuchNodeXYZ' is not registered" in text
    assert "width=1000000000 above max" in text
    assert "'sometimes' not one of" in text
    assert "link 2: type MASK but ImageInvert output is IMAGE" in text
    assert "upscale_method='bogus' not in choices" in text
    assert "sampler_name='bogus' not in choices" in text  # a *_name enum is not a model file
    assert "required input 'image' (IMAGE) is not connected" in text
    assert "not-here.safetensors" not in text  # a model file name is only a note
    assert any("not-here.safetensors" in n for n in report.notes)


@pytest.mark.parametrize("path", workflow_params)
def test_workflow_matches_object_info(path: Path | None, comfy_object_info: dict):
    report = check_workflow(json.loads(path.read_text()), comfy_object_info, str(path))
    print(report)
    assert report.ok, report


# -- browser check ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frontend(comfy_server: ComfyServer):
    """The real ComfyUI web app in headless Chromium (skipped only when BFS_COMFY_BROWSER=0)."""
    if os.environ.get("BFS_COMFY_BROWSER", "1") == "0":
        pytest.skip("browser check disabled (BFS_COMFY_BROWSER=0)")
    reason = frontend_available()
    if reason:
        pytest.fail(f"browser check cannot run: {reason}; set BFS_COMFY_BROWSER=0 to skip it", pytrace=False)
    ui = ComfyFrontend(comfy_server.url).open()
    yield ui
    ui.close()


def test_frontend_registers_every_server_node(frontend: ComfyFrontend, comfy_object_info: dict):
    missing = sorted(set(comfy_object_info) - set(frontend.registered_node_types()))
    assert missing == []


def test_frontend_loads_stock_workflow_and_its_prompt_runs(
    frontend: ComfyFrontend, comfy: ComfyClient, comfy_object_info: dict, tmp_path: Path
):
    path = tmp_path / "stock.json"  # through a file, as a workflow from workflows/ would be
    path.write_text(json.dumps(stock_workflow()))
    result = frontend.load(json.loads(path.read_text()), path.name)
    assert result.missing == []
    assert result.dialogs == [], result.dialogs
    assert result.prompt_error is None
    stock_types = {"EmptyImage", "ImageInvert", "SaveImage", "RandomNoise"}  # the Note stays in the UI
    assert {n["class_type"] for n in result.prompt.values()} == stock_types
    assert result.prompt["1"]["inputs"] == {"width": 64, "height": 48, "batch_size": 1, "color": 0}
    assert frontend_prompt_problems(result.prompt, comfy_object_info) == []
    run = comfy.run(result.prompt, timeout=120)  # the UI's own prompt runs on the server
    assert run.ok, run.error
    assert comfy.file_path(run.files("3")[0]).is_file()


def test_frontend_reports_missing_node(frontend: ComfyFrontend):
    wf = stock_workflow()
    wf["nodes"].append({"id": 6, "type": "NoSuchNodeXYZ", "inputs": [], "outputs": [], "widgets_values": []})
    result = frontend.load(wf, "missing.json")
    assert result.missing == ["NoSuchNodeXYZ"]
    assert any("missing nodes" in d and "NoSuchNodeXYZ" in d for d in result.dialogs), result.dialogs


@pytest.mark.parametrize("path", workflow_params)
def test_frontend_loads_workflow(path: Path | None, frontend: ComfyFrontend, comfy_object_info: dict):
    result = frontend.load(json.loads(path.read_text()), path.name)
    assert result.missing == [], f"node types unknown to the frontend: {result.missing}; dialogs: {result.dialogs}"
    assert not any("missing nodes" in d for d in result.dialogs), result.dialogs
    assert result.prompt_error is None, result.prompt_error
    assert frontend_prompt_problems(result.prompt, comfy_object_info) == []
    assert result.page_errors == []


# -- the toy workflow runs for real ----------------------------------------------------------------------------------
def test_toy_workflow_runs_from_the_frontend_as_the_demo_does(frontend: ComfyFrontend, comfy: ComfyClient):
    """workflows/toy_scene.json needs no model file: loaded in the real frontend, its prompt runs on the server and
    gives the layers `python -m bfs_core demo` makes for the same background, prompts, boxes and seeds."""
    import numpy as np
    from PIL import Image

    from bfs_core.toy.demo import CHAIN, background_image, bg2fg
    from bfs_core.toy.models import load_toy

    path = REPO / "workflows" / "toy_scene.json"
    result = frontend.load(json.loads(path.read_text()), path.name)
    assert result.missing == [] and result.prompt_error is None, (result.missing, result.prompt_error)
    run = comfy.run(result.prompt, timeout=300)
    assert run.ok, run.error

    saves = {i: n for i, n in result.prompt.items() if n["class_type"] == "SaveImage"}
    by_prefix = {n["inputs"]["filename_prefix"]: i for i, n in saves.items()}
    pipe, rgba = load_toy()
    bg_seed, items = CHAIN
    scene = background_image(bg_seed)
    for k, (prompt, box) in enumerate(items):
        png = Image.open(comfy.file_path(run.files(by_prefix[f"bfs_toy/layer_{k + 1}"])[0]))
        assert png.mode == "RGBA" and png.size == (64, 64)
        layer = np.asarray(png).astype(np.float32) / 255
        expected, _ = bg2fg(pipe, rgba, scene, prompt, box, steps=20, seed=10 + k)
        expected_np = expected[0].permute(1, 2, 0).numpy()
        premul = lambda x: np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], -1)  # noqa: E731
        assert np.abs(premul(layer) - premul(expected_np)).max() <= 2 / 255, prompt
        x0, y0, x1, y1 = box
        assert layer[y0:y1, x0:x1, 3].mean() > 0.4, f"{prompt}: little opacity inside its box"
        a = expected[:, 3:]
        scene = expected[:, :3] * a + scene * (1 - a)
    save_layers = next(i for i, n in result.prompt.items() if n["class_type"] == "BFSSaveLayers")
    paths = run.outputs[save_layers]["text"]
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["ora", "psd"]
    from psd_tools import PSDImage

    psd = PSDImage.open(next(p for p in paths if p.endswith(".psd")))
    assert [layer.name for layer in psd] == ["Background", "red cube", "blue ball"]
