"""Step caching for the two-branch transformer: First-Block-Cache on diffusers' own cache hooks.

At each step the first transformer block runs; when its output residual changed less than `threshold` since the last
fully computed step (relative mean absolute change, `|r_t − r_prev|₁ / |r_prev|₁`), the remaining blocks are skipped
and their cached residual is reused. The test is one number over the whole batch — the composite rows and the
foreground rows together — so both branches always skip or compute together and never fall out of step (they are
coupled by the joint attention in every block). This works because the BFS blocks are stock diffusers blocks (the
joint module runs in their attention processor), which diffusers' `FirstBlockCacheConfig` hooks recognise.

`threshold = 0` is exact: no hook is installed at all. The cache is installed for one sampling run and removed after
it, so no state crosses from one image to the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


# The documented speed setting (see README, "Step caching"): measured on the toy model at 50 steps.
FAST_THRESHOLD = 0.05


@dataclass
class StepCacheStats:
    """Transformer calls made during one sampling run, and how many of them ran every block."""

    calls: int = 0
    full_evaluations: int = 0


def parse_cache_threshold(value: str | float, name: str = "cache_threshold") -> float:
    """A number >= 0, or `fast` for `FAST_THRESHOLD` (the CLI's and the nodes' spelling); `name` is the input's."""
    if isinstance(value, str) and value.strip().lower() == "fast":
        return FAST_THRESHOLD
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number >= 0 or 'fast' but got {value!r}.") from None
    if not threshold >= 0 or threshold != threshold:
        raise ValueError(f"`{name}` must be a number >= 0 (0 = exact) or 'fast' but got {value!r}.")
    return threshold


def _last_block_probe(transformer: torch.nn.Module) -> torch.nn.Module:
    """A submodule of the last block that runs only when that block is really computed (skipped blocks return their
    cached output without calling it)."""
    blocks = list(getattr(transformer, "single_transformer_blocks", [])) or list(transformer.transformer_blocks)
    last = blocks[-1]
    return last.proj_out if hasattr(last, "proj_out") else last.ff


@contextlib.contextmanager
def step_cache(model, threshold: float) -> Iterator[StepCacheStats]:
    """Install First-Block-Cache on `model.transformer` (a `DualBranchFlux`, `LayerDecomposition` or the baseline)
    for the duration of the block; yields the run's `StepCacheStats`."""
    threshold = parse_cache_threshold(threshold)
    transformer = getattr(model, "transformer", None)
    stats = StepCacheStats()
    if transformer is None:
        if threshold > 0:
            raise ValueError(f"Step caching needs a diffusers Flux transformer but {type(model).__name__} has none.")
        yield stats
        return

    def count_call(*_):
        stats.calls += 1

    def count_full(*_):
        stats.full_evaluations += 1

    hooks = [transformer.register_forward_pre_hook(count_call)]
    hooks.append(_last_block_probe(transformer).register_forward_hook(count_full))
    try:
        if threshold <= 0:
            yield stats
            return
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        try:
            with transformer.cache_context("bfs"):
                yield stats
        finally:
            transformer.disable_cache()
    finally:
        for hook in hooks:
            hook.remove()
