"""BFSPipeline end to end on the tiny model set, and the processing-size rule."""

import pytest
import torch

from bfs_core.image_ops import processing_size
from bfs_core.layer_math import bounding_box_masks
from bfs_core.pipelines.bfs import BFSPipeline
from bfs_core.pipelines.loading import load_pipeline
from bfs_core.tiny import write_tiny_set


@pytest.mark.parametrize(
    "size, expected",
    [
        ((640, 480), (640, 512)),  # short side < 512: no scaling, round each side up to 64
        ((1024, 768), (704, 512)),  # 1024·512/768 = 682.67 -> 682 -> 704
        ((768, 1024), (512, 704)),
        ((512, 512), (512, 512)),
        ((100, 50), (128, 64)),
        ((2000, 600), (1728, 512)),  # 2000·512/600 = 1706.67 -> 1706 -> 1728
    ],
)
def test_processing_size_follows_the_release_rule(size, expected):
    assert processing_size(*size) == expected


def test_processing_size_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of 64"):
        processing_size(100, 100, short_side=500)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return write_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tiny_set) -> BFSPipeline:
    return load_pipeline(str(tiny_set["diffusers"]), str(tiny_set["bfs_official_pt"]), dtype=torch.float32)


def _scene():
    gen = torch.Generator().manual_seed(0)
    background = torch.rand(1, 3, 70, 100, generator=gen)
    mask = torch.zeros(1, 1, 70, 100)
    mask[..., 20:50, 30:70] = 1
    return background, mask


def test_generate_is_seeded_and_maps_back_to_the_input_size(pipe):
    background, mask = _scene()
    embeds, pooled = pipe.encode_prompt(["a red cube"])
    steps = []
    a = pipe.generate(background, mask, embeds, pooled, seed=3, steps=3, callback=lambda i, n, _: steps.append(i))
    b = pipe.generate(background, mask, embeds, pooled, seed=3, steps=3)
    c = pipe.generate(background, mask, embeds, pooled, seed=4, steps=3)
    assert steps == [0, 1, 2]
    assert a.processing_size == (128, 128) and a.original_size == (100, 70)
    assert a.fg_latent.shape == (1, 16, 16, 16) and a.composite.shape == (1, 3, 70, 100)
    assert torch.equal(a.fg_latent, b.fg_latent) and not torch.equal(a.fg_latent, c.fg_latent)
    assert 0 <= a.composite.min() and a.composite.max() <= 1 and a.composite.std() > 0.01


def test_extract_keeps_the_composite_latent_and_denoises_the_foreground(pipe):
    background, mask = _scene()
    composite = background.clone()
    composite[..., 20:50, 30:70] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    embeds, pooled = pipe.encode_prompt(["a red cube"])
    result = pipe.extract(composite, background, mask, embeds, pooled, seed=0, steps=2)
    expected = pipe.encode_images(
        torch.nn.functional.interpolate(composite, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    )
    assert torch.allclose(result.comp_latent, expected, atol=1e-5)
    assert result.fg_latent.abs().mean() > 0.01


def test_pipeline_input_errors_name_the_input(pipe):
    background, mask = _scene()
    embeds, pooled = pipe.encode_prompt(["x"])
    with pytest.raises(ValueError, match="`mask`"):
        pipe.generate(background, mask[..., :50], embeds, pooled, steps=1)
    with pytest.raises(ValueError, match=r"`background` values must be in \[0, 1\]"):
        pipe.generate(background * 255, mask, embeds, pooled, steps=1)
    with pytest.raises(ValueError, match="Text conditioning must be"):
        pipe.generate(background, mask, torch.zeros(1, 8, 4096), pooled, steps=1)
    with pytest.raises(ValueError, match="same shape"):
        pipe.extract(background[..., :60, :], background, mask, embeds, pooled, steps=1)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's region rule: the region is the bounding box of whatever mask the user draws (x1 / y1 exclusive).
# Two places derive it: the CLI (`cli.generate.region_mask`) and the nodes (`bfs_core.layer_math.bounding_box_masks`,
# which fill_then_extract also uses).


def _l_and_blobs():
    """[H, W] = [20, 30] masks: an L (bar x 3..5, y 2..13 inclusive; foot x 3..17, y 12..13) and two separate blobs."""
    l_shape = torch.zeros(20, 30)
    l_shape[2:14, 3:6] = 1
    l_shape[12:14, 3:18] = 1
    blobs = torch.zeros(20, 30)
    blobs[1:3, 25:29] = 1  # top right
    blobs[16:19, 2:4] = 1  # bottom left
    return {"l": l_shape, "blobs": blobs}


def _box_by_hand(y0, y1, x0, x1):  # rows y0..y1-1 and columns x0..x1-1 set, written out with loops
    m = torch.zeros(20, 30)
    for y in range(y0, y1):
        for x in range(x0, x1):
            m[y, x] = 1.0
    return m


# The boxes read off the drawings above: (y0, y1, x0, x1) with the last row / column exclusive.
EXPECTED_BOXES = {"l": (2, 14, 3, 18), "blobs": (1, 19, 2, 29)}


@pytest.mark.parametrize("name", ["l", "blobs"])
def test_cli_region_is_the_masks_bounding_box(name, tmp_path):
    import argparse

    import numpy as np
    from PIL import Image

    from bfs_core.cli.generate import region_mask

    mask = _l_and_blobs()[name]
    path = tmp_path / "mask.png"
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(path)
    args = argparse.Namespace(box=None, mask=str(path), exact_mask=False)
    region = region_mask(args, 20, 30)
    assert region.shape == (1, 1, 20, 30)
    assert torch.equal(region[0, 0], _box_by_hand(*EXPECTED_BOXES[name]))
    exact = region_mask(argparse.Namespace(box=None, mask=str(path), exact_mask=True), 20, 30)
    assert torch.equal(exact[0, 0], mask)  # --exact-mask keeps the drawing
    # --box x0,y0,x1,y1 is the same rule typed in: the same region.
    y0, y1, x0, x1 = EXPECTED_BOXES[name]
    typed = region_mask(argparse.Namespace(box=f"{x0},{y0},{x1},{y1}", mask=None, exact_mask=False), 20, 30)
    assert torch.equal(typed, region)


def _import_nodes_common(monkeypatch):
    """nodes/common.py with the three ComfyUI modules it imports stubbed (its box rule needs none of them)."""
    import importlib
    import sys
    import types
    from pathlib import Path

    for name in ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    repo = Path(__file__).resolve().parents[1]
    for name, folder in (("bfs_region_pack_under_test", repo), ("bfs_region_pack_under_test.nodes", repo / "nodes")):
        package = types.ModuleType(name)  # bare packages: the pack's and nodes' __init__ need a running ComfyUI
        package.__path__ = [str(folder)]
        monkeypatch.setitem(sys.modules, name, package)
    try:
        return importlib.import_module("bfs_region_pack_under_test.nodes.common")
    finally:
        for name in [
            m
            for m in sys.modules
            if m.startswith("bfs_region_pack_under_test.") and m != "bfs_region_pack_under_test.nodes"
        ]:
            sys.modules.pop(name, None)


def test_node_region_is_each_masks_bounding_box():
    masks = _l_and_blobs()
    soft = masks["l"] * 0.8  # a soft brush stroke: >= 0.5 counts as painted
    soft[0, 0] = 0.3  # below the threshold: not part of the region
    regions = bounding_box_masks(torch.stack([soft, masks["blobs"]])[:, None])
    assert regions.shape == (2, 1, 20, 30)
    assert torch.equal(regions[0, 0], _box_by_hand(*EXPECTED_BOXES["l"]))
    assert torch.equal(regions[1, 0], _box_by_hand(*EXPECTED_BOXES["blobs"]))
    with pytest.raises(ValueError, match="empty"):
        bounding_box_masks(torch.zeros(1, 1, 20, 30))
