"""Offloading the BFS transformer between the CPU and the compute device with diffusers' and accelerate's hooks (no
hand-written weight mover).

Modes (`Offload`):
- `none`: the whole model stays on the compute device. Weights on the device: all of them.
- `model`: accelerate's `cpu_offload_with_hook` (what diffusers' `enable_model_cpu_offload` installs per pipeline
  component): the weights live on the CPU, the whole model moves to the device at its first forward and stays there
  until `offload_now` (called after the denoise loop). The peak is the same as `none`; the device is free for the
  text encoders, VAE and other models between runs. Costs one model copy over PCIe per run.
- `block`: diffusers' group offloading at block level, one transformer block per group
  (`apply_group_offloading(offload_type="block_level", num_blocks_per_group=1)`), with a CUDA stream on CUDA so the
  next block is copied while the current one computes (from pinned CPU memory). On the device: the embedders and
  final layer during a forward, the current and the prefetched block, and the activations. Costs every weight over
  PCIe once per transformer call (BFS: one call per step for both branches), hidden behind compute when the stream
  keeps up.

The mode is recorded on the transformer (`offload_mode`, `execution_device`), so callers know where inputs go even
while the weights sit on the CPU.
"""

from __future__ import annotations

import logging
from enum import Enum

import torch


logger = logging.getLogger(__name__)

_STATE = "_bfs_offload"  # attribute on the transformer: {"mode", "device", "hook"}
# The hook names diffusers' group offloading registers (diffusers.hooks.group_offloading).
_GROUP_OFFLOADING_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


class Offload(str, Enum):
    NONE = "none"
    MODEL = "model"
    BLOCK = "block"


def parse_offload(value: str | Offload, name: str = "offload") -> Offload:
    try:
        return Offload(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in Offload)
        raise ValueError(f"`{name}` must be one of {options} but got {value!r}.") from None


def offload_mode(transformer: torch.nn.Module) -> Offload:
    state = getattr(transformer, _STATE, None)
    return Offload.NONE if state is None else state["mode"]


def execution_device(transformer: torch.nn.Module) -> torch.device:
    """Where the transformer computes: its onload device when offloaded, else where its weights are."""
    state = getattr(transformer, _STATE, None)
    if state is not None:
        return state["device"]
    return next(transformer.parameters()).device


def apply_offload(
    transformer: torch.nn.Module,
    mode: str | Offload,
    device: str | torch.device,
    *,
    offload_device: str | torch.device = "cpu",
    use_stream: bool | None = None,
) -> None:
    """Install offloading `mode` on `transformer` (a diffusers FluxTransformer2DModel, patched for BFS or not).

    Args:
        mode: `none` (move everything to `device`), `model` or `block` (see the module docstring).
        device: the compute (onload) device. `cpu` is allowed for every mode: the hooks then move nothing, which is
            what the CPU tests use to check the outputs are unchanged.
        offload_device: where offloaded weights live.
        use_stream: block mode: copy the next block on a side stream. Default: on CUDA only (diffusers refuses
            streams for a CPU onload device).
    """
    mode = parse_offload(mode)
    device, offload_device = torch.device(device), torch.device(offload_device)
    if getattr(transformer, _STATE, None) is not None:
        remove_offload(transformer)
    hook = None
    if mode == Offload.NONE:
        transformer.to(device)
    elif mode == Offload.MODEL:
        from accelerate import cpu_offload_with_hook

        transformer.to(offload_device)
        _, hook = cpu_offload_with_hook(transformer, execution_device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        if group_offloading_needs_an_accelerator():
            import diffusers

            raise ValueError(
                f"`offload` 'block' cannot run on this machine: it has no GPU, and the group offloading of diffusers "
                f"{diffusers.__version__} needs one (newer diffusers run it on the CPU). On a CPU, block offloading "
                "saves nothing: use 'none'."
            )
        stream = device.type == "cuda" if use_stream is None else use_stream
        transformer.to(offload_device)
        apply_group_offloading(
            transformer,
            onload_device=device,
            offload_device=offload_device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
        )
    setattr(transformer, _STATE, {"mode": mode, "device": device, "hook": hook})
    logger.info("Offloading %s: computing on %s, weights kept on %s", mode.value, device, offload_device)


def group_offloading_needs_an_accelerator() -> bool:
    """True where diffusers' group offloading cannot be set up: no accelerator and a diffusers (0.35 at the low end
    of the range) whose `ModuleGroup` reads `torch.accelerator.current_accelerator().type` unconditionally."""
    import inspect

    from diffusers.hooks.group_offloading import ModuleGroup

    if hasattr(torch, "accelerator") and torch.accelerator.current_accelerator() is not None:
        return False
    return "current_accelerator().type" in inspect.getsource(ModuleGroup.__init__)


def offload_now(transformer: torch.nn.Module) -> None:
    """Give the device back after a run: `model` mode moves the whole model to the CPU (the next forward brings it
    back); `block` mode already holds nothing between calls; `none` keeps its weights where they are."""
    state = getattr(transformer, _STATE, None)
    if state is not None and state["hook"] is not None:
        state["hook"].offload()


def remove_offload(transformer: torch.nn.Module) -> None:
    """Remove the hooks `apply_offload` installed; the weights stay where they are (the offload device)."""
    state = getattr(transformer, _STATE, None)
    if state is None:
        return
    if state["mode"] == Offload.MODEL:
        from accelerate.hooks import remove_hook_from_module

        state["hook"].offload()
        remove_hook_from_module(transformer)
    elif state["mode"] == Offload.BLOCK:
        from diffusers.hooks import HookRegistry

        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in list(registry.hooks):
                    if name in _GROUP_OFFLOADING_HOOKS:
                        registry.remove_hook(name, recurse=False)
    delattr(transformer, _STATE)


def _block_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def device_weight_bytes(transformer: torch.nn.Module, mode: str | Offload) -> int:
    """The weight bytes `mode` puts on the compute device at its peak (what a memory manager must free first):
    all of them for `none` and `model`; for `block` everything outside the blocks plus the two largest blocks (the
    current one and the prefetched next one)."""
    mode = parse_offload(mode)
    total = _block_bytes(transformer)
    if mode != Offload.BLOCK:
        return total
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    sizes = sorted((_block_bytes(b) for b in blocks), reverse=True)
    return total - sum(sizes) + sum(sizes[:2])
