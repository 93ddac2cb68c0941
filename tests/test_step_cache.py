"""Step caching (First-Block-Cache on diffusers' hooks) for the two-branch model: exact at 0, both branches in step,
no state carried between runs, fewer full evaluations at a threshold."""

import pytest
import torch

from bfs_core.sampling.step_cache import FAST_THRESHOLD, parse_cache_threshold, step_cache


@pytest.fixture(scope="module")
def toy(single_thread):
    from bfs_core.toy.models import encode_toy_prompt, load_toy

    pipe, _ = load_toy()
    embeds, pooled = encode_toy_prompt(pipe.text_encoders, "a red cube")
    gen = torch.Generator().manual_seed(0)
    background = torch.rand(1, 3, 64, 64, generator=gen)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 28:52, 20:40] = 1
    return pipe, (background, mask, embeds, pooled)


def _generate(pipe, scene, threshold, steps=20, seed=3):
    return pipe.generate(*scene, seed=seed, steps=steps, short_side=64, cache_threshold=threshold)


def test_threshold_zero_is_exact_and_installs_nothing(toy):
    pipe, scene = toy
    plain = pipe.generate(*scene, seed=3, steps=8, short_side=64)
    exact = _generate(pipe, scene, 0.0, steps=8)
    assert torch.equal(plain.fg_latent, exact.fg_latent) and torch.equal(plain.comp_latent, exact.comp_latent)
    assert exact.transformer_calls == exact.full_evaluations == 8
    assert not getattr(pipe.model.transformer, "_diffusers_hook", None) or not any(
        "fbc" in name for name in pipe.model.transformer._diffusers_hook.hooks
    )


def test_caching_skips_evaluations_with_both_branches_in_step(toy):
    pipe, scene = toy
    transformer = pipe.model.transformer
    rows = []
    probe = transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0])
    )
    try:
        exact = _generate(pipe, scene, 0.0)
        rows.clear()
        cached = _generate(pipe, scene, FAST_THRESHOLD)
    finally:
        probe.remove()
    assert cached.transformer_calls == 20
    assert 1 <= cached.full_evaluations < 20, cached.full_evaluations
    # Every full evaluation ran the whole two-branch batch (comp + fg rows): the branches skip or compute together.
    assert len(rows) == cached.full_evaluations and set(rows) == {2}
    # A cheaper, close answer: the layer stays near the exact one (relative to its own scale).
    rel = float((cached.fg_latent - exact.fg_latent).norm() / exact.fg_latent.norm())
    assert 0 < rel < 0.25, rel


def test_no_cache_state_crosses_runs(toy):
    pipe, scene = toy
    first = _generate(pipe, scene, FAST_THRESHOLD, seed=5)
    other = _generate(pipe, scene, FAST_THRESHOLD, seed=9)  # a different run in between
    again = _generate(pipe, scene, FAST_THRESHOLD, seed=5)
    assert torch.equal(first.fg_latent, again.fg_latent)
    assert not torch.equal(first.fg_latent, other.fg_latent)
    assert first.full_evaluations == again.full_evaluations
    # The hooks are gone after the run: a plain call afterwards is the exact model again.
    assert torch.equal(
        _generate(pipe, scene, 0.0).fg_latent, pipe.generate(*scene, seed=3, steps=20, short_side=64).fg_latent
    )


def test_a_huge_threshold_computes_only_the_first_step(toy):
    pipe, scene = toy
    result = _generate(pipe, scene, 1e9, steps=6)
    assert result.transformer_calls == 6 and result.full_evaluations == 1


@pytest.mark.parametrize(
    "value, expected", [("0", 0.0), (0.25, 0.25), ("fast", FAST_THRESHOLD), (" FAST ", FAST_THRESHOLD)]
)
def test_parse_cache_threshold(value, expected):
    assert parse_cache_threshold(value) == expected


@pytest.mark.parametrize("value", ["-0.1", "nan", "quick", None])
def test_parse_cache_threshold_refuses_bad_values(value):
    with pytest.raises(ValueError, match="cache_threshold"):
        parse_cache_threshold(value)


def test_step_cache_refuses_a_model_without_transformer():
    with pytest.raises(ValueError, match="Flux transformer"):
        with step_cache(object(), 0.1):
            pass
