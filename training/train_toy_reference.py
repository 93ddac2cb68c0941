"""The toy reference encoder (bfs_core/toy/reference.py): a picture of the object steers the frozen toy BFS.

    python -m training toy-reference --config training/configs/toy_reference.yaml [--key=value ...]
    python scripts/train_toy_reference.py            # the same, into bfs_core/toy/weights/reference

The paper's reference-guided synthesis (§5, Fig. 6a) substitutes the caption embedding by a Flux Redux embedding of a
reference image. At toy scale there is no Redux, so one is trained here the way Redux meets BFS: the toy BFS (base
Fill + stage 1 + stage 2 weights) stays frozen, and only the vision encoder and the Redux-style projection learn, from
the BFS flow loss (eq. 5 on both branches, shared noise as the paper preset) on toy scenes whose caption is never
shown. Each sample's reference is a render of its object in another scene (another background, sun, box size and
place). Its tokens reach the transformer the two ways the pack offers (`bfs_core.conditioning.ReferenceMode`):
- replace (the paper): the reference tokens are the only text tokens;
- append (ComfyUI's StyleModelApply): the neutral caption's tokens ("an object"), then the reference tokens.
The pooled vector is always the neutral caption's (Redux leaves it alone). Single process, fp32, the scenes held in
memory: a plain loop (`training.loop.plain_train`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bfs_core.conditioning import ReferenceMode, join_reference
from bfs_core.sampling.flow_match import fill_condition, latent_image_ids, pack_latents

from .config import config_summary
from .loop import TrainResult, plain_train
from .losses import flow_matching_loss, noisy_latents


logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Toy reference encoder training."""

    output_dir: str = "runs/toy_reference"  # writes <output_dir>/reference/{vision,redux}
    weights: str | None = None  # the toy model folder (default: the shipped bfs_core/toy/weights)
    seed: int = 0  # scenes are drawn from seed + 1000 (the toy BFS's training data is seed 0, evaluation 12345)
    scenes: int = 2400  # target scenes held in memory (colour, shape, background, box drawn at random)
    references_per_class: int = 48  # reference renders per (colour, shape), paired with targets at random
    batch_size: int = 16
    max_steps: int = 700
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    replace_fraction: float = 0.5  # share of samples conditioned in replace mode (the rest: append)
    guidance: float = 30.0  # the toy BFS's distilled guidance (as at sampling)
    sigma_min: float = 0.02  # sigma ~ U(sigma_min, 1): the flow loss over the whole schedule
    threads: int = 1
    log_every: int = 50


@dataclass
class ReferenceData:
    """Everything a step needs, encoded once: target latents (packed), fill conditions, classes and references."""

    comp: torch.Tensor  # [N, L, 64] packed composite latents
    fg: torch.Tensor  # [N, L, 64] packed foreground latents (RGBA encoder)
    fill_cond: torch.Tensor  # [N, L, 320] background + box mask
    label: torch.Tensor  # [N] class index (colour, shape)
    references: torch.Tensor  # [classes, R, 3, 64, 64] reference images in [0, 1]
    img_ids: torch.Tensor  # [L, 3]


def _classes() -> list[tuple[str, str]]:
    from bfs_core.toy.world import COLOURS, SHAPES

    return [(c, s) for c in COLOURS for s in SHAPES]


@torch.no_grad()
def build_data(cfg: TrainConfig, pipe, rgba) -> ReferenceData:
    from bfs_core.toy.evaluate import box_masks, to_tensor
    from bfs_core.toy.reference import reference_scene
    from bfs_core.toy.world import make_scene

    rng = np.random.default_rng(cfg.seed + 1000)
    classes = _classes()
    scenes = [make_scene(rng) for _ in range(cfg.scenes)]
    label = torch.tensor([classes.index((s.colour, s.shape)) for s in scenes])
    refs = [
        to_tensor([reference_scene(rng, c, s).composite for _ in range(cfg.references_per_class)]) for c, s in classes
    ]
    comp, fg, cond = [], [], []
    for i in range(0, len(scenes), 64):
        chunk = scenes[i : i + 64]
        z_bg = pipe.encode_images(to_tensor([s.background for s in chunk]))
        comp.append(pack_latents(pipe.encode_images(to_tensor([s.composite for s in chunk]))))
        fg.append(pack_latents(rgba.encode(to_tensor([s.foreground for s in chunk]))))
        cond.append(fill_condition(z_bg, box_masks(chunk)))
    h, w = z_bg.shape[-2:]
    return ReferenceData(
        comp=torch.cat(comp),
        fg=torch.cat(fg),
        fill_cond=torch.cat(cond),
        label=label,
        references=torch.stack(refs),
        img_ids=latent_image_ids(h, w),
    )


def reference_loss(model, encoder, data: ReferenceData, neutral, cfg: TrainConfig, gen: torch.Generator):
    """The BFS flow loss (eq. 5, both branches) of one batch conditioned on references instead of captions."""
    n = cfg.batch_size
    idx = torch.randint(0, data.comp.shape[0], (n,), generator=gen)
    pick = torch.randint(0, data.references.shape[1], (n,), generator=gen)
    tokens = encoder(data.references[data.label[idx], pick])  # [n, 16, 32]
    caption, pooled = neutral
    sigma = cfg.sigma_min + (1 - cfg.sigma_min) * torch.rand(n, generator=gen)
    comp, fg = data.comp[idx], data.fg[idx]
    noise = torch.randn(comp.shape, generator=gen)  # shared noise for both branches (the paper preset)
    x_comp, x_fg = noisy_latents(comp, noise, sigma), noisy_latents(fg, noise, sigma)
    # The first `split` rows in replace mode, the rest in append mode: one transformer call per mode (their token
    # counts differ, and joint attention weighs text against image tokens, so neither can be padded into the other).
    split = int(round(n * cfg.replace_fraction))
    v_comp, v_fg = [], []
    for rows, mode in ((slice(0, split), ReferenceMode.REPLACE), (slice(split, n), ReferenceMode.APPEND)):
        if rows.start == rows.stop:
            continue
        embeds = join_reference(caption.expand(rows.stop - rows.start, -1, -1), tokens[rows], mode)
        vc, vf = model(
            x_comp[rows],
            x_fg[rows],
            data.fill_cond[idx[rows]],
            embeds,
            pooled.expand(embeds.shape[0], -1),
            sigma[rows],
            sigma[rows],
            data.img_ids,
            cfg.guidance,
        )
        v_comp.append(vc)
        v_fg.append(vf)
    v_comp, v_fg = torch.cat(v_comp), torch.cat(v_fg)
    return flow_matching_loss(v_comp, noise, comp) + flow_matching_loss(v_fg, noise, fg)


def main(cfg: TrainConfig) -> TrainResult:
    from bfs_core.toy.models import MAX_SEQUENCE_LENGTH, load_toy
    from bfs_core.toy.reference import NEUTRAL_PROMPT, ToyReduxProjection, ToyReferenceEncoder, ToyVisionEncoder

    if cfg.max_steps < 3:  # the one-cycle schedule needs a warm-up step and a decay step
        raise ValueError(f"`max_steps` must be at least 3 but got {cfg.max_steps}.")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("toy reference config:\n%s", config_summary(cfg))
    start = time.time()
    pipe, rgba = load_toy(cfg.weights)
    model = pipe.model.eval().requires_grad_(False)  # the toy BFS is frozen: only the reference encoder learns
    data = build_data(cfg, pipe, rgba)
    with torch.no_grad():
        neutral = pipe.text_encoders.encode([NEUTRAL_PROMPT], max_sequence_length=MAX_SEQUENCE_LENGTH)
    logger.info(
        "toy reference: %d scenes, %d x %d references, data in %.0f s",
        len(data.label),
        *data.references.shape[:2],
        time.time() - start,
    )

    encoder = ToyReferenceEncoder(ToyVisionEncoder(), ToyReduxProjection()).train()
    params = list(encoder.parameters())
    logger.info("trainable: %.3f M parameters", sum(p.numel() for p in params) / 1e6)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.learning_rate,
        total_steps=cfg.max_steps,
        pct_start=min(0.5, max(cfg.warmup_steps, 2) / cfg.max_steps),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = plain_train(
        "toy reference",
        cfg.max_steps,
        params,
        opt,
        sched,
        lambda _step: reference_loss(model, encoder, data, neutral, cfg, gen),
        log_every=cfg.log_every,
    )
    encoder.eval()
    folder = encoder.save(out / "reference")
    logger.info("toy reference encoder written to %s (%.0f s)", folder, time.time() - start)
    return TrainResult(weights=folder, losses=losses, first_step=1)
