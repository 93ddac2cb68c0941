"""Φ, the latent composition UNet (appendix A.5)."""

import pytest
import torch
from accelerate import init_empty_weights

from bfs_core.models.composition_unet import PHI_CONFIG, build_composition_unet, compose_latents


def test_phi_is_exactly_the_appendix_unet():
    with init_empty_weights():
        phi = build_composition_unet()
    assert sum(p.numel() for p in phi.parameters()) == 91_333_776  # 91.33 M
    for key, value in PHI_CONFIG.items():
        assert tuple(phi.config[key]) == tuple(value) if isinstance(value, tuple) else phi.config[key] == value


def _tiny_phi():
    torch.manual_seed(0)
    return build_composition_unet(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, attention_head_dim=8, sample_size=8
    ).eval()


def test_compose_uses_both_latents_in_foreground_then_background_order():
    phi = _tiny_phi()
    gen = torch.Generator().manual_seed(0)
    z_fg, z_bg = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    with torch.no_grad():
        out = compose_latents(phi, z_fg, z_bg)
        direct = phi(torch.cat([z_fg, z_bg], 1), torch.zeros(2)).sample
        swapped = compose_latents(phi, z_bg, z_fg)
    assert out.shape == (2, 16, 8, 8) and torch.equal(out, direct)
    assert (out - swapped).abs().max() > 1e-4


def test_compose_rejects_mismatched_latents():
    phi = _tiny_phi()
    with pytest.raises(ValueError, match="same"):
        compose_latents(phi, torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 6))
    with pytest.raises(ValueError, match="16-channel"):
        compose_latents(phi, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        compose_latents(phi, torch.zeros(1, 16, 7, 8), torch.zeros(1, 16, 7, 8))
