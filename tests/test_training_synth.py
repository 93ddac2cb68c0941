"""The synthetic-triplet pipeline (appendix A.3) on real assets, with stand-in segmenter and matting."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import load_config
from training.data import ManifestDataset
from training.synth_data import SynthConfig, drop_shadow, main, make_trimap, mask_iou, synthesize
from training.tiny import write_layer_datasets


ASSETS = Path(__file__).parent / "assets"


def _read(path, mode):
    array = np.asarray(Image.open(path).convert(mode), np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)  # HWC -> CHW


def _key(image):
    return hashlib.sha1((image * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_layer_datasets(ASSETS, tmp_path_factory.mktemp("synth"), count=4, size=96)


@pytest.fixture(scope="module")
def oracle(data):
    """Stand-ins for SAM2 / ViTMatte: look the composite up and return its true object mask / alpha."""
    alphas = {}
    for line in (data["triplets"] / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        comp = _read(data["triplets"] / entry["composite"], "RGB")
        alphas[_key(comp)] = _read(data["triplets"] / entry["foreground"], "RGBA")[3:]
    segmenter = lambda image, box: (alphas[_key(image)] >= 0.5).float()  # noqa: E731
    matting = lambda image, trimap: alphas[_key(image)]  # noqa: E731
    return segmenter, matting


def _cfg(data, out, **kw):
    return load_config(SynthConfig, None, {"input_dir": str(data["removal"]), "output_dir": str(out), **kw})


def test_trimap_band_is_eleven_pixels():
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 20:44] = 1
    tri = make_trimap(mask, 11)
    assert (
        tri[0, 32, 32] == 1
        and tri[0, 32, 9] == 0.5
        and tri[0, 32, 8] == 0
        and tri[0, 32, 30] == 0.5
        and tri[0, 32, 31] == 1
    )
    assert mask_iou(mask, tri >= 0.5) == pytest.approx(24**2 / 46**2)


def test_without_shadow_the_pipeline_recovers_the_original_composite(data, oracle, tmp_path):
    segmenter, matting = oracle
    result = main(_cfg(data, tmp_path, shadow="none"), segmenter, matting)
    assert result.kept == 4
    for line in (tmp_path / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        original = _read(data["removal"] / "composite" / f"{entry['name']}.png", "RGB")
        rebuilt = _read(tmp_path / entry["composite"], "RGB")
        alpha = oracle[1](original, None)
        hard = ((alpha == 0) | (alpha == 1)).expand(3, -1, -1)
        # Ĉ = C up to 8-bit rounding where the matte is hard; at soft edges the colour is taken from C itself (the
        # paper's F_white uses C), so Ĉ there is C blended once more with B — close, not equal.
        assert (rebuilt - original)[hard].abs().max() <= 1.01 / 255
        assert (rebuilt - original).abs().mean() < 0.01


def test_triplets_satisfy_eq15_and_carry_a_shadow(data, oracle, tmp_path):
    segmenter, matting = oracle
    result = main(_cfg(data, tmp_path), segmenter, matting)
    assert result.kept == 4 and result.report["by_status"] == {"kept": 4}
    dataset = ManifestDataset(tmp_path, "triplet", resolution=64)  # the trainers read what the pipeline wrote
    assert len(dataset) == 4 and not dataset.bad
    for entry in dataset.entries:
        fg = _read(tmp_path / entry["foreground"], "RGBA")
        bg = _read(tmp_path / entry["background"], "RGB")
        comp = _read(tmp_path / entry["composite"], "RGB")
        assert (comp - (fg[3:] * fg[:3] + (1 - fg[3:]) * bg)).abs().max() <= 0.5 / 255 + 1e-6  # eq. (15)
        matte = oracle[1](_read(data["removal"] / "composite" / f"{entry['name']}.png", "RGB"), None)
        shadow_only = (fg[3:] > 0.05) & (matte < 0.01)
        assert shadow_only.sum() > 0  # the drop shadow added opacity outside the object
        assert (fg[:3][:, shadow_only[0]] < 0.2).all()  # ... and it is black (I_black = 0)


def test_iou_filter_reports_samples_by_name(data, oracle, tmp_path):
    box_segmenter = lambda image, box: torch.ones(1, *image.shape[-2:])  # noqa: E731  # whole image: IoU tiny
    result = main(_cfg(data, tmp_path), box_segmenter, oracle[1])
    report = json.loads((tmp_path / "filter_report.json").read_text())
    assert result.kept == 0 and report["by_status"] == {"filtered": 4}
    assert {s["name"] for s in report["samples"]} == {f"s{i:03d}" for i in range(4)}
    assert all(s["iou"] < 0.8 and "iou" in s["reason"] for s in report["samples"])


def test_drop_shadow_obeys_eq10():
    alpha = torch.zeros(1, 32, 32)
    alpha[:, 8:20, 12:20] = 1
    f_white = alpha * torch.tensor([0.2, 0.6, 0.9]).view(3, 1, 1) + (1 - alpha)
    shadowed = drop_shadow(blur_px=1)(f_white, alpha)
    # Outside the object F_shadowed = 1 − α_shadow (grey, equal channels); the object is unchanged.
    assert torch.equal(shadowed[:, alpha[0] > 0], f_white[:, alpha[0] > 0])
    outside = shadowed[:, alpha[0] == 0]
    assert torch.allclose(outside[0], outside[1]) and outside.min() < 1


def test_synthesize_uses_box_of_the_object(data, oracle):
    segmenter, matting = oracle
    comp = _read(data["removal"] / "composite" / "s000.png", "RGB")
    bg = _read(data["removal"] / "background" / "s000.png", "RGB")
    rough = _read(data["removal"] / "mask" / "s000.png", "L")
    images, stats = synthesize(comp, bg, rough, segmenter, matting, drop_shadow(), SynthConfig())
    obj = matting(comp, None)[0] >= 0.5
    ys, xs = torch.nonzero(obj, as_tuple=True)
    assert images["box"] == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    assert stats["iou"] >= 0.8


def test_sam2_on_a_transformers_without_it_says_which_version_it_needs(monkeypatch, tmp_path):
    """transformers 4.50-4.55 (inside the pack's range) has no Sam2Model: the segmenter says what to install."""
    import sys
    import types

    from training.synth_data import Sam2Segmenter

    old = types.ModuleType("transformers")
    old.__version__ = "4.50.3"
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(ImportError, match=r"segmenter 'sam2' needs transformers>=4\.56.*4\.50\.3 is installed"):
        Sam2Segmenter(str(tmp_path))
