"""Every BFS training loss, written out in full, and the one place `training/` states its time convention.

Time convention: exactly the scheduler's, as stated in `bfs_core.sampling.flow_match` — sigma = 1 is pure noise and
sigma = 0 is clean data; x_sigma = (1 − sigma)·x0 + sigma·noise; the model predicts v = noise − x0; the transformer
receives sigma. The paper's eq. 5 t is 1 − sigma (t = 1 is data, v* = z1 − z0 = data − noise: the same flow with
the opposite sign of v). Its eq. 9 "timestep 0 for the composite branch" is a timestep in Flux's sense, not eq. 5's t:
the paper feeds "the clean composite latent (without adding noise)", i.e. sigma = 0 here. Consequently the one-step
clean estimate is x̂0 = x_sigma − sigma·v̂.

Norms are means over elements (then over the batch), as diffusers' trainers compute ‖·‖²; the relative weights of the
paper (0.1 · L_comp) are kept.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from bfs_core.models.composition_unet import compose_latents
from bfs_core.sampling.flow_match import unpack_latents


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 − sigma)·x0 + sigma·noise; sigma [N] broadcasts over the remaining dims."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def one_step_estimate(x_sigma: torch.Tensor, v_pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_sigma − sigma·v̂ (exact when v̂ = noise − x0)."""
    s = sigma.view(-1, *([1] * (x_sigma.ndim - 1))).to(v_pred.dtype)
    return x_sigma - s * v_pred


def flow_matching_loss(
    v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, weighting: torch.Tensor | None = None
) -> torch.Tensor:
    """E[w(sigma)·‖(noise − x0) − v̂‖²]: the target velocity is v* = noise − x0 (our sign; the paper's z1 − z0)."""
    target = noise - x0
    err = (v_pred.float() - target.float()) ** 2  # [N, ...]
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)  # [N]
    if weighting is not None:
        per_sample = per_sample * weighting.float().reshape(-1)
    return per_sample.mean()


def composition_loss(
    phi: UNet2DModel, z_fg_hat: torch.Tensor, z_bg: torch.Tensor, z_comp_hat: torch.Tensor
) -> torch.Tensor:
    """Eq. 6: L_comp = ‖Φ(ẑ_F, z_B) − ẑ_C‖₁ on unpacked latents [N, 16, h, w] (Φ frozen, gradients flow through)."""
    composed = compose_latents(phi, z_fg_hat, z_bg)
    return (composed.float() - z_comp_hat.float()).abs().mean()


def phi_loss(phi: UNet2DModel, z_fg: torch.Tensor, z_bg: torch.Tensor, z_comp: torch.Tensor) -> torch.Tensor:
    """Eq. 16: ‖z_C − Φ(z_B, z_F)‖² (Φ's input order is [z_F, z_B], see `compose_latents`)."""
    return ((z_comp.float() - compose_latents(phi, z_fg, z_bg).float()) ** 2).mean()


def packed_composition_loss(
    phi: UNet2DModel, fg_hat: torch.Tensor, z_bg: torch.Tensor, comp_hat: torch.Tensor
) -> torch.Tensor:
    """L_comp with the branch estimates still packed [N, L, 64]; z_bg is unpacked [N, 16, h, w]."""
    h, w = z_bg.shape[-2:]
    return composition_loss(phi, unpack_latents(fg_hat, h, w), z_bg, unpack_latents(comp_hat, h, w))
