"""What a fresh ComfyUI install gets from the pack: `models/bfs/` is created when the pack registers it."""

from __future__ import annotations

from pathlib import Path

from . import comfy_harness
from .comfy_client import ComfyClient


def test_models_bfs_is_created_at_registration(tmp_path: Path, monkeypatch):
    """A server on a base directory without models/bfs (the harness normally makes it; not here) creates it."""
    monkeypatch.setattr(comfy_harness, "MODEL_FOLDERS", tuple(f for f in comfy_harness.MODEL_FOLDERS if f != "bfs"))
    base = tmp_path / "fresh"
    assert not (base / "models" / "bfs").exists()
    server = comfy_harness.start_server(base, timeout=300)
    try:
        assert (base / "models" / "bfs").is_dir()
        client = ComfyClient(server.url, timeout=60)
        assert _bfs_weights(client) == []  # registered, and empty
        (base / "models" / "bfs" / "mine.safetensors").write_bytes(b"x")  # a file put there is listed
        assert _bfs_weights(client) == ["mine.safetensors"]
    finally:
        server.stop()


def _bfs_weights(client: ComfyClient) -> list[str]:
    """The options of Load BFS's `bfs_weights` combo (["COMBO", {"options": [...]}] or [[...], {...}])."""
    spec = client.object_info("BFSLoadModel")["input"]["required"]["bfs_weights"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]
