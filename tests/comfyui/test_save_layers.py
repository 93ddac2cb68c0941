"""Save Layers on a real ComfyUI server: a batch saves every item, layer names in any script survive in PSD and ORA,
the node shows what it saved (merged preview images and the paths), and a later run never overwrites an earlier file.

The inputs are real PNGs uploaded to the server: RGBA layers go in through LoadImage + JoinImageWithAlpha (ComfyUI's
own nodes; LoadImage's mask is 1 − α and JoinImageWithAlpha inverts it back), batched with ImageBatch.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the pack's independent PSD parser
from test_layered_files import read_psd_layers  # noqa: E402


W, H = 48, 40
NAMES = ["猫", "Ελληνικά 🐈"]


def _background() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 5, y * 6, np.full_like(x, 120)], -1).astype(np.uint8)


def _layer(seed: int) -> np.ndarray:
    """A full-canvas RGBA layer: a square with soft alpha edges at a seed-dependent place and colour."""
    rng = np.random.default_rng(seed)
    layer = np.zeros((H, W, 4), np.uint8)
    x0, y0 = 4 + 8 * seed, 6 + 5 * seed
    layer[y0 : y0 + 16, x0 : x0 + 16, :3] = rng.integers(0, 256, 3)
    layer[y0 : y0 + 16, x0 : x0 + 16, 3] = 255
    layer[y0 : y0 + 16, x0, 3] = 128  # a half-transparent edge
    return layer


def _upload(comfy, tmp_path, name: str, array: np.ndarray) -> str:
    path = tmp_path / f"{name}.png"
    Image.fromarray(array).save(path)
    return comfy.upload_image(path, subfolder="save_layers")


def _rgba_input(graph: dict, comfy, tmp_path, name: str, array: np.ndarray) -> list:
    graph[f"load_{name}"] = {"class_type": "LoadImage", "inputs": {"image": _upload(comfy, tmp_path, name, array)}}
    graph[name] = {
        "class_type": "JoinImageWithAlpha",
        "inputs": {"image": [f"load_{name}", 0], "alpha": [f"load_{name}", 1]},
    }
    return [name, 0]


def _graph(
    comfy, tmp_path, layers: dict[str, list[np.ndarray]], names: str, fmt: str, prefix: str, backgrounds: int = 1
) -> dict:
    """`layers`: slot -> the batch items for that slot (several are joined with ImageBatch)."""
    g: dict = {}
    bg = _background()
    g["load_bg"] = {"class_type": "LoadImage", "inputs": {"image": _upload(comfy, tmp_path, "bg", bg)}}
    background = ["load_bg", 0]
    for i in range(1, backgrounds):
        g[f"bg_batch{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": background, "image2": ["load_bg", 0]}}
        background = [f"bg_batch{i}", 0]
    inputs = {"background": background, "names": names, "format": fmt, "filename_prefix": prefix}
    for slot, items in layers.items():
        batch = _rgba_input(g, comfy, tmp_path, f"{slot}_0", items[0])
        for k, item in enumerate(items[1:], 1):
            g[f"{slot}_batch{k}"] = {
                "class_type": "ImageBatch",
                "inputs": {"image1": batch, "image2": _rgba_input(g, comfy, tmp_path, f"{slot}_{k}", item)},
            }
            batch = [f"{slot}_batch{k}", 0]
        inputs[slot] = batch
    g["save"] = {"class_type": "BFSSaveLayers", "inputs": inputs}
    return g


def _ora(path) -> tuple[list[str], list[np.ndarray]]:
    """Layer names and pixels from stack.xml + data/*.png, bottom first (plain zip + XML, not the pack's reader)."""
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(path) as z:
        entries = list(ET.fromstring(z.read("stack.xml")).iter("layer"))[::-1]
        pixels = [np.asarray(Image.open(z.open(e.get("src"))).convert("RGBA")) for e in entries]
    return [e.get("name") for e in entries], pixels


def _composite(bg: np.ndarray, layers: list[np.ndarray]) -> np.ndarray:
    out = bg.astype(np.float64) / 255
    for layer in layers:
        a = layer[..., 3:] / 255
        out = layer[..., :3] / 255 * a + out * (1 - a)
    return np.round(out * 255)


def test_a_batch_of_two_saves_two_files_each_with_its_own_layer(comfy, tmp_path):
    items = [_layer(0), _layer(1)]
    result = comfy.run(_graph(comfy, tmp_path, {"layer_1": items}, NAMES[0], "psd+ora", "sl/batch"), timeout=120)
    assert result.ok, result.error
    paths = result.outputs["save"]["text"]
    assert [Path(p).name for p in paths] == [
        "batch_00001_.psd",
        "batch_00001_.ora",
        "batch_00002_.psd",
        "batch_00002_.ora",
    ]
    for b, item in enumerate(items):
        psd, ora = Path(paths[2 * b]), Path(paths[2 * b + 1])
        _, psd_layers = read_psd_layers(psd)
        ora_names, ora_pixels = _ora(ora)
        assert [n for n, _ in psd_layers] == ora_names == ["Background", NAMES[0]]
        assert np.array_equal(psd_layers[1][1], item) and np.array_equal(ora_pixels[1], item), f"item {b}"
        assert np.array_equal(psd_layers[0][1][..., :3], _background())


def test_the_node_shows_merged_previews_and_the_saved_paths(comfy, tmp_path):
    items = [_layer(0), _layer(1)]
    result = comfy.run(_graph(comfy, tmp_path, {"layer_1": items}, "cat", "psd", "sl/ui"), timeout=120)
    assert result.ok, result.error
    ui = result.outputs["save"]
    assert [Path(p).name for p in ui["text"]] == ["ui_00001_.psd", "ui_00002_.psd"]
    assert all(Path(p).is_file() for p in ui["text"])
    previews = result.files("save")
    assert [p["type"] for p in previews] == ["temp", "temp"]
    for record, item in zip(previews, items):
        preview = np.asarray(Image.open(comfy.file_path(record)).convert("RGBA")).astype(int)
        assert np.abs(preview[..., :3] - _composite(_background(), [item])).max() <= 1
        assert (preview[..., 3] == 255).all()
    assert not np.array_equal(*[np.asarray(Image.open(comfy.file_path(r))) for r in previews])


def test_unicode_layer_names_round_trip_in_psd_and_ora(comfy, tmp_path):
    from psd_tools import PSDImage

    layers = {"layer_1": [_layer(0)], "layer_2": [_layer(1)]}
    result = comfy.run(_graph(comfy, tmp_path, layers, ", ".join(NAMES), "psd+ora", "sl/名前"), timeout=120)
    assert result.ok, result.error
    psd, ora = (Path(p) for p in result.outputs["save"]["text"])
    assert psd.parent.name == "sl" and psd.name == "名前_00001_.psd"
    assert [layer.name for layer in PSDImage.open(psd)] == ["Background", *NAMES]
    assert [n for n, _ in read_psd_layers(psd)[1]] == ["Background", *NAMES]
    assert [n for n, _ in read_psd_layers(psd, pascal_names=True)[1]] == ["Background", "?", "???????? ?"]
    assert _ora(ora)[0] == ["Background", *NAMES]


def test_a_second_run_counts_on_and_keeps_the_first_files(comfy, tmp_path):
    g = _graph(comfy, tmp_path, {"layer_1": [_layer(0)]}, "cube", "psd", "sl/again")
    first = comfy.run(g, timeout=120)
    assert first.ok, first.error
    (path,) = first.outputs["save"]["text"]
    before = Path(path).read_bytes()
    g["save"]["inputs"]["names"] = "cube 2"  # a changed graph runs again (an unchanged one is cached)
    second = comfy.run(g, timeout=120)
    assert second.ok, second.error
    (again,) = second.outputs["save"]["text"]
    assert Path(again).name == "again_00002_.psd" and Path(path).read_bytes() == before


@pytest.mark.parametrize(
    ("backgrounds", "layers", "message"),
    [
        (2, {"layer_1": [_layer(0)] * 3}, "`background` has 2, `layer_1 ('a')` has 3"),
        (1, {"layer_1": [_layer(0)] * 2, "layer_2": [_layer(1)] * 3}, "`layer_1 ('a')` has 2, `layer_2 ('b')` has 3"),
    ],
    ids=["background-2-layer-3", "layers-2-and-3"],
)
def test_mismatched_batches_are_refused_naming_the_inputs(comfy, tmp_path, backgrounds, layers, message):
    prefix = f"sl/mismatch{backgrounds}"
    result = comfy.run(_graph(comfy, tmp_path, layers, "a, b", "psd", prefix, backgrounds), timeout=120)
    assert not result.ok and result.error is not None
    assert "Batch sizes do not match" in result.error.exception_message
    assert message in result.error.exception_message
    assert not list((comfy.output_dir / "sl").glob(f"mismatch{backgrounds}*"))  # nothing half-saved


def test_composite_layer_takes_a_batch_of_layers_over_one_background(comfy, tmp_path):
    items = [_layer(0), _layer(1)]
    g = _graph(comfy, tmp_path, {"layer_1": items}, "x", "psd", "sl/composite")
    g["comp"] = {
        "class_type": "BFSCompositeLayer",
        "inputs": {"background": ["load_bg", 0], "layer": g["save"]["inputs"]["layer_1"]},
    }
    g["out"] = {"class_type": "SaveImage", "inputs": {"images": ["comp", 0], "filename_prefix": "sl/composite_png"}}
    del g["save"]
    result = comfy.run(g, timeout=120)
    assert result.ok, result.error
    files = result.files("out")
    assert len(files) == 2
    for record, item in zip(files, items):
        got = np.asarray(Image.open(comfy.file_path(record)).convert("RGB")).astype(int)
        assert np.abs(got - _composite(_background(), [item])).max() <= 1


def test_composite_layer_refuses_mismatched_batches_naming_them(comfy, tmp_path):
    g = _graph(comfy, tmp_path, {"layer_1": [_layer(0)] * 3}, "x", "psd", "sl/composite_bad", backgrounds=2)
    g["comp"] = {
        "class_type": "BFSCompositeLayer",
        "inputs": {"background": g["save"]["inputs"]["background"], "layer": g["save"]["inputs"]["layer_1"]},
    }
    g["out"] = {"class_type": "SaveImage", "inputs": {"images": ["comp", 0], "filename_prefix": "sl/composite_bad"}}
    del g["save"]
    result = comfy.run(g, timeout=120)
    assert not result.ok and result.error is not None
    assert "`background` has 2, `layer` has 3" in result.error.exception_message
