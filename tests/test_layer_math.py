"""Layer maths on real cut-outs (tuxpaint stamps) and photos from tests/assets."""

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bfs_core import layer_math as lm


ASSETS = pathlib.Path(__file__).parent / "assets"


def load_rgba(name: str) -> torch.Tensor:
    """Stamp as straight RGBA float64 [4, H, W]."""
    array = np.asarray(Image.open(ASSETS / "stamps" / f"{name}.png").convert("RGBA"), dtype=np.float64) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def load_photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    image = Image.open(ASSETS / "photos" / name).convert("RGB").resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def goat() -> torch.Tensor:
    return load_rgba("goat")


class TestBlendingAndOver:
    def test_alpha_blend_is_eq1_on_real_stamp(self, goat):
        bg = load_photo("coffee.png", (goat.shape[2], goat.shape[1]))
        rgb, alpha = goat[:3], goat[3:]
        out = lm.alpha_blend(rgb, alpha, bg)
        # Opaque pixels show the stamp, transparent ones the photo, soft ones lie strictly between.
        opaque, clear = alpha[0] == 1, alpha[0] == 0
        assert torch.equal(out[:, opaque], rgb[:, opaque])
        assert torch.equal(out[:, clear], bg[:, clear])
        i = torch.nonzero((alpha[0] > 0.3) & (alpha[0] < 0.7))[0]
        a = alpha[0, i[0], i[1]]
        expected = a * rgb[:, i[0], i[1]] + (1 - a) * bg[:, i[0], i[1]]
        assert torch.allclose(out[:, i[0], i[1]], expected)

    def test_premultiply_round_trip_real_stamp(self, goat):
        premult = lm.premultiply(goat)
        assert torch.allclose(premult[:3], goat[:3] * goat[3:])
        back = lm.unpremultiply(premult)
        visible = goat[3] > 0
        assert torch.allclose(back[:, visible], goat[:, visible], atol=1e-12)
        assert torch.all(back[:3, ~visible] == 0)  # undefined colour is zeroed

    def test_over_matches_closed_form_and_stack(self):
        gen = torch.Generator("cpu").manual_seed(0)
        a, b, c = (torch.rand(4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
        ab = lm.over(a, b)
        a_out = a[3:] + b[3:] * (1 - a[3:])
        rgb = (a[:3] * a[3:] + b[:3] * b[3:] * (1 - a[3:])) / a_out
        assert torch.allclose(ab, torch.cat([rgb, a_out]))
        # N-layer stack (bottom to top) equals pairwise over.
        assert torch.allclose(lm.composite_stack([c, b, a]), lm.over(a, lm.over(b, c)))
        # An opaque RGB bottom gives an opaque result equal to eq. (1) of the flattened top.
        bg = torch.rand(3, 8, 8, generator=gen, dtype=torch.float64)
        flat = lm.composite_stack([bg, a])
        assert torch.allclose(flat[3], torch.ones(8, 8, dtype=torch.float64))
        assert torch.allclose(flat[:3], lm.alpha_blend(a[:3], a[3:], bg))

    def test_stack_rejects_mismatched_sizes(self):
        with pytest.raises(ValueError, match="must be the canvas size"):
            lm.composite_stack([torch.zeros(4, 8, 8), torch.zeros(4, 8, 9)])


class TestShadowAlphaDerivation:
    """BFS appendix eq. (10)-(15) on a real stamp with a synthetic soft shadow."""

    def make_case(self, goat):
        rgb, alpha_f = goat[:3], goat[3:]
        # Synthetic shadow: the silhouette shifted down-right, blurred, 60 % dark, and only where the object is not.
        shadow = torch.roll(alpha_f, shifts=(6, 9), dims=(1, 2))
        shadow = F.avg_pool2d(shadow[None], 7, stride=1, padding=3, count_include_pad=False)[0] * 0.6
        alpha_s = shadow * (1 - alpha_f)
        return rgb, alpha_f, alpha_s

    def test_recovers_alpha_colour_and_recomposite(self, goat):
        rgb, alpha_f, alpha_s = self.make_case(goat)
        f_shadowed = lm.render_shadowed_on_white(rgb, alpha_f, alpha_s)
        f_black = lm.render_on_black(rgb, alpha_f)
        # eq. (11) is what the renderer implements:
        assert torch.allclose(f_shadowed, alpha_f * rgb + 1 - alpha_f - alpha_s)

        rgba = lm.rgba_from_shadowed_renders(f_shadowed, f_black, eps=1e-9)
        alpha_true = alpha_f + alpha_s
        assert (rgba[3:] - alpha_true).abs().max() <= 1 / 255
        # The object+shadow colour is alpha-weighted: the object where it is opaque, black in pure shadow.
        colour_true = alpha_f * rgb / alpha_true.clamp_min(1e-12)
        mask = (alpha_true > 0.05).expand(3, -1, -1)
        assert mask.sum() > 1000 and alpha_s.max() > 0.3  # the case really has a shadow and a large object
        assert (rgba[:3][mask] - colour_true[mask]).abs().max() <= 1 / 255
        opaque = (alpha_f[0] == 1) & (alpha_s[0] == 0)
        assert torch.allclose(rgba[:3, opaque], rgb[:, opaque], atol=1 / 255)

        bg = load_photo("path_forest_640x400.jpg", (goat.shape[2], goat.shape[1]))
        c_hat = lm.recomposite(rgba, bg)  # eq. (15)
        c_true = alpha_f * rgb + alpha_s * 0 + (1 - alpha_f - alpha_s) * bg  # eq. (10) with B instead of white
        assert (c_hat - c_true).abs().max() <= 1 / 255

    def test_alpha_from_8bit_renders_within_one_level(self, goat):
        rgb, alpha_f, alpha_s = self.make_case(goat)
        quant = lambda x: torch.round(x * 255) / 255  # noqa: E731
        alpha = lm.combined_alpha_from_renders(
            quant(lm.render_shadowed_on_white(rgb, alpha_f, alpha_s)), quant(lm.render_on_black(rgb, alpha_f))
        )
        assert (alpha - (alpha_f + alpha_s)).abs().max() <= 1 / 255 + 1e-12

    def test_rejects_shadow_above_object_opacity(self):
        with pytest.raises(ValueError, match="<= 1"):
            lm.render_shadowed_on_white(torch.zeros(3, 2, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2) * 0.5)


class TestBoxesAndCrops:
    def test_box_from_real_mask_is_tight(self, goat):
        mask = goat[3] > 0.5
        x0, y0, x1, y1 = lm.box_from_mask(goat[3])
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        # Tight: every edge row/column of the box touches the mask.
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        assert lm.box_from_mask(mask.numpy()) == (x0, y0, x1, y1)

    def test_mask_box_round_trip_and_clamp(self):
        mask = lm.mask_from_box((3, 2, 9, 7), 10, 12)
        assert mask.sum() == 6 * 5 and lm.box_from_mask(mask) == (3, 2, 9, 7)
        assert lm.clamp_box((-5, -1, 40, 8), 10, 12) == (0, 0, 12, 8)
        assert lm.expand_box((4, 4, 8, 8), 2, 10, 10) == (2, 2, 10, 10)
        assert lm.expand_box((4, 4, 8, 8), 0.25, 100, 100) == (3, 3, 9, 9)
        with pytest.raises(ValueError, match="outside"):
            lm.clamp_box((20, 20, 30, 30), 10, 10)
        with pytest.raises(ValueError, match="no pixel"):
            lm.box_from_mask(torch.zeros(4, 4))

    def test_paste_back_is_exact_outside_crop(self):
        photo = load_photo("path_forest_640x400.jpg", (320, 200)).float()[None]
        goat = load_rgba("goat").float()
        box = (100, 40, 100 + goat.shape[2] // 2, 40 + goat.shape[1] // 2)
        crop, crop_box = lm.crop_around_box(photo, box, margin=0.2)
        assert crop_box == (80, 20, 203, 160)  # box 83x100, margin 0.2 * 100 px on every side
        # A "model" works at another resolution, then the result is pasted back at native resolution.
        small = F.interpolate(crop, size=(64, 64), mode="bilinear", align_corners=False)
        edited = small.flip(-1) * 0.5
        out = lm.paste_crop(photo, edited, crop_box)
        x0, y0, x1, y1 = crop_box
        outside = torch.ones(200, 320, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(out[..., outside], photo[..., outside])
        assert not torch.equal(out[..., y0:y1, x0:x1], photo[..., y0:y1, x0:x1])

    def test_uncrop_layer_keeps_effects_outside_the_box(self):
        goat = load_rgba("goat").float()[None]  # [1, 4, 200, 167]
        layer = lm.uncrop_layer(goat, (50, 10, 217, 210), 240, 300)
        assert layer.shape == (1, 4, 240, 300)
        assert torch.equal(layer[..., 10:210, 50:217], goat)
        assert layer[..., 3, :10, :].abs().sum() == 0 and layer[..., 3, :, 217:].abs().sum() == 0
        # A shadow-like effect in the crop margin (outside the object's box) survives the paste.
        gen = torch.Generator("cpu").manual_seed(0)
        crop = torch.rand(1, 4, 64, 64, generator=gen)
        crop[:, 3] = 0
        crop[:, 3, 60:, :] = 0.5  # a "shadow" below the object box
        pasted = lm.uncrop_layer(crop, (20, 20, 84, 84), 100, 100)
        assert torch.allclose(pasted[0, 3, 80:84, 20:84], torch.full((4, 64), 0.5))

    def test_resize_rgba_has_no_dark_fringe(self):
        rgba = torch.zeros(1, 4, 4, 4)
        rgba[:, 0, :, :2] = 1.0  # red where opaque; undefined (black) colour where transparent
        rgba[:, 3, :, :2] = 1.0
        up = lm.resize_rgba(rgba, (8, 8))
        visible = up[0, 3] > 0
        assert torch.allclose(up[0, 0][visible], torch.ones_like(up[0, 0][visible]), atol=1e-6)


def test_dilate_mask_grows_squares_without_wrapping():
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[2, 3] = True
    mask[0, 6] = True  # a corner pixel: its growth must not wrap to the other side
    grown = lm.dilate_mask(mask, 1)
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[1:4, 2:5] = True
    expected[0:2, 5:7] = True
    assert grown.dtype == torch.bool and torch.equal(grown, expected)
    batched = lm.dilate_mask(mask[None, None].float(), 1)  # [B, 1, H, W] float masks too
    assert batched.shape == (1, 1, 6, 7) and torch.equal(batched[0, 0] > 0.5, expected)
    assert lm.dilate_mask(mask, 0) is mask
