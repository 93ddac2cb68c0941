"""The pack's models through ComfyUI's own ModelPatcher and memory management (`load_models_gpu`, unload, reload).

Each case runs `model_patcher_check.py` in a fresh ComfyUI process (ComfyUI's memory-management state is global):
the model is loaded by its loader node's `execute`, as the server would, then moved by ComfyUI. See that file for
what each case checks. No server needed; skipped outside the ComfyUI venv like every test in this folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patcher_tiny")
    subprocess.run(
        [sys.executable, "-m", "bfs_core", "make-tiny", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


CASES = [
    # ComfyUI on CPU: load, run, unload_all_models, reload, run -> the same numbers.
    "bfs_official:cpu",
    "decomposition:cpu",
    # A GPU stand-in (meta): everything the model uses is on the device after load_models_gpu, and it runs there.
    "bfs_paper_fp8:meta",
    "decomposition:meta",
    # ... also where ComfyUI would load only part of it (free memory for half the model).
    "bfs_official:meta_tight",
]


@pytest.mark.parametrize("case", CASES)
def test_model_survives_comfyui_memory_management(case, tiny_set, tmp_path):
    comfy_dir = os.environ.get("BFS_COMFY_DIR")
    if not comfy_dir:
        pytest.skip("BFS_COMFY_DIR is not set (run through scripts/comfyui_tests.sh)")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "model_patcher_check.py"), comfy_dir, str(tiny_set), case, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.exists(), f"the check did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["error"] is None, result["error"]
    assert not result["left_behind"], f"left on the CPU after load_models_gpu: {result['left_behind'][:8]}"
    if case.endswith(":cpu"):
        assert result["max_abs_diff"] == 0.0, f"unload + reload changed the output by {result['max_abs_diff']}"
    assert result["ok"]
