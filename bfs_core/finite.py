"""Refuse NaN and infinity: at the entry points (a named input) and during sampling (a step and a branch).

A NaN that reaches a VAE decode comes out as a black composite or a fully transparent layer, which looks like a
result. So every public entry point checks its tensors once, and the denoise loop checks each branch once per step
(one `isfinite` reduction per branch), and both stop with an error that says which input, or which step and branch.
"""

from __future__ import annotations

import torch


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or ±inf."""


class NonFiniteSamplingError(RuntimeError):
    """A branch's latents became NaN or ±inf during sampling."""


def count_non_finite(x: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±inf count) of `x` (0, 0 for integer and boolean tensors, which cannot hold either)."""
    if not (x.is_floating_point() or x.is_complex()):
        return 0, 0
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


def check_finite(name: str, x: torch.Tensor | None, what: str = "") -> None:
    """Raise `NonFiniteInputError` naming `name` when `x` holds NaN or ±inf; None passes.

    Args:
        name: the input's name as the caller's user knows it (`background`, `mask`, `positive`, ...).
        x: the tensor.
        what: an optional description added after the name ("the foreground latent").
    """
    # meta tensors (shape-only runs, see tests/test_device_moves.py) hold no values to check.
    if x is None or not (x.is_floating_point() or x.is_complex()) or x.numel() == 0 or x.is_meta:
        return
    if bool(torch.isfinite(x).all()):
        return
    nans, infs = count_non_finite(x)
    label = f"`{name}` ({what})" if what else f"`{name}`"
    raise NonFiniteInputError(
        f"{label} contains {nans} NaN and {infs} infinite values (of {x.numel()}). BFS refuses them instead of "
        f"returning a black or transparent result: fix whatever produced `{name}` upstream (a division by zero, an "
        f"fp16 overflow, a broken file) and run again."
    )


def check_branch_finite(branch: str, x: torch.Tensor, step: int, total: int) -> None:
    """Raise `NonFiniteSamplingError` when branch `branch` (`comp` or `fg`) is not finite after step `step` (1-based).

    One reduction and one host sync per call: negligible next to a transformer forward.
    """
    if x.is_meta or bool(torch.isfinite(x).all()):
        return
    nans, infs = count_non_finite(x)
    raise NonFiniteSamplingError(
        f"Sampling produced {nans} NaN and {infs} infinite values in the `{branch}` branch at step {step} of {total}; "
        f"stopped instead of decoding a black image. This is a numerical failure of the model, not of your inputs: "
        f"try weight_dtype fp32 (or bf16 instead of fp16/fp8), a lower guidance, or check the model weights."
    )
