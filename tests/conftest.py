"""Shared tiny models for the CPU test suite (diffusers-style: tiny configs, fixed seeds)."""

import os
import socket

import pytest
import torch

from bfs_core.tiny import randomize_bfs_parameters  # noqa: F401  (re-exported for the test modules)


os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_FLUX = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)


def make_tiny_flux(seed: int = 0, dtype=torch.float32, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_FLUX, **overrides}).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def dual_inputs(n: int = 1, seed: int = 0, latent_hw=(8, 8), text_len: int = 6, width: int = 32):
    """Packed inputs for DualBranchFlux.forward at a tiny size."""
    from bfs_core.sampling.flow_match import latent_image_ids

    gen = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    length = (h // 2) * (w // 2)
    return dict(
        comp_latents=torch.randn(n, length, 64, generator=gen),
        fg_latents=torch.randn(n, length, 64, generator=gen),
        fill_cond=torch.randn(n, length, 320, generator=gen),
        prompt_embeds=torch.randn(n, text_len, width, generator=gen),
        pooled=torch.randn(n, width, generator=gen),
        timestep_comp=torch.rand(n, generator=gen),
        timestep_fg=torch.rand(n, generator=gen),
        img_ids=latent_image_ids(h, w),
    )


@pytest.fixture
def tiny_flux():
    return make_tiny_flux()


@pytest.fixture
def no_network(monkeypatch):
    """Offline tests: hub libraries told they are offline, and any socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny nets gain nothing from threads, and on a busy 2-core runner OpenMP spin-waits made them ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
