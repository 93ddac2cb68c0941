"""The step callback's payload (`DenoiseStep`): the x0 estimates a live preview shows, against hand-computed values."""

from types import SimpleNamespace

import pytest
import torch
from test_sampling import SCHEDULER, StraightLineModel, _common

from bfs_core.sampling.flow_match import latent_image_ids, make_scheduler, sample_dual, unpack_latents


class RandomVelocityModel:
    """Returns a fresh random velocity per branch and call, and records what it was given."""

    def __init__(self, latent_channels=64):
        self.config = SimpleNamespace(noise="independent")
        self.dtype, self.device, self.latent_channels = torch.float32, torch.device("cpu"), latent_channels
        self.gen = torch.Generator().manual_seed(7)
        self.calls = []  # (comp, fg, sigma_comp, sigma_fg, v_comp, v_fg)

    def __call__(self, comp, fg, fill_cond, prompt_embeds, pooled, t_comp, t_fg, img_ids, guidance):
        v_comp, v_fg = (torch.randn(comp.shape, generator=self.gen) for _ in range(2))
        self.calls.append((comp.clone(), fg.clone(), t_comp.clone(), t_fg.clone(), v_comp, v_fg))
        return v_comp, v_fg


def _run(model, steps, **kwargs):
    seen = []
    gen = torch.Generator().manual_seed(3)
    noise = tuple(torch.randn(2, 16, 64, generator=gen) for _ in range(2))
    sample_dual(model, **_common(), steps=steps, noise=noise, callback=lambda i, n, s: seen.append(s), **kwargs)
    return seen


def test_the_estimate_is_x_minus_sigma_times_v_of_each_step():
    model = RandomVelocityModel()
    seen = _run(model, steps=4)
    sigmas = make_scheduler(SCHEDULER, 4, 16, "cpu").sigmas
    assert len(seen) == len(model.calls) == 4
    for i, (state, (comp, fg, s_comp, s_fg, v_comp, v_fg)) in enumerate(zip(seen, model.calls)):
        assert state.sigma == pytest.approx(float(sigmas[i]), abs=1e-6)
        assert state.sigma == pytest.approx(float(s_fg[0]), abs=1e-6)  # the sigma the model was given
        # by hand: x0 = x_sigma − sigma·v, from the latents the model saw and the velocity it returned
        assert torch.allclose(state.comp_x0, comp - float(sigmas[i]) * v_comp, atol=1e-6)
        assert torch.allclose(state.fg_x0, fg - float(sigmas[i]) * v_fg, atol=1e-6)
    assert seen[0].sigma == 1.0 and torch.allclose(seen[0].fg_x0, model.calls[0][1] - model.calls[0][5])
    # the latents after step i are what the model sees at step i + 1
    assert all(torch.equal(a.fg, b[1]) and torch.equal(a.comp, b[0]) for a, b in zip(seen, model.calls[1:]))


def test_on_the_exact_flow_every_estimate_is_the_target():
    gen = torch.Generator().manual_seed(0)
    x0c, x0f, nc, nf = (torch.randn(2, 16, 64, generator=gen) for _ in range(4))
    seen = []
    sample_dual(
        StraightLineModel(x0c, x0f, nc, nf),
        **_common(),
        steps=5,
        noise=(nc, nf),
        callback=lambda i, n, s: seen.append(s),
    )
    for state in seen:  # a wrong sign, or the next step's sigma, would be off by up to |noise − x0|
        assert (state.comp_x0 - x0c).abs().max() < 1e-5 and (state.fg_x0 - x0f).abs().max() < 1e-5


def test_extract_mode_estimates_the_layer_and_keeps_the_clean_composite():
    gen = torch.Generator().manual_seed(1)
    x0c, x0f, nc, nf = (torch.randn(1, 16, 64, generator=gen) for _ in range(4))
    seen = []
    sample_dual(
        StraightLineModel(x0c, x0f, nc, nf),
        **_common(n=1),
        mode="extract_fg",
        comp_clean=x0c,
        steps=3,
        noise=(nc, nf),
        callback=lambda i, n, s: seen.append(s),
    )
    assert len(seen) == 3
    for state in seen:
        assert torch.equal(state.comp_x0, x0c) and (state.fg_x0 - x0f).abs().max() < 1e-5


def test_unpacked_estimates_have_the_latent_size_of_the_image_ids():
    seen = []
    common = dict(_common(n=1, length=6), img_ids=latent_image_ids(4, 6))  # a 4×6 latent: 2×3 tokens
    gen = torch.Generator().manual_seed(2)
    noise = tuple(torch.randn(1, 6, 64, generator=gen) for _ in range(2))
    sample_dual(RandomVelocityModel(), **common, steps=2, noise=noise, callback=lambda i, n, s: seen.append(s))
    assert seen[0].latent_size == (4, 6)
    comp, fg = seen[0].unpacked_x0()
    assert torch.equal(comp, unpack_latents(seen[0].comp_x0, 4, 6)) and fg.shape == (1, 16, 4, 6)
