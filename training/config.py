"""Typed training configs: a `@dataclass` per trainer, filled from a YAML file and `--key=value` overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Values on the command line are parsed as YAML
scalars/flow collections (`--lr=8e-6`, `--resume=latest`, `--phi_overrides={block_out_channels: [8, 16]}`) and then
checked against the field's type, so a typo in a key or a wrong type fails at start, never mid-run.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml


logger = logging.getLogger(__name__)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) `value` against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"`{name}` must not be None.")
    if origin is typing.Literal:
        if isinstance(value, bool) and str(value) not in typing.get_args(annotation):
            value = {False: "no", True: "yes"}[value]  # YAML 1.1 reads an unquoted `no` as False
        if value not in typing.get_args(annotation):
            raise ValueError(f"`{name}` must be one of {list(typing.get_args(annotation))} but got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list but got {value!r}.")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = [_coerce(name, v, args[0]) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"`{name}` must be a mapping but got {value!r}.")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return annotation(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ValueError(f"`{name}` must be {annotation.__name__} but got {value!r} ({type(value).__name__}).")
    return value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`["--lr=1e-4", "--resume=latest"]` -> {"lr": 1e-4, "resume": "latest"}."""
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"Overrides must look like --key=value but got {arg!r}.")
        key, text = arg[2:].split("=", 1)
        out[key.replace("-", "_")] = yaml.safe_load(text) if text != "" else None
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build `cls` (a dataclass) from defaults, then the YAML file at `path`, then `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config fields but holds {type(loaded).__name__}.")
        values.update(loaded)
    values.update(overrides or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown config keys {unknown} for {cls.__name__}; known keys: {sorted(known)}.")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def config_summary(cfg, derived: dict[str, Any] | None = None) -> str:
    """The resolved config (and derived numbers) as YAML, for the start-of-run echo and `config.yaml`."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=None)
    if derived:
        text += "# derived\n" + yaml.safe_dump(derived, sort_keys=False, default_flow_style=False)
    return text
