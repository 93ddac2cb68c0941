"""NaN and infinity are refused: at every entry point (naming the input) and during sampling (naming step and branch).

The sampling checks run on the committed toy model with a forward hook that poisons one branch's output at one
step, so the loop itself (not a stub of it) has to notice.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bfs_core.finite import NonFiniteInputError, NonFiniteSamplingError, check_finite
from bfs_core.pipelines.decomposition import DecompositionPipeline
from bfs_core.toy.demo import _mask, background_image
from bfs_core.toy.models import MAX_SEQUENCE_LENGTH, load_toy


torch.set_num_threads(1)


def test_check_finite_counts_and_names():
    x = torch.zeros(2, 3)
    check_finite("x", x)  # finite passes
    check_finite("x", None)
    check_finite("ids", torch.arange(4))  # integers cannot be NaN
    x[0, 1], x[1, 2] = float("nan"), float("-inf")
    expected = r"`depth` \(the map\) contains 1 NaN and 1 infinite values \(of 6\)"
    with pytest.raises(NonFiniteInputError, match=expected):
        check_finite("depth", x, "the map")


@pytest.fixture(scope="module")
def toy():
    pipe, rgba = load_toy()
    embeds, pooled = pipe.text_encoders.encode(["a red cube"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    return SimpleNamespace(
        pipe=pipe, rgba=rgba, embeds=embeds, pooled=pooled, bg=background_image(3), mask=_mask([14, 34, 30, 50])
    )


def _poisoned(x: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    x = x.contiguous().clone()
    x.view(-1)[7] = value
    return x


@pytest.mark.parametrize("name", ["background", "mask", "prompt_embeds", "pooled"])
def test_generate_refuses_non_finite_inputs_by_name(toy, name):
    args = {"background": toy.bg, "mask": toy.mask, "prompt_embeds": toy.embeds, "pooled": toy.pooled}
    args[name] = _poisoned(args[name], float("inf") if name == "pooled" else float("nan"))
    calls = []
    handle = toy.pipe.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(NonFiniteInputError, match=f"`{name}`"):
            toy.pipe.generate(
                args["background"], args["mask"], args["prompt_embeds"], args["pooled"], steps=2, short_side=0
            )
    finally:
        handle.remove()
    assert calls == []  # refused before the model ran


def test_extract_refuses_a_non_finite_composite(toy):
    with pytest.raises(NonFiniteInputError, match="`composite`"):
        toy.pipe.extract(_poisoned(toy.bg), toy.bg, toy.mask, toy.embeds, toy.pooled, steps=1, short_side=0)


def test_rgba_decode_refuses_a_non_finite_latent(toy):
    latent = torch.zeros(1, 16, 8, 8)
    toy.rgba.decode(latent)  # finite decodes
    with pytest.raises(NonFiniteInputError, match="`latent` \\(the foreground latent to decode\\)"):
        toy.rgba.decode(_poisoned(latent))


@pytest.mark.parametrize("name", ["image", "mask", "edge", "depth", "pooled"])
def test_decompose_refuses_non_finite_inputs_by_name(name):
    pipe = DecompositionPipeline(SimpleNamespace(has_foreground=False), None, None, {})
    image, mask = torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    args = {
        "image": image,
        "mask": mask,
        "edge": image.clone(),
        "depth": image.clone(),
        "prompt_embeds": torch.zeros(1, 4, 8),
        "pooled": torch.zeros(1, 8),
    }
    args[name] = _poisoned(args[name])
    with pytest.raises(NonFiniteInputError, match=f"`{name}`"):
        pipe.decompose(
            args["image"],
            args["mask"],
            args["prompt_embeds"],
            args["pooled"],
            edge=args["edge"],
            depth=args["depth"],
            steps=1,
        )


def _poison_at(model, call: int, branch: str):
    """A forward hook making the model's `branch` output NaN at its `call`-th forward (1-based)."""
    count = [0]

    def hook(_module, _args, output):
        count[0] += 1
        if count[0] != call:
            return None
        v_comp, v_fg = output
        return (_poisoned(v_comp), v_fg) if branch == "comp" else (v_comp, _poisoned(v_fg))

    return model.register_forward_hook(hook)


@pytest.mark.parametrize(("mode", "step", "branch"), [("bg2fg", 3, "comp"), ("bg2fg", 2, "fg"), ("extract", 4, "fg")])
def test_nan_during_sampling_stops_naming_step_and_branch(toy, mode, step, branch):
    seen = []
    handle = _poison_at(toy.pipe.model, step, branch)
    try:
        with pytest.raises(NonFiniteSamplingError, match=f"`{branch}` branch at step {step} of 5"):
            kwargs = dict(steps=5, short_side=0, callback=lambda i, n, _: seen.append(i))
            if mode == "bg2fg":
                toy.pipe.generate(toy.bg, toy.mask, toy.embeds, toy.pooled, **kwargs)
            else:
                toy.pipe.extract(toy.bg, toy.bg, toy.mask, toy.embeds, toy.pooled, **kwargs)
    finally:
        handle.remove()
    assert seen == list(range(step - 1))  # stopped at that step: no callback for it or later


def test_clean_run_is_unaffected_by_the_checks(toy):
    result = toy.pipe.generate(toy.bg, toy.mask, toy.embeds, toy.pooled, steps=3, short_side=0)
    assert torch.isfinite(result.fg_latent).all() and result.composite.std() > 0.01
