"""The toy world's autoencoders: the 16-channel RGB "Flux VAE" stand-in and the release-format RGBA VAE.

    python -m training toy-vae --config training/configs/toy_vae.yaml [--key=value ...]

No pretrained Flux VAE exists at toy scale, so both are trained here on the toy scenes (`bfs_core.toy.world`):
- RGB: an AutoencoderKL 3 -> 16 -> 3 (×8) on composites and backgrounds, L1 + L2 reconstruction + a small KL;
- RGBA: an AutoencoderKL 4 -> 16 -> 4 on straight-alpha foreground layers, premultiplied-colour + alpha L1/L2 + KL,
  plus a soft alignment of its latent with the RGB VAE's latent of the layer over mid grey, so the foreground branch
  starts near the latent space the base Fill model knows (the release's transparency VAE shares Flux's space).
Each VAE then gets `shift_factor`/`scaling_factor` from its latent statistics on the data (normalised latents ~ unit
variance, as Flux's constants do), written into its `config.json`. Single process, fp32, the whole data set held in
memory (64 px): a plain loop, which is all these few-minute runs need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bfs_core.atomic import atomic_dir

from .config import config_summary
from .data import ManifestDataset
from .loop import TrainResult, plain_train


logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Toy autoencoder training."""

    data_dir: str = ""  # a toy `triplet` dataset (real scenes): composites/backgrounds for RGB, foregrounds for RGBA
    output_dir: str = "runs/toy_vae"  # writes <output_dir>/vae and <output_dir>/rgba_vae
    seed: int = 0
    resolution: int = 64
    batch_size: int = 32
    rgb_steps: int = 800
    rgba_steps: int = 800
    learning_rate: float = 2e-3
    kl_weight: float = 1e-5  # per-element KL (keeps the latent smooth and bounded)
    align_weight: float = 0.05  # RGBA latent ≈ RGB latent of the layer over grey (normalised units)
    max_samples: int = 2000  # images held in memory
    object_weight: float = 10.0  # loss weight 1 + object_weight·alpha: the small objects matter more than the sky
    init_dir: str | None = None  # continue from an earlier output_dir (vae/ and rgba_vae/)
    crop: int = 32  # train on random crops (multiples of 8 px: the nets are fully convolutional), 4× cheaper than 64


def _load_all(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    ds = ManifestDataset(cfg.data_dir, "triplet", cfg.resolution)
    n = min(len(ds), cfg.max_samples)
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("foreground", "background", "composite")}


def _kl(dist) -> torch.Tensor:
    return 0.5 * (dist.mean**2 + dist.var - 1.0 - dist.logvar).mean()


def _fit(vae, images: torch.Tensor, weights: torch.Tensor, steps: int, cfg: TrainConfig, loss_fn, name: str):
    """`steps` AdamW steps on random crops of `images` [N, C, H, W]; `weights` [N, 1, H, W] per-pixel loss weights."""
    if steps == 0:  # keep an `init_dir` model as it is
        return []
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        ox, oy = (int(v) * 8 for v in torch.randint(0, (images.shape[-1] - cfg.crop) // 8 + 1, (2,), generator=gen))
        x = images[idx][..., oy : oy + cfg.crop, ox : ox + cfg.crop]
        w = weights[idx][..., oy : oy + cfg.crop, ox : ox + cfg.crop]
        dist = vae.encode(x * 2 - 1).latent_dist
        z = dist.sample(generator=None)
        recon = vae.decode(z).sample
        return loss_fn(x, w, recon, dist, (idx, oy // 8, ox // 8)) + cfg.kl_weight * _kl(dist)

    vae.train()
    losses = plain_train(name, steps, list(vae.parameters()), opt, sched, loss_at)
    vae.eval()
    return losses


@torch.no_grad()
def _latent_stats(vae, images: torch.Tensor) -> tuple[float, float]:
    z = torch.cat([vae.encode(images[i : i + 64] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 64)])
    return z.mean().item(), 1.0 / z.std().item()


def main(cfg: TrainConfig) -> TrainResult:
    from diffusers import AutoencoderKL

    from bfs_core.toy.models import toy_vae

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("toy autoencoders config:\n%s", config_summary(cfg))
    data = _load_all(cfg)
    rgb_images = torch.cat([data["composite"], data["background"]])
    logger.info("toy autoencoders: %d RGB images, %d RGBA layers", len(rgb_images), len(data["foreground"]))

    def rgb_loss(x, w, recon, dist, where):
        err = recon - (x * 2 - 1)
        return (w * (err.abs() + err**2)).mean()

    init = Path(cfg.init_dir) if cfg.init_dir else None
    rgb = AutoencoderKL.from_pretrained(init / "vae") if init else toy_vae(3, cfg.seed)
    fg_alpha = data["foreground"][:, 3:]
    rgb_weights = 1 + cfg.object_weight * torch.cat([fg_alpha, torch.zeros_like(fg_alpha)])
    losses = _fit(rgb, rgb_images, rgb_weights, cfg.rgb_steps, cfg, rgb_loss, "rgb vae")
    shift, scale = _latent_stats(rgb, rgb_images)
    rgb.register_to_config(shift_factor=shift, scaling_factor=scale)
    with atomic_dir(out / "vae") as tmp:
        rgb.save_pretrained(tmp)

    fg = data["foreground"]
    with torch.no_grad():  # the alignment target: the RGB latent of the layer over mid grey (normalised)
        grey = fg[:, :3] * fg[:, 3:] + 0.5 * (1 - fg[:, 3:])
        target = torch.cat([rgb.encode(grey[i : i + 64] * 2 - 1).latent_dist.mode() for i in range(0, len(fg), 64)])
        target = (target - shift) * scale

    def rgba_loss(x, w, recon, dist, where):
        r = (recon + 1) / 2
        a = x[:, 3:]
        pre, pre_hat = x[:, :3] * a, r[:, :3].clamp(0, 1) * r[:, 3:].clamp(0, 1)
        colour = (w * a * ((r[:, :3] - x[:, :3]).abs() + (r[:, :3] - x[:, :3]) ** 2)).mean()  # straight colour
        err = (w * (pre_hat - pre).abs()).mean() + 2 * (w * (r[:, 3:] - a).abs()).mean() + colour
        idx, ly, lx = where
        h, w = dist.mean.shape[-2:]
        align = (((dist.mean - shift) * scale - target[idx][..., ly : ly + h, lx : lx + w]) ** 2).mean()
        return err + cfg.align_weight * align

    rgba = AutoencoderKL.from_pretrained(init / "rgba_vae") if init else toy_vae(4, cfg.seed + 1)
    losses += _fit(rgba, fg, 1 + cfg.object_weight * fg[:, 3:], cfg.rgba_steps, cfg, rgba_loss, "rgba vae")
    # The same normalisation as the RGB VAE: the alignment above is measured in that space.
    rgba.register_to_config(shift_factor=shift, scaling_factor=scale)
    with atomic_dir(out / "rgba_vae") as tmp:
        rgba.save_pretrained(tmp)
    logger.info("toy autoencoders written to %s (shift %.4f, scale %.4f)", out, shift, scale)
    return TrainResult(weights=out, losses=losses, first_step=1)
