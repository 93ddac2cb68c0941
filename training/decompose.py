"""`python -m training decompose`: kept as an import path; the trainer is `training/train_decompose.py`."""

from __future__ import annotations

from .train_decompose import TrainConfig, TrainResult, main


__all__ = ["TrainConfig", "TrainResult", "main"]
