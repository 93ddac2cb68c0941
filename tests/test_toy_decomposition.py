"""The toy decomposition world (occlusions, shadows, imperfect masks, toy maps) and the shipped toy Outpaint-and-Remove
model beating the toy Fill baseline on background PSNR and chance on the whole object's alpha IoU.

The model check decomposes held-out scenes with the committed weights (CPU, seconds) and requires the margins in
`MARGINS` (stated in the README's toy decomposition section and measured in bfs_core/toy/results/decomposition.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bfs_core.layer_math import dilate_mask
from bfs_core.toy import decomposition as toy
from bfs_core.toy.evaluate_decomposition import score


def _occluded_scenes(count: int = 6) -> list[toy.DecompositionScene]:
    found, seed = [], toy.HELDOUT_SEEDS[0]
    while len(found) < count:
        scene = toy.make_decomposition_scene(seed)
        if scene.occluded:
            found.append(scene)
        seed += 1
    return found


class TestScenes:
    def test_a_scene_is_a_function_of_its_seed(self):
        a, b = toy.make_decomposition_scene(17), toy.make_decomposition_scene(17)
        np.testing.assert_array_equal(a.composite, b.composite)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.target == b.target and a.captions == b.captions
        assert np.abs(a.composite - toy.make_decomposition_scene(18).composite).max() > 0.1

    def test_composite_is_the_layers_over_the_clean_background(self):
        for scene in [toy.make_decomposition_scene(s) for s in range(5)]:
            comp, without = scene.clean_background, scene.clean_background
            for i, layer in enumerate(scene.layers):
                a = layer[..., 3:]
                comp = layer[..., :3] * a + comp * (1 - a)
                without = without if i == scene.target else layer[..., :3] * a + without * (1 - a)
            np.testing.assert_allclose(scene.composite, comp, atol=1e-5)
            np.testing.assert_allclose(scene.background, without, atol=1e-5)  # the others stay, the target goes

    def test_occluded_target_layer_extends_under_the_occluder(self):
        for scene in _occluded_scenes():
            hidden = scene.hidden
            assert hidden.sum() >= 3, "an occluded target has hidden object pixels"
            layer = scene.foreground
            assert (layer[hidden, 3] > 0.5).all()  # the complete layer is opaque where the occluder hides it
            # ... and shows the target's colour there, while the composite shows something else (the occluder).
            diff = np.abs(scene.composite[hidden] - layer[hidden, :3]).max(-1)
            assert (diff > 0.05).mean() > 0.8
            # The visible mask stops where the occluder starts: fully covered pixels are outside it.
            covered = hidden & (np.max(scene.object_alphas[scene.target + 1 :], axis=0) > 0.99)
            assert covered.any() and not scene.visible_mask[covered].any()
            # Every object layer carries a shadow (alpha strictly between 0 and 0.75 off the object).
            shadow = (layer[..., 3] > 0.05) & (layer[..., 3] < 0.75) & (scene.object_alpha < 0.01)
            assert shadow.sum() >= 5

    def test_masks_are_imperfect_within_the_stated_bounds(self):
        scenes = [toy.make_decomposition_scene(toy.HELDOUT_SEEDS[0] + i) for i in range(24)]
        changed, ious = 0, []
        reach = toy.MASK_DILATE_PX + toy.MASK_JITTER_PX
        for s in scenes:
            visible, mask = torch.from_numpy(s.visible_mask) > 0.5, torch.from_numpy(s.mask) > 0.5
            assert mask.any(), "a spoiled mask never loses the object entirely"
            grown = dilate_mask(visible.float(), reach) > 0.5
            assert not (mask & ~grown).any(), f"seed {s.seed}: the mask reaches beyond dilation + jitter"
            changed += bool((mask != visible).any())
            ious.append(float((mask & visible).sum() / (mask | visible).sum()))
        assert changed >= 22  # every held-out mask is spoiled (dilated or eroded, then shifted)
        assert 0.3 < np.mean(ious) < 0.9  # rough, yet still about the target

    def test_toy_maps_follow_the_scene(self):
        for scene in _occluded_scenes(3):
            visible_obj = scene.visible_object > 0.99
            shape = scene.caption.split()[-1]
            colour = np.asarray(toy.SEGMENTATION_COLOURS[shape], dtype=np.float32)
            np.testing.assert_allclose(
                scene.segmentation[visible_obj], np.broadcast_to(colour, scene.segmentation[visible_obj].shape)
            )
            # The occluder stands nearer (its foot is lower): brighter in the depth map than the hidden target.
            front = scene.object_alphas[-1] > 0.99
            assert scene.depth[front, 0].mean() > scene.depth[visible_obj, 0].mean()

    def test_training_and_heldout_seeds_do_not_meet(self, tmp_path):
        assert toy.TRAIN_SEEDS[1] <= toy.HELDOUT_SEEDS[0]
        assert all(s.seed >= toy.HELDOUT_SEEDS[0] for s in toy.heldout_decomposition_scenes(3, seed=2))
        with pytest.raises(ValueError, match="held-out seed range"):
            toy.heldout_decomposition_scenes(3, seed=-1)  # would reach into the training seeds
        with pytest.raises(ValueError, match="seeds in"):
            toy.write_decomposition_dataset(tmp_path, 2, first_seed=toy.HELDOUT_SEEDS[0])


def test_metrics_are_perfect_on_ground_truth_and_not_on_shuffled_truth():
    scenes = toy.heldout_decomposition_scenes(8)
    truth = toy.scene_tensors(scenes)
    exact = score(scenes, truth["foreground"], truth["background"])
    assert exact["alpha_iou"] == 1 and exact["fg_rgb_err"] == 0 and exact["hidden_recall"] == 1
    assert exact["bg_psnr"] > 90 and exact["bg_ssim"] > 0.999
    shuffled = score(scenes, truth["foreground"], truth["background"], shift=1)
    assert shuffled["alpha_iou"] < 0.3 and shuffled["bg_psnr"] < 25
    # Returning the input image as the background scores what leaving the object in place scores.
    kept = score(scenes, truth["foreground"], truth["composite"])
    assert kept["bg_psnr"] < exact["bg_psnr"] - 50


# ---------------------------------------------------------------------------------------------------------------------
# The shipped model

# Margins the shipped model must clear on these 16 held-out scenes at 12 steps. Measured with the committed weights:
# background PSNR 19.60 dB vs 12.64 for the toy Fill model (+6.96), whole-object alpha IoU 0.464 vs 0.126 for chance
# (+0.34); with the untrained adapter (the model is then exactly its Fill base) both tests fail (+0.00 dB, -0.006).
SCENES, STEPS = 16, 12
MARGINS = {"bg_psnr_over_fill_db": 3.0, "alpha_iou_over_chance": 0.2}

needs_weights = pytest.mark.skipif(
    not (toy.DECOMPOSITION_DIR / toy.WEIGHTS_NAME).is_file(), reason="toy decomposition weights not in this checkout"
)


@pytest.fixture(scope="module")
def shipped_rows():
    scenes = toy.heldout_decomposition_scenes(SCENES)
    ours = toy.load_toy_decomposition()
    fg, bg = toy.decompose_scenes(ours, scenes, steps=STEPS)
    _, fill_bg = toy.decompose_scenes(toy.load_toy_fill_baseline(), scenes, steps=STEPS)
    return score(scenes, fg, bg), score(scenes, None, fill_bg), score(scenes, fg, bg, shift=1)


@needs_weights
def test_shipped_model_removes_better_than_its_fill_base(shipped_rows):
    ours, fill, _ = shipped_rows
    gain = ours["bg_psnr"] - fill["bg_psnr"]
    assert gain >= MARGINS["bg_psnr_over_fill_db"], f"bg PSNR {ours['bg_psnr']:.2f} vs Fill {fill['bg_psnr']:.2f}"


@needs_weights
def test_shipped_model_completes_the_whole_object_better_than_chance(shipped_rows):
    ours, _, chance = shipped_rows
    gain = ours["alpha_iou"] - chance["alpha_iou"]
    assert gain >= MARGINS["alpha_iou_over_chance"], f"IoU {ours['alpha_iou']:.3f} vs {chance['alpha_iou']:.3f}"


# ---------------------------------------------------------------------------------------------------------------------
# The trainer's toy options (training/train_decompose.py): maps from the data, the ablation switches, the latent cache


class _CountingEncoder:
    """A fixed function of the pixels as the 'VAE' ([N, C, 16, 16] -> [N, 16, 2, 2]) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def rgb(self, images):
        self.calls += 1
        return torch.nn.functional.avg_pool2d(images, 8).repeat(1, 6, 1, 1)[:, :16]

    rgba_latent = rgb


class _FixedTexts:
    def get(self, captions, max_len, device, dtype):
        return torch.zeros(len(captions), 3, 32), torch.zeros(len(captions), 32)


def _raw_batch():
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return {
        "name": ["a", "b"],
        "composite": torch.rand(2, 3, 16, 16, generator=gen),
        "mask": mask,
        "background": torch.rand(2, 3, 16, 16, generator=gen),
        "foreground": torch.rand(2, 4, 16, 16, generator=gen),
        "segmentation": torch.rand(2, 3, 16, 16, generator=gen),
        "depth": torch.rand(2, 3, 16, 16, generator=gen),
        "caption": ["a red cube", "a blue ball"],
    }


def test_trainer_reads_toy_maps_caches_fixed_latents_and_can_drop_the_foreground_context():
    from training import train_decompose

    cfg = train_decompose.TrainConfig(maps_from_data=True, mask_spoil_probability=0.0)
    plain_encoder, cached_encoder, cache = _CountingEncoder(), _CountingEncoder(), {}
    args = (_FixedTexts(), cfg, [0, 1], "cpu", torch.float32)
    plain = train_decompose.encode_batch(_raw_batch(), plain_encoder, *args)
    assert sorted(plain.modalities) == ["depth", "edge", "segmentation"]  # the toy maps reach the fusion module
    first = train_decompose.encode_batch(_raw_batch(), cached_encoder, *args, cache=cache)
    calls = cached_encoder.calls
    second = train_decompose.encode_batch(_raw_batch(), cached_encoder, *args, cache=cache)
    assert cached_encoder.calls - calls == 2  # only the two mask-dependent contexts are encoded again
    for batch in (first, second):
        for key in ("z_bg", "z_fg", "query", "condition"):
            torch.testing.assert_close(getattr(batch, key), getattr(plain, key))
        for name, tokens in plain.modalities.items():
            torch.testing.assert_close(batch.modalities[name], tokens)
    no_fg = train_decompose.TrainConfig(maps_from_data=True, mask_spoil_probability=0.0, foreground_context=False)
    dropped = train_decompose.encode_batch(_raw_batch(), _CountingEncoder(), _FixedTexts(), no_fg, [0, 1], "cpu", None)
    c = 320  # [bg context 320 | fg context 320]
    assert dropped.condition[..., c:].abs().max() == 0 and plain.condition[..., c:].abs().max() > 0
    torch.testing.assert_close(dropped.condition[..., :c], plain.condition[..., :c])


@pytest.mark.parametrize("flag, value", [("--scenes", "1"), ("--steps", "0"), ("--seed", "-1")])
def test_evaluate_toy_decomposition_refuses_bad_numbers_by_name(flag, value, capsys):
    from bfs_core.__main__ import main

    assert main(["evaluate-toy-decomposition", flag, value]) == 2  # bad input: one line, no traceback
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
