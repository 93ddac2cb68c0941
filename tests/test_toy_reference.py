"""The toy reference encoder (bfs_core/toy/reference.py) and reference tokens with the caption (ReferenceMode).

- the tokens land in the toy text space: [B, 16, 32], the Redux layout computed by hand, on the T5 tokens' scale;
- replace vs append, by value (bfs_core.conditioning), and the StyleModelApply-output check of `apply_reference_mode`;
- the shipped encoder steers the frozen toy BFS: on held-out scenes with the neutral prompt, the layer's colour and
  shape follow a reference of another scene's object well above chance (margins stated in MARGINS);
- save/load round trip, missing folders, the neutral prompt, and a 3-step training smoke run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bfs_core.conditioning import ReferenceMode, apply_reference_mode, join_reference
from bfs_core.toy.models import MAX_SEQUENCE_LENGTH, NEUTRAL_PROMPT, encode_toy_prompt, load_toy
from bfs_core.toy.reference import (
    ToyReduxProjection,
    ToyReferenceEncoder,
    ToyVisionEncoder,
    load_toy_reference,
    preprocess,
    reference_image,
    reference_scene,
)


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return load_toy()


@pytest.fixture(scope="module")
def encoder():
    return load_toy_reference()


# -- tokens in the toy text space ------------------------------------------------------------------------------------
def test_reference_tokens_are_the_redux_layout_in_the_toy_text_space(toy, encoder):
    image = reference_image("blue", "cone", seed=3)
    assert image.shape == (1, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    tokens = encoder(image)
    assert tokens.shape == (1, 16, 32) and tokens.dtype == torch.float32
    # By hand: the vision tokens through redux_down(silu(redux_up(x))), ComfyUI's ReduxImageEncoder formula.
    hidden = encoder.vision(image * 2 - 1)
    up, down = encoder.redux.redux_up, encoder.redux.redux_down
    by_hand = F.silu(hidden @ up.weight.T + up.bias) @ down.weight.T + down.bias
    torch.testing.assert_close(tokens, by_hand, rtol=1e-5, atol=1e-5)
    # The tokens stand where the caption's T5 tokens do: the same scale (the toy T5 tokens have std ~1).
    caption, _ = toy[0].text_encoders.encode(["a blue cone"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    ratio = float(tokens.std() / caption.std())
    assert 0.2 < ratio < 5, ratio
    # Different objects give different tokens; the same object in two scenes is closer than two different objects.
    same = encoder(reference_image("blue", "cone", seed=4))
    other = encoder(reference_image("yellow", "ball", seed=3))
    assert (tokens - same).norm() < (tokens - other).norm()


def test_preprocess_crops_the_centre_square_or_squashes():
    image = torch.zeros(1, 3, 64, 128)
    image[..., 32:96] = 1.0  # a white centre square on a black band
    cropped, squashed = preprocess(image, crop=True), preprocess(image, crop=False)
    assert cropped.shape == squashed.shape == (1, 3, 64, 64)
    assert torch.equal(cropped, torch.ones_like(cropped))  # only the white square, in [-1, 1]
    assert squashed[..., :, :8].max() == -1 and squashed[..., :, 28:36].min() == 1
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        preprocess(torch.zeros(1, 4, 64, 64))


# -- replace vs append -----------------------------------------------------------------------------------------------
def test_join_reference_replace_and_append_by_value():
    caption = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    reference = -torch.arange(1 * 2 * 4, dtype=torch.float32).view(1, 2, 4) - 1
    replaced = join_reference(caption, reference, ReferenceMode.REPLACE, strength=0.5)
    assert torch.equal(replaced, (0.5 * reference).expand(2, -1, -1))
    appended = join_reference(caption, reference, "append")
    assert appended.shape == (2, 5, 4)
    assert torch.equal(appended[:, :3], caption) and torch.equal(appended[:, 3:], reference.expand(2, -1, -1))
    with pytest.raises(ValueError, match="same width"):
        join_reference(caption, torch.zeros(1, 2, 5), "append")
    with pytest.raises(ValueError):
        join_reference(caption, reference, "prepend")


def test_apply_reference_mode_on_style_model_apply_output():
    caption = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    reference = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    conditioned = torch.cat([caption, reference], dim=1)  # what StyleModelApply returns
    assert torch.equal(apply_reference_mode(conditioned, caption, ReferenceMode.REPLACE), reference)
    assert torch.equal(apply_reference_mode(conditioned, caption, ReferenceMode.APPEND), conditioned)
    other = caption.clone()
    other[0, 3, 7] += 1e-3  # a caption that is not the one StyleModelApply got
    with pytest.raises(ValueError, match="output of StyleModelApply"):
        apply_reference_mode(conditioned, other, "replace")
    with pytest.raises(ValueError, match="output of StyleModelApply"):
        apply_reference_mode(caption, caption, "replace")  # no reference tokens at all


# -- the shipped encoder steers the layer ----------------------------------------------------------------------------
# Measured on these 16 scenes (8 steps): colour 0.875 vs chance 0.062, shape 0.625 vs 0.188 (append);
# bfs_core/toy/results/reference.md has the full 64-scene evaluation.
MARGINS = {"colour_acc": 0.5, "shape_acc": 0.25}


def test_shipped_reference_encoder_beats_chance(toy, encoder):
    from bfs_core.toy.evaluate import heldout_scenes, predict_conditioned, score, to_tensor

    pipe, rgba = toy
    scenes = heldout_scenes(16)
    rng = np.random.default_rng(54321)
    tokens = encoder(to_tensor([reference_scene(rng, s.colour, s.shape).composite for s in scenes]))
    neutral, pooled = encode_toy_prompt(pipe.text_encoders, NEUTRAL_PROMPT)

    def condition(chunk):
        return join_reference(neutral.expand(len(chunk), -1, -1), tokens, "append"), pooled.expand(len(chunk), -1)

    preds = predict_conditioned(pipe, rgba, scenes, condition, steps=8)
    got, chance = score(scenes, preds), score(scenes, preds, shift=1)
    for metric, margin in MARGINS.items():
        assert got[metric] >= chance[metric] + margin, (metric, got[metric], chance[metric])


# -- files, prompts, training ----------------------------------------------------------------------------------------
def test_save_load_round_trip_and_missing_folder(tmp_path):
    torch.manual_seed(0)
    fresh = ToyReferenceEncoder(ToyVisionEncoder(), ToyReduxProjection()).eval()
    fresh.save(tmp_path / "ref")
    loaded = load_toy_reference(tmp_path / "ref")
    image = reference_image("red", "pillar", seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), fresh(image), rtol=0, atol=0)
    with pytest.raises(ValueError, match="train_toy_reference"):
        load_toy_reference(tmp_path / "nothing")


def test_neutral_prompt_is_accepted_and_other_text_still_refused(toy):
    embeds, pooled = encode_toy_prompt(toy[0].text_encoders, NEUTRAL_PROMPT)
    assert embeds.shape == (1, 16, 32) and pooled.shape == (1, 32)
    with pytest.raises(ValueError, match="'a cat'"):
        encode_toy_prompt(toy[0].text_encoders, "a cat")


def test_short_training_run_writes_the_encoder(tmp_path):
    from training.train_toy_reference import TrainConfig, main

    cfg = TrainConfig(
        output_dir=str(tmp_path), scenes=8, references_per_class=1, batch_size=4, max_steps=3, warmup_steps=1
    )
    result = main(cfg)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    from safetensors.torch import load_file

    vision = load_file(str(result.weights / "vision" / "diffusion_pytorch_model.safetensors"))
    redux = load_file(str(result.weights / "redux" / "diffusion_pytorch_model.safetensors"))
    assert set(redux) == {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    assert redux["redux_down.weight"].shape == (32, 96) and "position" in vision
