"""The box drawn on BG2FG Sample / Extract Foreground / Decompose Layers (`box` widget, "x,y,w,h" in image pixels):
parsing, the mask-wins rule, and the same errors as Box to Mask (nodes/common.py; no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import _box_by_hand, _import_nodes_common


SIZE = (30, 20)  # (width, height), as the nodes pass it


@pytest.fixture
def common(monkeypatch):
    return _import_nodes_common(monkeypatch)


def test_parse_box_reads_x_y_w_h(common):
    assert common.parse_box("3,2,15,12") == (3, 2, 18, 14)
    assert common.parse_box(" 3, 2 ,15,12 ") == (3, 2, 18, 14)
    assert common.parse_box("") is None and common.parse_box("  ") is None


@pytest.mark.parametrize("text", ["3,2,15", "3,2,15,12,1", "a,b,c,d", "3.5,2,15,12", "[3,2,15,12]"])
def test_parse_box_names_the_input_and_the_format(common, text):
    with pytest.raises(ValueError) as err:
        common.parse_box(text)
    assert "`box` must be 'x,y,w,h'" in str(err.value) and repr(text) in str(err.value)


def test_drawn_box_is_the_region(common):
    region, notes = common.region_from_inputs(None, "3,2,15,12", SIZE)
    assert region.shape == (1, 1, 20, 30)
    assert torch.equal(region[0, 0], _box_by_hand(2, 14, 3, 18))
    assert notes == []


def test_box_reaching_past_the_image_is_clipped_and_said(common):
    region, notes = common.region_from_inputs(None, "25,15,10,10", SIZE)
    assert torch.equal(region[0, 0], _box_by_hand(15, 20, 25, 30))
    assert notes == ["The box (25, 15, 35, 25) reaches past the 30x20 image: clipped to (25, 15, 30, 20)."]


def test_connected_mask_wins_over_the_box_and_says_so(common):
    mask = torch.zeros(1, 20, 30)
    mask[0, 5:7, 1:4] = 1
    region, notes = common.region_from_inputs(mask, "3,2,15,12", SIZE)
    assert torch.equal(region[0, 0], mask[0])
    assert notes == ["A mask is connected, so it is the region: the drawn box is not used."]
    region, notes = common.region_from_inputs(mask, "", SIZE)  # nothing drawn: nothing to say
    assert torch.equal(region[0, 0], mask[0]) and notes == []


def test_no_mask_and_no_box_asks_for_one(common):
    with pytest.raises(ValueError, match=r"No region: connect a `mask` or drag a box"):
        common.region_from_inputs(None, "", SIZE)


@pytest.mark.parametrize(
    ("text", "xyxy"),
    [("3,2,0,12", (3, 2, 3, 14)), ("3,2,15,-1", (3, 2, 18, 1)), ("40,2,5,5", (40, 2, 45, 7))],
)
def test_empty_or_outside_box_gets_box_to_masks_error(common, text, xyxy):
    """The drawn box and Box to Mask share `box_region`: the same box fails with the same message in both."""
    width, height = SIZE
    with pytest.raises(ValueError) as drawn:
        common.region_from_inputs(None, text, SIZE)
    with pytest.raises(ValueError) as typed:
        common.box_region(xyxy, height, width)
    assert str(drawn.value) == str(typed.value)
    x0, y0, x1, y1 = xyxy
    if x1 <= x0 or y1 <= y0:
        assert str(drawn.value) == f"The box {xyxy} is empty: x1 must exceed x0 and y1 must exceed y0."
    else:
        assert "lies outside the 30x20 image" in str(drawn.value)
