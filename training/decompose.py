"""Extension point: the Outpaint-and-Remove decomposition trainer (`python -m training decompose`).

The model does not exist in this pack yet. When it arrives, this module follows the other trainers: a `TrainConfig`
dataclass (subclass `training.common.CommonConfig`), `main(cfg) -> TrainResult` with `.weights`, a YAML in
training/configs/, and its training-set builder beside `synth_data.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import CommonConfig


MESSAGE = "`decompose` is not available yet: it arrives with the Outpaint-and-Remove model."


@dataclass
class TrainConfig(CommonConfig):
    """Placeholder so `--config` files and overrides are already parsed the same way."""

    data_dir: str = ""


def main(cfg: TrainConfig):
    raise NotImplementedError(MESSAGE)
