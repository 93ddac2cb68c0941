"""The harness itself: the server is up, our pack imported, stock graphs run, bad graphs fail cleanly."""

import struct

import pytest

from .comfy_client import ComfyClient, PromptRejected
from .comfy_harness import PACK_FOLDER, ComfyServer, pack_import_problems


def empty_image_graph(prefix: str, width: int = 64, height: int = 48, batch: int = 1) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": 0},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_server_up_and_pack_imported(comfy: ComfyClient, comfy_server: ComfyServer):
    stats = comfy.system_stats()
    assert stats["system"]["comfyui_version"] == "0.3.75"
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    log = comfy_server.log_text()
    assert pack_import_problems(log) == []
    assert "(IMPORT FAILED)" not in log, "a custom node failed to import"
    assert (comfy_server.base_dir / "custom_nodes" / PACK_FOLDER).resolve() == comfy_server.base_dir.joinpath(
        "custom_nodes", PACK_FOLDER
    ).resolve()


def test_object_info_lists_stock_and_pack_nodes(comfy_object_info: dict):
    assert {"EmptyImage", "SaveImage", "LoadImage", "KSampler"} <= comfy_object_info.keys()
    ours = sorted(n for n, spec in comfy_object_info.items() if spec.get("python_module", "").endswith(PACK_FOLDER))
    print(f"{len(ours)} node types from {PACK_FOLDER}: {ours}")


def test_stock_graph_writes_png(comfy: ComfyClient):
    result = comfy.run(empty_image_graph("bfs_smoke", batch=2), timeout=120)
    assert result.ok, result.error
    files = result.files("2")
    assert len(files) == 2
    for record in files:
        path = comfy.file_path(record)
        assert path.is_file(), path
        assert png_size(path.read_bytes()) == (64, 48)


def test_upload_image_then_load_it(comfy: ComfyClient, tmp_path):
    first = comfy.run(empty_image_graph("bfs_upload_src", width=40, height=24), timeout=120)
    src = comfy.file_path(first.files("2")[0])
    name = comfy.upload_image(src, subfolder="smoke")
    assert name == f"smoke/{src.name}"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bfs_upload_dst"}},
    }
    result = comfy.run(graph, timeout=120)
    assert result.ok, result.error
    assert png_size(comfy.file_path(result.files("2")[0]).read_bytes()) == (40, 24)


def test_unknown_node_is_rejected(comfy: ComfyClient):
    with pytest.raises(PromptRejected) as info:
        comfy.queue_prompt({"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}})
    assert info.value.status == 400
    assert info.value.error["type"] == "invalid_prompt"
    assert "NoSuchNodeXYZ" in info.value.error["message"]


def test_invalid_inputs_are_rejected_per_node(comfy: ComfyClient):
    graph = empty_image_graph("bfs_bad")
    graph["1"]["inputs"]["width"] = 10**9  # above EmptyImage's max
    graph["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "x"}}  # no output 1
    with pytest.raises(PromptRejected) as info:
        comfy.queue_prompt(graph)
    assert info.value.error["type"] == "prompt_outputs_failed_validation"
    assert "value_bigger_than_max" in info.value.error_types


def test_execution_error_is_reported_and_server_keeps_serving(comfy: ComfyClient):
    # Validation passes; SaveImage raises at run time because the prefix leaves the output folder.
    result = comfy.run(empty_image_graph("../escape"), timeout=120)
    assert result.status == "error"
    assert result.error is not None
    assert (result.error.node_id, result.error.node_type) == ("2", "SaveImage")
    assert "outside the output folder" in result.error.exception_message
    # The server is still healthy and runs the next graph.
    assert comfy.run(empty_image_graph("bfs_after_error"), timeout=120).ok


def test_model_folders_are_served(comfy: ComfyClient, comfy_models):
    # Files placed after startup are still listed: ComfyUI rescans a folder when its mtime changes.
    (comfy_models / "vae" / "harness_probe.safetensors").write_bytes(b"")
    assert "harness_probe.safetensors" in comfy.object_info("VAELoader")["input"]["required"]["vae_name"][0]
