"""The one training loop of every trainer, and the one result type they return.

`train` is the optimiser-step loop of the accelerate trainers (Φ, BFS stage 1 and stage 2, decomposition). A trainer
sets up its data, model, optimiser and schedule, then hands `train` a `Phase`: how to fetch an encoded micro-batch and
which loss to take on it. `train` does the rest the same way for all of them, one optimiser step at a time:

- accumulate: `gradient_accumulation_steps` micro-batches, each `next_batch` (outside accelerate's `accumulate`, so no
  encoder runs under DDP's `no_sync`), then forward + backward inside it; the step's loss is the micro-batches' mean;
- clip the phase's parameters to `max_grad_norm` on the micro-batch that syncs, step the optimiser and the schedule,
  and set gradients to None (a parameter outside the step's graph keeps grad None: AdamW then skips it entirely);
- log: the progress bar, `metrics.jsonl` (`{"step", "loss" or "loss_<phase>_total", <the loss's parts>, "lr"}`), the
  loss curve every `log_steps`, the debug rank-sync record, then the trainer's `callback(step, info, model)`;
- validate every `validation_steps` (process 0 only) and checkpoint every `checkpointing_steps` and at the last step.

Stage 2 alternates phases with different trainable groups: it passes a schedule `step -> Phase`, and each phase's
`begin` switches `requires_grad` before its step's first micro-batch. The DDP side of that (which parameters DDP
registers, `find_unused_parameters`) stays in train_stage2.py, where the phases are defined.

The toy trainers (toy autoencoders, base Fill) run a plain single-process fp32 loop: `plain_train`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from bfs_core.atomic import atomic_write_text

from .common import CommonConfig, MetricsLog, check_rank_sync, derived_numbers, save_checkpoint
from .config import config_summary


logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What every trainer's `main` returns; `python -m training` prints `weights` last."""

    weights: Path  # the final weights: a file (BFS, decomposition) or a folder (Φ, the toy models)
    losses: list[float]  # loss of every optimiser step this run took, in order (for tests and the demo)
    first_step: int  # the global step the first entry of `losses` belongs to (1, or the resumed step + 1)


@dataclass
class Phase:
    """What one optimiser step trains: its micro-batches, its loss and the parameters it clips."""

    next_batch: Callable[[int, int], Any]  # (optimiser steps done, micro-batch index) -> one encoded micro-batch
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]  # micro-batch -> (loss, its parts for the log)
    params: list[torch.nn.Parameter]  # clipped to `max_grad_norm` together
    name: str | None = None  # alternating phases: logged as `loss_<name>_total`, passed to the callback as "phase"
    begin: Callable[[], object] | None = None  # called before the step's first micro-batch (stage 2: requires_grad)


def echo_config(
    accelerator: Accelerator,
    cfg: CommonConfig,
    title: str,
    dataset_sizes: dict[str, int],
    bad: list[tuple[str, str]] | None = None,
) -> None:
    """Log the resolved config with the derived numbers (processes, effective batch, steps per epoch); process 0 also
    writes it to `<output_dir>/config.yaml`, and, when `bad` is given, the skipped samples to `bad_samples.txt`."""
    summary = config_summary(cfg, derived_numbers(cfg, accelerator, dataset_sizes))
    logger.info("%s config:\n%s", title, summary)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        atomic_write_text(out / "config.yaml", summary)
        if bad is not None:
            atomic_write_text(out / "bad_samples.txt", "".join(f"{name}\t{reason}\n" for name, reason in bad))


def train(
    accelerator: Accelerator,
    cfg: CommonConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    phases: Phase | Callable[[int], Phase],
    *,
    start_step: int,
    trainables: dict[str, torch.nn.Parameter],
    stage: str,
    validate: Callable[[int], object] | None = None,
    callback: Callable[[int, dict, object], None] | None = None,
) -> list[float]:
    """Optimiser steps `start_step + 1 … cfg.max_steps`; returns their losses.

    `model`, `optimizer`, `lr_scheduler`: what `accelerator.prepare` returned. `phases`: one `Phase`, or a function of
    the 1-based step number giving that step's phase. `trainables`: name -> parameter for `debug_rank_sync`. `stage`:
    the progress bar's label and the `stage` of `trainer_state.json`. `validate(step)`: writes a sample grid.
    """
    out = Path(cfg.output_dir)
    if cfg.debug_rank_sync:
        check_rank_sync(accelerator, trainables, start_step, out)  # step 0 / the resumed step: before any update
    metrics, losses = MetricsLog(accelerator, out), []
    bar = tqdm(range(cfg.max_steps), initial=start_step, desc=stage, disable=not accelerator.is_local_main_process)
    global_step = start_step
    while global_step < cfg.max_steps:
        phase = phases if isinstance(phases, Phase) else phases(global_step + 1)
        if phase.begin is not None:
            phase.begin()
        # One optimiser step = gradient_accumulation_steps micro-batches.
        step_loss, parts = 0.0, {}
        for micro in range(cfg.gradient_accumulation_steps):
            batch = phase.next_batch(global_step, micro)
            with accelerator.accumulate(model):
                loss, parts = phase.loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(phase.params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / cfg.gradient_accumulation_steps
        global_step += 1
        losses.append(step_loss)

        named = {} if phase.name is None else {"phase": phase.name}
        bar.update(1)
        bar.set_postfix(**named, loss=f"{step_loss:.4g}")
        total_key = "loss" if phase.name is None else f"loss_{phase.name}_total"
        metrics.log(global_step, {total_key: step_loss, **parts, "lr": lr_scheduler.get_last_lr()[0]})
        if cfg.debug_rank_sync:
            check_rank_sync(accelerator, trainables, global_step, out)
        if callback is not None:
            callback(global_step, {**named, "loss": step_loss, **parts}, accelerator.unwrap_model(model))
        if global_step % cfg.log_steps == 0:
            metrics.draw()
        if validate is not None and cfg.validation_steps and global_step % cfg.validation_steps == 0:
            if accelerator.is_main_process:
                validate(global_step)
        if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_steps:
            save_checkpoint(accelerator, cfg, {"global_step": global_step, "stage": stage})
    bar.close()
    metrics.draw()
    return losses


def finish(accelerator: Accelerator, title: str, weights: Path, losses: list[float], start_step: int) -> TrainResult:
    """After process 0 has written the final `weights`: every process waits for it, then ends training."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    logger.info("%s done at step %d; weights: %s", title, start_step + len(losses), weights)
    return TrainResult(weights=weights, losses=losses, first_step=start_step + 1)


def plain_train(
    name: str,
    steps: int,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    loss_at: Callable[[int], torch.Tensor],
    max_grad_norm: float = 1.0,
    log_every: int = 100,
) -> list[float]:
    """The toy trainers' single-process loop: for step 1 … `steps`, `loss_at(step)`, backward, clip, step.

    Logs the mean loss of the last `log_every` steps every `log_every` steps and at the end; returns every loss."""
    losses, start = [], time.time()
    for step in range(1, steps + 1):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            mean, elapsed = sum(recent) / len(recent), time.time() - start
            logger.info("%s step %d/%d loss %.4f (%.0f s)", name, step, steps, mean, elapsed)
    return losses
