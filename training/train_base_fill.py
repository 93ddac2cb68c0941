"""A Flux-Fill base model from scratch on composites: the toy world's stand-in for FLUX.1-Fill-dev.

    python -m training base-fill --config training/configs/toy_base_fill.yaml [--key=value ...]

BFS starts from a pretrained Fill model; none exists at toy scale, so this pretrains one with the Flux-Fill objective:
x_sigma = (1 − sigma)·z_C + sigma·noise, input [x_sigma | image latent | packed mask] (384 channels), target
v = noise − z_C (time convention: training/losses.py), guidance embedding fed `guidance`. The image condition is, per
sample, either the composite with the box region greyed out (Fill's own masked-image task) or the unmasked background
(how BFS feeds Fill: `bfs_core.pipelines.bfs`), with probability `background_condition_prob`. Latents and text
embeddings are computed once up front (64 px, all in memory), then a plain single-process fp32 loop runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bfs_core.atomic import atomic_dir
from bfs_core.sampling.flow_match import fill_condition, latent_image_ids, pack_latents

from .config import config_summary
from .data import ManifestDataset
from .loop import TrainResult, plain_train
from .losses import flow_matching_loss, noisy_latents


logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Base Fill pretraining (toy scale)."""

    data_dir: str = ""  # a `triplet` (or `pair`) dataset of real scenes: composite, background, box, caption
    vae: str = ""  # the image VAE folder (normalised latents)
    text_encoders: str = ""  # folder with tokenizer(_2)/text_encoder(_2)
    transformer_config: dict | None = None  # FluxTransformer2DModel fields; default bfs_core.toy.models.TOY_FLUX
    output_dir: str = "runs/toy_base"  # writes <output_dir>/transformer
    seed: int = 0
    resolution: int = 64
    batch_size: int = 32
    max_steps: int = 3000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    guidance: float = 30.0
    max_sequence_length: int = 16
    background_condition_prob: float = 0.5
    max_samples: int = 4000


@torch.no_grad()
def encode_dataset(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    from bfs_core.text_encoders import FluxTextEncoders

    vae = AutoencoderKL.from_pretrained(cfg.vae).eval()
    ds = ManifestDataset(cfg.data_dir, "pair", cfg.resolution)  # a triplet manifest has every `pair` field
    n = min(len(ds), cfg.max_samples)
    items = [ds[i] for i in range(n)]
    stack = {k: torch.stack([it[k] for it in items]) for k in ("composite", "background", "mask")}
    masked = stack["composite"] * (1 - stack["mask"]) + 0.5 * stack["mask"]

    def enc(x):
        z = torch.cat([vae.encode(x[i : i + 64] * 2 - 1).latent_dist.mode() for i in range(0, len(x), 64)])
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    captions = [it["caption"] for it in items]
    vocab = sorted(set(captions))
    encoders = FluxTextEncoders.from_pretrained(cfg.text_encoders, torch_dtype=torch.float32)
    embeds, pooled = encoders.encode(vocab, max_sequence_length=cfg.max_sequence_length)
    index = torch.tensor([vocab.index(c) for c in captions])
    return {
        "z_comp": enc(stack["composite"]),
        "z_bg": enc(stack["background"]),
        "z_masked": enc(masked),
        "mask": stack["mask"],
        "embeds": embeds[index],
        "pooled": pooled[index],
    }


def main(cfg: TrainConfig) -> TrainResult:
    from diffusers import FluxTransformer2DModel

    from bfs_core.toy.models import TOY_FLUX

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("base fill config:\n%s", config_summary(cfg))
    data = encode_dataset(cfg)
    n = data["z_comp"].shape[0]
    h, w = data["z_comp"].shape[-2:]
    logger.info("base fill: %d samples encoded, latent %d×%d", n, h, w)
    transformer = FluxTransformer2DModel(**(cfg.transformer_config or TOY_FLUX)).train()
    logger.info("base fill: %.2f M parameters", sum(p.numel() for p in transformer.parameters()) / 1e6)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.learning_rate, total_steps=cfg.max_steps, pct_start=cfg.warmup_steps / cfg.max_steps
    )
    img_ids = latent_image_ids(h, w)
    txt_ids = torch.zeros(data["embeds"].shape[1], 3)
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        z = pack_latents(data["z_comp"][idx])
        use_bg = (torch.rand(len(idx), generator=gen) < cfg.background_condition_prob).view(-1, 1, 1, 1)
        cond_img = torch.where(use_bg, data["z_bg"][idx], data["z_masked"][idx])
        cond = fill_condition(cond_img, data["mask"][idx])
        sigma = torch.rand(len(idx), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        x = noisy_latents(z, noise, sigma)
        v = transformer(
            hidden_states=torch.cat([x, cond], -1),
            encoder_hidden_states=data["embeds"][idx],
            pooled_projections=data["pooled"][idx],
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.full((len(idx),), cfg.guidance),
            return_dict=False,
        )[0]
        return flow_matching_loss(v, noise, z)

    losses = plain_train("base fill", cfg.max_steps, list(transformer.parameters()), opt, sched, loss_at)
    with atomic_dir(out / "transformer") as tmp:
        transformer.eval().save_pretrained(tmp)
    return TrainResult(weights=out / "transformer", losses=losses, first_step=1)
