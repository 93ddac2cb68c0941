"""The toy model guards its 64×64 world: any input size is mapped in and back; boxes it never saw warn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bfs_core.layer_math import resize_rgba
from bfs_core.toy.demo import background_image
from bfs_core.toy.guard import FOOT_RANGE, HEIGHT_RANGE, WIDTH_RANGE, box_warnings, run_toy, world_box
from bfs_core.toy.models import MAX_SEQUENCE_LENGTH, load_toy
from bfs_core.toy.world import make_scene


torch.set_num_threads(1)
W, H = 600, 400


@pytest.fixture(scope="module")
def toy():
    pipe, rgba = load_toy()
    embeds, pooled = pipe.text_encoders.encode(["a red cube"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pipe, rgba, embeds, pooled


def _photo() -> torch.Tensor:
    """A 600×400 'photo': the toy background 3 blown up (so the right answer is known at both sizes)."""
    return F.interpolate(background_image(3), size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)


def _box_mask(box, width=W, height=H) -> torch.Tensor:
    x0, y0, x1, y1 = box
    m = torch.zeros(1, 1, height, width)
    m[..., y0:y1, x0:x1] = 1
    return m


def test_trained_ranges_are_those_the_world_draws_from():
    rng = np.random.default_rng(0)
    boxes = [make_scene(rng).box for _ in range(400)]
    widths, heights, feet = ([b[2] - b[0] for b in boxes], [b[3] - b[1] for b in boxes], [b[3] for b in boxes])
    assert WIDTH_RANGE[0] <= min(widths) and max(widths) <= WIDTH_RANGE[1]
    assert HEIGHT_RANGE[0] <= min(heights) and max(heights) <= HEIGHT_RANGE[1]
    assert FOOT_RANGE[0] <= min(feet) and max(feet) <= FOOT_RANGE[1]
    assert all(box_warnings(tuple(b)) == [] for b in boxes)  # nothing the model was trained on warns


def test_world_box_maps_pixels_into_the_64_world():
    assert world_box((131, 212, 281, 312), W, H) == (13, 33, 30, 50)
    assert world_box((0, 0, W, H), W, H) == (0, 0, 64, 64)
    assert world_box((300, 200, 302, 202), W, H) == (32, 32, 33, 33)  # a 2×2 box keeps at least one world pixel


def test_a_600x400_photo_comes_back_at_its_size_and_matches_the_background(toy):
    pipe, rgba, embeds, pooled = toy
    photo = _photo()
    run = run_toy(pipe, photo, _box_mask((131, 212, 281, 312)), embeds, pooled, seed=0, steps=4, short_side=512)
    assert run.warnings == [] and run.boxes == [(13, 33, 30, 50)]
    assert "600×400 input was resized to 64×64" in run.notes[0]
    result = run.result
    assert result.composite.shape == (1, 3, H, W) and result.original_size == (W, H)
    assert result.fg_latent.shape == (1, 16, 8, 8)  # the latent stays in the world; RGBA Decode maps it back
    outside = 1 - _box_mask((100, 180, 320, 360))  # away from the object and its shadow
    error = ((result.composite - photo).abs() * outside).sum() / (3 * outside.sum())
    assert error < 0.06, error  # the composite outside the box is the input's background, not garbage


def test_the_layer_on_the_photo_is_a_red_cube_in_its_box(toy):
    """Decoded and pasted back at 600×400, the layer is opaque red inside the box and clear outside. Run unguarded at
    the photo's size the same prompt gave 52 % red in the box (and 58 % at 128×64), so this fails without the guard."""
    pipe, rgba, embeds, pooled = toy
    box = _box_mask((131, 212, 281, 312))[0, 0]
    run = run_toy(pipe, _photo(), box[None, None], embeds, pooled, seed=0, steps=10)
    layer = resize_rgba(rgba.decode(run.result.fg_latent).float(), (H, W))[0]  # as RGBA Decode pastes it back
    alpha = layer[3]
    red = ((layer[0] > 0.5) & (layer[1] < 0.35) & (alpha > 0.5)).float()
    assert (alpha * box).sum() / box.sum() > 0.75  # measured 0.85
    assert (alpha * (1 - box)).sum() / (1 - box).sum() < 0.03  # measured 0.010
    assert (red * box).sum() / box.sum() > 0.7  # measured 0.83


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((300, 200, 302, 202), ["too small"]),  # 2×2 px -> 1×1 in the world, its foot on the ground (y1 = 33)
        ((0, 0, W, H), ["too large", "off the ground"]),  # the whole image: foot at the bottom edge (y1 = 64)
        ((200, 25, 350, 125), ["off the ground"]),  # a good size (17×16 in the world), in the sky (y1 = 20)
    ],
)
def test_boxes_outside_the_trained_range_warn(toy, box, expected, caplog):
    pipe, _, embeds, pooled = toy
    with caplog.at_level("WARNING"):
        run = run_toy(pipe, _photo(), _box_mask(box), embeds, pooled, seed=0, steps=1)
    found = [kind for kind in ("too small", "too large", "off the ground") if any(kind in w for w in run.warnings)]
    assert found == expected, run.warnings
    assert found and all(w in caplog.text for w in run.warnings)
    assert run.result.composite.shape == (1, 3, H, W)


def test_a_very_wide_input_warns_that_it_is_stretched(toy):
    pipe, _, embeds, pooled = toy
    wide = F.interpolate(background_image(3), size=(100, 300), mode="bilinear").clamp(0, 1)
    run = run_toy(pipe, wide, _box_mask((100, 55, 180, 80), 300, 100), embeds, pooled, steps=1)
    assert any("3.0× wider than tall" in w for w in run.warnings)


def test_extract_through_the_guard_checks_shapes(toy):
    pipe, _, embeds, pooled = toy
    with pytest.raises(ValueError, match="`composite`"):
        run_toy(pipe, _photo(), _box_mask((131, 212, 281, 312)), embeds, pooled, composite=_photo()[..., :300])
    with pytest.raises(ValueError, match="region `mask` is empty"):
        run_toy(pipe, _photo(), torch.zeros(1, 1, H, W), embeds, pooled)
