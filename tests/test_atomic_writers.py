"""Every writer of the pack, made to fail half-way: the user's old file survives and no partial or temp file is left.

Each case patches the library call a writer uses (PIL's `Image.save`, safetensors' `save_file`, `torch.save`,
`save_pretrained`, the text file's flush) with one that writes real but incomplete bytes to the path it was given,
then raises as a full disk would. PSD and ORA are covered in tests/test_layered_files.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bfs_core.tiny import make_tiny_flux


GOOD = b"the good file the user already had"


class DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


def half_then_fail(real, path_arg: int):
    """Wrap `real(*args)`: run it, cut the file it wrote (argument `path_arg`) to half, then raise DiskFull."""

    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(args[path_arg])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        raise DiskFull()

    return wrapper


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def check_failure_keeps_old(target: Path, write) -> None:
    """`write()` must raise DiskFull; the target keeps GOOD and nothing else appears in its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(GOOD)
    before = listing(target.parent)
    with pytest.raises(DiskFull):
        write()
    assert target.read_bytes() == GOOD
    assert listing(target.parent) == before


# -- PNG ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def failing_png(monkeypatch):
    monkeypatch.setattr(Image.Image, "save", half_then_fail(Image.Image.save, 1))


def test_decomposition_png(tmp_path, failing_png):
    from bfs_core.decomposition_eval import save_image

    target = tmp_path / "case000" / "foreground.png"
    check_failure_keeps_old(target, lambda: save_image(torch.rand(1, 4, 8, 8), target))


def test_toy_world_png(tmp_path, failing_png):
    from bfs_core.toy import world

    target = tmp_path / "real" / "foreground" / "00000.png"
    check_failure_keeps_old(target, lambda: world.write_datasets(tmp_path, count=1))


def test_toy_demo_png(tmp_path, failing_png):
    from bfs_core.toy import demo

    target = tmp_path / "layer.png"
    check_failure_keeps_old(target, lambda: demo._save_rgba(torch.rand(4, 8, 8), target))


def test_png_success_is_a_real_png(tmp_path):
    from bfs_core.decomposition_eval import save_image

    image = torch.rand(1, 4, 8, 8)
    save_image(image, tmp_path / "x.png")
    back = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1) / 255
    assert (back - image[0]).abs().max() <= 0.5 / 255 + 1e-6
    assert listing(tmp_path) == ["x.png"]


# -- safetensors ----------------------------------------------------------------------------------------------------


def patch_save_file(monkeypatch, module):
    monkeypatch.setattr(module, "save_file", half_then_fail(module.save_file, 1))


def test_latent_file(tmp_path, monkeypatch):
    from bfs_core.models import rgba_vae

    patch_save_file(monkeypatch, rgba_vae)
    target = tmp_path / "fg.safetensors"
    check_failure_keeps_old(target, lambda: rgba_vae.save_latent_file(target, torch.zeros(1, 16, 2, 2)))


def test_release_vae_single_file(tmp_path, monkeypatch):
    from bfs_core.models import rgba_vae
    from bfs_core.tiny import tiny_release_vae

    vae = tiny_release_vae(0)
    patch_save_file(monkeypatch, rgba_vae)
    target = tmp_path / "bfs_transparency_vae.safetensors"
    check_failure_keeps_old(target, lambda: rgba_vae.save_release_vae_single_file(vae, target))


def test_bfs_weights(tmp_path, monkeypatch):
    from bfs_core.models import bfs_checkpoint
    from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux

    model = DualBranchFlux(make_tiny_flux(), DualBranchConfig.preset("release"))
    patch_save_file(monkeypatch, bfs_checkpoint)
    target = tmp_path / "bfs.safetensors"
    check_failure_keeps_old(target, lambda: bfs_checkpoint.save_bfs_weights(model, target))


def test_transparent_vae_conversion(tmp_path, monkeypatch):
    from bfs_core.models import transparent_vae
    from bfs_core.tiny import tiny_transparent_vae_state_dict

    src = tmp_path / "src" / "TransparentVAE.pth"
    src.parent.mkdir()
    torch.save(tiny_transparent_vae_state_dict(0), src)
    patch_save_file(monkeypatch, transparent_vae)
    target = tmp_path / "out" / "TransparentVAE.safetensors"
    check_failure_keeps_old(target, lambda: transparent_vae.convert_transparent_vae_to_safetensors(src, target))


def test_safetensors_success_loads(tmp_path):
    from bfs_core.models.rgba_vae import load_latent_file, save_latent_file

    target = tmp_path / "fg.safetensors"
    target.write_bytes(GOOD)
    latent = torch.randn(1, 16, 2, 3)
    save_latent_file(target, latent)
    assert torch.equal(load_latent_file(target), latent)
    with safe_open(str(target), "pt") as f:
        assert f.metadata()["space"] == "flux_normalized"
    assert listing(tmp_path) == ["fg.safetensors"]


# -- torch.save (the tiny official .pt) -----------------------------------------------------------------------------


def test_tiny_official_pt(tmp_path, monkeypatch):
    import bfs_core.tiny as tiny

    monkeypatch.setattr(torch, "save", half_then_fail(torch.save, 1))
    target = tmp_path / "tiny" / "bfs" / "trained_weights.pt"
    check_failure_keeps_old(target, lambda: tiny.write_tiny_set(tmp_path / "tiny"))


# -- JSON and text --------------------------------------------------------------------------------------------------


@pytest.fixture
def failing_fsync(monkeypatch):
    """The text is written and flushed to the temporary file, then the disk fills before it is synced."""

    def fsync(fd):
        raise DiskFull()

    monkeypatch.setattr(os, "fsync", fsync)


def test_decomposition_report_json(tmp_path, failing_fsync):
    from bfs_core.decomposition_eval import MethodScores, write_report

    target = tmp_path / "report.json"
    check_failure_keeps_old(target, lambda: write_report([MethodScores("ours", [{"psnr": 30.0}])], target))


def test_toy_manifest_jsonl(tmp_path, failing_fsync):
    from bfs_core.toy import world

    target = tmp_path / "real" / "manifest.jsonl"
    target.parent.mkdir()
    target.write_bytes(GOOD)
    with pytest.raises(DiskFull):
        world.write_datasets(tmp_path, count=1)  # the PNGs before it are written (their fsync is best effort)
    assert target.read_bytes() == GOOD
    assert sorted(p.name for p in target.parent.iterdir()) == ["background", "composite", "foreground", target.name]


def test_evaluate_toy_cli_json(tmp_path, monkeypatch):
    from bfs_core.cli import evaluate_toy

    rows = [{"variant": "full", "object_iou": 0.9}]
    monkeypatch.setattr("bfs_core.toy.evaluate.evaluate_variants", lambda *a, **k: rows)
    monkeypatch.setattr("bfs_core.toy.evaluate.format_table", lambda r: "| table |")
    real_fsync = os.fsync

    def fsync(fd):  # the Markdown table is written; the disk fills while the JSON is synced
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".toy.json."):
            raise DiskFull()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    parser = argparse.ArgumentParser()
    evaluate_toy.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "results" / "toy")])
    target = tmp_path / "results" / "toy.json"
    target.parent.mkdir()
    target.write_bytes(GOOD)
    with pytest.raises(DiskFull):
        evaluate_toy.run(args)
    assert target.read_bytes() == GOOD
    assert (tmp_path / "results" / "toy.md").read_text().endswith("| table |\n")
    assert listing(target.parent) == ["toy.json", "toy.md"]


def test_json_success_round_trips(tmp_path):
    from bfs_core.decomposition_eval import MethodScores, write_report

    write_report([MethodScores("ours", [{"name": "猫", "psnr": 30.5}])], tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text("utf-8")) == {
        "ours": {"per_case": [{"name": "猫", "psnr": 30.5}]}
    }


# -- folders (save_pretrained) --------------------------------------------------------------------------------------


def test_tiny_text_encoders_folder(tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    from bfs_core.tiny import write_tiny_text_encoders

    write_tiny_text_encoders(tmp_path, seed=0)
    good = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "text_encoder_2").rglob("*") if p.is_file()}
    real = T5EncoderModel.save_pretrained

    def save_half(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        for p in Path(folder).iterdir():
            p.write_bytes(p.read_bytes()[:10])
        raise DiskFull()

    monkeypatch.setattr(T5EncoderModel, "save_pretrained", save_half)
    before = listing(tmp_path)
    with pytest.raises(DiskFull):
        write_tiny_text_encoders(tmp_path, seed=1)
    now = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "text_encoder_2").rglob("*") if p.is_file()}
    assert now == good
    assert listing(tmp_path) == before
