"""GGUF Flux-Fill bases and block offloading in the real ComfyUI server, and the model through ComfyUI's own memory
management.

* The tiny Q8_0 GGUF (make-tiny's `gguf_q8_0`, copied into models/unet as ComfyUI-GGUF users keep them) is listed by
  Load BFS and runs BG2FG end to end; with `offload=block` the saved layer is pixel-identical to `offload=none`.
* In a fresh ComfyUI process (this file run as a script, like model_patcher_check.py): the ModelPatcher reports the
  model's real size (quantised blocks as their bytes, well under the bf16 size); load, run, `unload_all_models`,
  reload, run gives the same numbers for none and block; with none, loading onto a GPU stand-in (`meta`) moves every
  tensor there with the GGUF blocks intact; in block mode the model stays registered on the CPU and each load asks
  ComfyUI to free, on the GPU, exactly the bytes the streamed blocks need (`device_weight_bytes`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


if __package__:  # under pytest; run as a script (the memory check below), the file needs none of these
    from .comfy_client import PromptRejected
    from .test_bfs_nodes import _rgba, flux_vae, graph, models  # noqa: F401  (fixtures used by name)


HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def gguf_base(comfy_tiny_models, comfy_models) -> str:
    src = comfy_tiny_models["gguf_q8_0"].path
    dest = comfy_models / "unet" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return dest.name


def test_load_bfs_lists_gguf_bases_and_offers_offloading(comfy, gguf_base):
    info = comfy.object_info("BFSLoadModel")  # asked now: the gguf file was added after the server started
    bases = info["input"]["required"]["base_model"][1]["options"]
    assert gguf_base in bases
    offload = info["input"]["optional"]["offload"]
    assert offload[1]["options"] == ["none", "model", "block"] and offload[1]["default"] == "none"


def _bg2fg(comfy, models, base, offload, prefix):
    g = graph(models, base=base, weight_dtype="fp32", bfs=models["bfs"], prefix=prefix)
    g["model"]["inputs"]["offload"] = offload
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    return _rgba(comfy, result)


def test_bg2fg_on_a_gguf_base_with_and_without_block_offloading(comfy, models, gguf_base):
    plain = _bg2fg(comfy, models, gguf_base, "none", "t/gguf_none")
    blocked = _bg2fg(comfy, models, gguf_base, "block", "t/gguf_block")
    assert plain.shape[-1] == 4 and plain[..., :3].std() > 0
    assert np.array_equal(plain, blocked)
    other = _bg2fg(comfy, models, models["fill"], "none", "t/gguf_bf16")  # the bf16 file of the same weights
    assert not np.array_equal(plain, other)  # the GGUF file was really used (Q8_0 rounds differently)


def test_a_gguf_base_refuses_fp8_storage(comfy, models, gguf_base):
    g = graph(models, base=gguf_base, weight_dtype="fp8_e4m3fn")
    result = comfy.run(g, timeout=300)
    assert not result.ok
    assert "GGUF" in str(result.error) and gguf_base in str(result.error)


def test_a_broken_gguf_is_refused_when_queued(comfy, models, comfy_models):
    bad = comfy_models / "unet" / "broken-Q4_K.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(PromptRejected) as rejected:  # by Load BFS's validate_inputs, before anything runs
        comfy.run(graph(models, base=bad.name), timeout=120)
    message = str(rejected.value)
    assert "broken-Q4_K.gguf" in message and "not a GGUF file" in message and "HTML" in message


@pytest.mark.parametrize("case", ["none", "block"])
def test_the_gguf_model_through_comfyuis_memory_management(case, comfy_tiny_models, tmp_path):
    comfy_dir = os.environ.get("BFS_COMFY_DIR")
    if not comfy_dir:
        pytest.skip("BFS_COMFY_DIR is not set (run through scripts/comfyui_tests.sh)")
    tiny_dir = comfy_tiny_models["gguf_q8_0"].path.parent
    bfs_dir = comfy_tiny_models["bfs_release"].path.parent
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, __file__, comfy_dir, str(tiny_dir), str(bfs_dir), case, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.exists(), f"the check did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["error"] is None, result["error"]
    assert result["patcher_size"] == result["stored_bytes"]  # the real size, GGUF blocks as their bytes
    assert result["patcher_size"] < 0.7 * result["bf16_bytes"]
    assert result["max_abs_diff"] == 0.0  # unload_all_models + reload keep every value
    assert result["released"]  # nothing of ours left in ComfyUI's loaded models after unload_all_models
    if case == "none":  # loaded whole onto the (stand-in) GPU, the GGUF blocks still GGUF blocks there
        assert result["left_behind"] == [] and result["still_quantised"] >= 20
    if case == "block":
        assert result["load_device"] == "cpu"
        assert result["freed"] == [[result["block_bytes"], "meta"]]
        assert 0 < result["block_bytes"] < result["stored_bytes"]


# -- the check, in its own ComfyUI process -------------------------------------------------------------------------
def _check(comfy_dir: str, tiny_dir: str, bfs_dir: str, case: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, str(HERE))
    os.chdir(comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import traceback

    import comfy.model_management as mm
    import folder_paths
    import torch
    import utils.install_util  # noqa: F401  (ComfyUI's own `utils`, before anything can shadow the name)
    from model_patcher_check import _forward, _import_pack

    result = {"error": None}
    try:
        folder_paths.add_model_folder_path("diffusion_models", tiny_dir)
        folder_paths.add_model_folder_path("bfs", bfs_dir)
        loader_nodes, _ = _import_pack(HERE.parents[1])
        from bfs_pack.bfs_core.models.gguf import logical_numel
        from bfs_pack.bfs_core.offload import device_weight_bytes

        name = "flux1-fill-tiny-Q8_0.gguf"
        assert name in loader_nodes.base_model_files(), loader_nodes.base_model_files()
        handle = loader_nodes.LoadBFS.execute(name, "bfs_release_tiny.safetensors", "bf16", case).args[0]
        inner = handle.patcher.model.inner
        tensors = list(inner.state_dict().values())  # what the model holds (as ComfyUI counts: its state dict)
        result["stored_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
        result["bf16_bytes"] = sum(2 * logical_numel(t) for t in tensors)
        result["patcher_size"] = handle.patcher.model_size()
        result["load_device"] = str(handle.patcher.load_device)
        cpu = torch.device("cpu")
        first = [t.clone() for t in _forward(handle.load(), cpu, torch.bfloat16)]
        mm.unload_all_models()
        result["released"] = not any(m.model is handle.patcher for m in mm.current_loaded_models)
        second = _forward(handle.load(), cpu, torch.bfloat16)
        result["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(first, second))
        if case == "none":  # as on a GPU (`meta` stands in, as in model_patcher_check.py): everything moves there
            meta = torch.device("meta")
            mm.unload_all_models()
            handle.patcher.load_device = meta
            mm.vram_state = mm.VRAMState.NORMAL_VRAM
            free = 80 * 1024**3
            mm.get_free_memory = lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free
            loaded = handle.load()
            tensors = [*loaded.named_parameters(), *loaded.named_buffers()]
            result["left_behind"] = [n for n, t in tensors if t.device != meta]
            result["still_quantised"] = sum(hasattr(t, "quant_type") for _, t in tensors)
        if case == "block":  # as on a GPU: the load asks ComfyUI to make room for the streamed blocks
            freed = []
            mm.get_torch_device = lambda: torch.device("meta")
            mm.free_memory = lambda memory_required, device, *a, **k: freed.append([memory_required, str(device)])
            handle.load()
            result["freed"] = freed
            result["block_bytes"] = device_weight_bytes(inner.transformer, "block")
    except Exception as exc:  # reported to the test, which prints it
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _check(*sys.argv[1:6])
