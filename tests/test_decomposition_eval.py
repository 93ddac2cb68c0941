"""Decomposition metrics, the real case set, and the two headless commands end to end on the tiny model set."""

from pathlib import Path

import pytest
import torch

from bfs_core.__main__ import main as cli
from bfs_core.decomposition_eval import alpha_iou, build_case_set, psnr, read_cases, ssim
from bfs_core.layer_math import alpha_blend


ASSETS = Path(__file__).parent / "assets"


def test_metrics_values():
    a = torch.full((1, 3, 16, 16), 0.5)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01
    assert ssim(a, a).item() == pytest.approx(1.0)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(noise, 1 - noise).item() < 0
    p, t = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    p[..., :2, :] = 1
    t[..., :, :] = 1
    assert alpha_iou(p, t).item() == pytest.approx(0.5)


def test_case_set_layers_are_consistent(tmp_path):
    cases = read_cases(build_case_set(ASSETS, tmp_path / "cases", count=4, size=64))
    assert len(cases) == 4
    for i, c in enumerate(cases):
        assert c.mask.sum() > 20
        if i % 2 == 0:  # no occluder: the composite is the object over the background (8-bit rounding)
            fg = c.foreground
            torch.testing.assert_close(
                alpha_blend(fg[:, :3], fg[:, 3:], c.background), c.composite, atol=2 / 255, rtol=0
            )
        else:  # occluded: the object layer is complete, more than its visible mask
            assert (c.foreground[:, 3:] > 0.5).sum() > c.mask.sum()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bfs_core.tiny import write_tiny_decomposition, write_tiny_set

    root = tmp_path_factory.mktemp("tiny")
    paths = write_tiny_set(root)
    paths.update(write_tiny_decomposition(root / "decomposition", paths["diffusers"]))
    return paths


def test_evaluate_decomposition_prints_the_table(tiny, tmp_path, capsys):
    args = [
        "evaluate-decomposition",
        "--cases",
        str(tmp_path / "cases"),
        "--build-cases",
        str(ASSETS),
        "--num-cases",
        "4",
        "--base",
        str(tiny["diffusers"]),
        "--weights",
        str(tiny["decomposition"]),
        "--rgba-vae",
        str(tiny["rgba_bfs_release_folder"]),
        "--steps",
        "2",
        "--dtype",
        "fp32",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert cli(args) == 0
    table = capsys.readouterr().out
    print(table)
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "FLUX.1-Fill-dev" in lines and "Outpaint-and-Remove" in lines
    base_cells, ours_cells = lines["FLUX.1-Fill-dev"].split(), lines["Outpaint-and-Remove"].split()
    assert base_cells[3] == "–" and float(ours_cells[3]) >= 0  # only ours has a foreground (alpha IoU)
    assert 5 < float(base_cells[1]) < 60 and 5 < float(ours_cells[1]) < 60  # background PSNR, dB
    assert (tmp_path / "eval" / "report.json").is_file()


def test_decompose_command_writes_layers(tiny, tmp_path):
    cases = build_case_set(ASSETS, tmp_path / "cases", count=1, size=64)
    case = cases / "case000"
    args = [
        "decompose",
        "--base",
        str(tiny["bfl_bf16"]),
        "--vae",
        str(tiny["vae"]),
        "--text-encoders",
        str(tiny["text_encoders"]),
        "--weights",
        str(tiny["decomposition"]),
        "--rgba-vae",
        str(tiny["rgba_layerdiffuse_safetensors"]),
        "--image",
        str(case / "composite.png"),
        "--mask",
        str(case / "mask.png"),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--dtype",
        "fp32",
    ]
    assert cli(args) == 0
    from PIL import Image

    fg, bg = Image.open(tmp_path / "out" / "foreground.png"), Image.open(tmp_path / "out" / "background.png")
    assert fg.mode == "RGBA" and fg.size == (64, 64) and bg.mode == "RGB" and bg.size == (64, 64)
    assert (tmp_path / "out" / "layers.ora").is_file()
    assert cli(args[:-6] + ["--mask", str(case / "composite.png")[:-4] + "_missing.png", "--out", "x"]) == 2
