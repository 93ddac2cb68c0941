"""Flow-matching sampler and Fill packing, against hand-computed values."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bfs_core.sampling.flow_match import (
    SamplingInterrupted,
    initial_noise,
    latent_image_ids,
    make_scheduler,
    pack_latents,
    pack_mask,
    sample_dual,
    time_shift_mu,
    unpack_latents,
)


SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def test_shipped_scheduler_config_is_flux_fill():
    shipped = json.loads((Path(__file__).parents[1] / "bfs_core/configs/flux_fill_scheduler.json").read_text())
    assert {k: shipped[k] for k in SCHEDULER} == SCHEDULER


def test_pack_unpack_round_trip_and_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 12)
    # token (row 1, col 2) channel (c=1, py=1, px=0) is pixel x[:, 1, 2*1+1, 2*2+0]
    assert packed[0, 1 * 3 + 2, 1 * 4 + 1 * 2 + 0] == x[0, 1, 3, 4]
    assert torch.equal(unpack_latents(packed, 4, 6), x)


def test_pack_mask_puts_each_pixel_where_flux_fill_expects_it():
    mask = torch.zeros(1, 1, 32, 48)
    y, x = 21, 38  # latent cell (2, 4), inside-cell offset (5, 6)
    mask[0, 0, y, x] = 1
    tokens = pack_mask(mask)
    assert tokens.shape == (1, (4 // 2) * (6 // 2), 256)
    cell_channel = (y % 8) * 8 + (x % 8)  # space-to-depth: 64 channels per 8×8 cell
    h, w = y // 8, x // 8
    token = (h // 2) * 3 + (w // 2)
    channel = cell_channel * 4 + (h % 2) * 2 + (w % 2)
    assert tokens[0, token, channel] == 1 and tokens.sum() == 1


def test_image_ids_are_row_col_of_the_packed_grid():
    ids = latent_image_ids(4, 6)
    assert ids.tolist() == [[0, r, c] for r in range(2) for c in range(3)]


def test_resolution_shift_matches_flux_values():
    assert time_shift_mu(1024, SCHEDULER) == pytest.approx(0.63)
    assert time_shift_mu(4096, SCHEDULER) == pytest.approx(1.15)
    scheduler = make_scheduler(SCHEDULER, 50, 1024, "cpu")
    assert scheduler.timesteps[0] == pytest.approx(1000.0)
    assert scheduler.timesteps[-1] == pytest.approx(36.9, abs=0.05)  # 512²: last t = 36.9
    sigma, mu = 0.5, 0.63
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / sigma - 1))
    assert make_scheduler(SCHEDULER, 2, 1024, "cpu").sigmas[1] == pytest.approx(float(shifted), abs=1e-6)


class StraightLineModel:
    """v = noise − x0 for both branches: the exact flow of a straight path from x0 (sigma 0) to noise (sigma 1)."""

    def __init__(self, x0_comp, x0_fg, noise_comp, noise_fg, noise_mode="independent"):
        self.targets = (x0_comp, x0_fg)
        self.noise = (noise_comp, noise_fg)
        self.config = SimpleNamespace(noise=noise_mode)
        self.dtype, self.device, self.latent_channels = torch.float32, torch.device("cpu"), x0_comp.shape[-1]
        self.calls = []

    def __call__(self, comp, fg, fill_cond, prompt_embeds, pooled, t_comp, t_fg, img_ids, guidance):
        self.calls.append((comp.clone(), t_comp.clone(), t_fg.clone()))
        return self.noise[0] - self.targets[0], self.noise[1] - self.targets[1]


def _common(n=2, length=16):
    return dict(
        fill_cond=torch.zeros(n, length, 320),
        prompt_embeds=torch.zeros(n, 4, 8),
        pooled=torch.zeros(n, 8),
        img_ids=latent_image_ids(8, 8),
        scheduler_config=SCHEDULER,
    )


def test_euler_on_a_straight_line_reaches_its_target():
    gen = torch.Generator().manual_seed(0)
    x0c, x0f, nc, nf = (torch.randn(2, 16, 64, generator=gen) for _ in range(4))
    model = StraightLineModel(x0c, x0f, nc, nf)
    out = sample_dual(model, **_common(), steps=7, noise=(nc, nf))
    assert (out.comp - x0c).abs().max() < 1e-5 and (out.fg - x0f).abs().max() < 1e-5
    assert len(model.calls) == 7
    assert torch.allclose(model.calls[0][1], torch.ones(2))  # first step at sigma = 1


def test_extract_mode_holds_the_composite_branch_clean_at_sigma_zero():
    gen = torch.Generator().manual_seed(1)
    x0c, x0f, nc, nf = (torch.randn(1, 16, 64, generator=gen) for _ in range(4))
    model = StraightLineModel(x0c, x0f, nc, nf)
    out = sample_dual(model, **_common(n=1), mode="extract_fg", comp_clean=x0c, steps=5, noise=(nc, nf))
    assert all(torch.equal(comp, x0c) and torch.equal(t_comp, torch.zeros(1)) for comp, t_comp, _ in model.calls)
    fg_sigmas = [float(t_fg) for _, _, t_fg in model.calls]
    assert fg_sigmas == sorted(fg_sigmas, reverse=True) and fg_sigmas[0] == 1.0
    assert torch.equal(out.comp, x0c) and (out.fg - x0f).abs().max() < 1e-5
    with pytest.raises(ValueError, match="comp_clean"):
        sample_dual(model, **_common(n=1), mode="extract_fg", steps=2)


def test_noise_modes():
    shared = initial_noise((2, 4, 8), "shared", torch.Generator().manual_seed(0), "cpu", torch.float32)
    assert torch.equal(shared[0], shared[1])
    comp, fg = initial_noise((2, 4, 8), "independent", torch.Generator().manual_seed(0), "cpu", torch.float32)
    one_draw = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([comp, fg]), one_draw)  # the release: one [2N, ...] draw, comp rows first


def test_callback_and_interrupt():
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(2, 16, 64, generator=gen) for _ in range(4)]
    seen = []
    sample_dual(
        StraightLineModel(*tensors),
        **_common(),
        steps=4,
        noise=tuple(tensors[2:]),
        callback=lambda i, total, state: seen.append((i, total, state.fg.shape)),
    )
    assert seen == [(i, 4, (2, 16, 64)) for i in range(4)]
    model = StraightLineModel(*tensors)
    with pytest.raises(SamplingInterrupted, match="step 2 of 4"):
        sample_dual(model, **_common(), steps=4, noise=tuple(tensors[2:]), interrupt=lambda: len(model.calls) == 2)
