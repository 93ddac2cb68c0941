"""User-input errors, and the one way the pack opens weight files so that every read failure names file and input.

`UserInputError` is a `ValueError` (the pack's convention for bad input) that the CLI prints as one line with exit
code 2, and ComfyUI shows as the node's error. Every loader reads weights through `open_safetensors` /
`read_safetensors` / `load_torch_tensors`, and wraps library folder loaders (`from_pretrained`) in
`reading_folder`: a truncated download, random bytes, an empty file or a PNG renamed `.safetensors` then reads
"`bfs_weights` file X is not a complete safetensors file (incomplete metadata): re-download it" instead of
`SafetensorError: incomplete metadata`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class UserInputError(ValueError):
    """Something the user supplied is wrong; the message names the input, what was expected and how to fix it."""


# Leading bytes of files that are often handed to a weights loader by mistake.
_SIGNATURES = (
    (b"\x89PNG", "it is a PNG image"),
    (b"\xff\xd8\xff", "it is a JPEG image"),
    (b"GIF8", "it is a GIF image"),
    (b"PK\x03\x04", "it is a zip archive, e.g. a PyTorch .pt/.pth file"),
    (b"version https://git-lfs", "it is a Git LFS pointer, not the weights (run `git lfs pull`)"),
    (b"<!doctype", "it is an HTML page (a failed download?)"),
    (b"<html", "it is an HTML page (a failed download?)"),
    (b"{", "it is a JSON text file"),
)


def sniff_file(path: str | os.PathLike) -> str | None:
    """A short phrase for what a wrong weights file actually is (empty, an image, HTML, ...), or None."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    if len(head) > 8 and head[8:9] == b"{":  # a safetensors header (u64 length, then JSON): the right kind of file
        return None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return "it is a Python pickle, e.g. an old PyTorch .pt/.pth file"
    lowered = head.lstrip().lower()
    for signature, phrase in _SIGNATURES:
        if head.startswith(signature) or lowered.startswith(signature):
            return phrase
    return None


def check_file(path: str | os.PathLike, name: str, expected: str = "a weights file") -> Path:
    """`path` must be an existing regular file; `name` is the input as the user knows it (`--bfs`, `bfs_weights`)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"`{name}` file {str(path)!r} does not exist: pass {expected} that is on this machine.")
    if not path.is_file():
        raise UserInputError(f"`{name}` must be {expected} but {str(path)!r} is a folder: pass the file inside it.")
    return path


# safetensors before 0.5 names its header errors by their Rust variant; later releases say them in words.
_OLD_SAFETENSORS_REASONS = {
    "MetadataIncompleteBuffer": "incomplete metadata, file not fully covered",
    "InvalidHeaderLength": "invalid header length",
    "HeaderTooSmall": "header too small",
    "HeaderTooLarge": "header too large",
    "InvalidHeaderDeserialization": "invalid JSON in header",
}


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.removeprefix("Error while deserializing header: ")
    return _OLD_SAFETENSORS_REASONS.get(text, text)


def not_safetensors_error(path: str | os.PathLike, name: str, err: BaseException) -> UserInputError:
    reason = sniff_file(path) or _reason(err)
    return UserInputError(
        f"`{name}` file {str(path)!r} is not a complete safetensors file ({reason}): re-download it, or pass the "
        "right file."
    )


@contextmanager
def open_safetensors(path: str | os.PathLike, name: str, device: str = "cpu") -> Iterator:
    """`safe_open(path)` whose failures (truncated, corrupt, not safetensors at all) name the file and the input."""
    path = check_file(path, name, "a .safetensors file")
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise not_safetensors_error(path, name, err) from err
    with handle as f:
        try:
            yield f
        except SafetensorError as err:
            raise not_safetensors_error(path, name, err) from err


def read_safetensors(path: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata or {}) of a safetensors file, with `open_safetensors`' messages."""
    with open_safetensors(path, name) as f:
        metadata = dict(f.metadata() or {})
        return {key: f.get_tensor(key) for key in f.keys()}, metadata


def _not_torch_file_error(path: Path, name: str, err: BaseException) -> UserInputError:
    phrase = sniff_file(path)
    if phrase is None or "PyTorch" in phrase:  # the right kind of file, but damaged
        phrase = f"damaged or incomplete: {_reason(err).split('. ')[0][:200]}"
    return UserInputError(
        f"`{name}` file {str(path)!r} is not a readable PyTorch weights file ({phrase}): re-download it."
    )


def load_torch_tensors(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """A `.pt`/`.pth` dict of tensors through `torch.load(weights_only=True)` (never unpickles code).

    A `{"state_dict": {...}}` wrapper is unwrapped. A refused pickle, a corrupt file and a non-tensor dict each get
    a message naming the file and the input.
    """
    path = check_file(path, name, "a .pt/.pth file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise UserInputError(
                f"`{name}` file {str(path)!r} holds pickled Python objects besides tensors, which this pack refuses "
                "to load (unpickling can run code; torch.load(weights_only=True)). Re-save it as a plain dict of "
                "tensors or as .safetensors with a tool you trust."
            ) from err
        raise _not_torch_file_error(path, name, err) from err
    except Exception as err:  # torch.load raises RuntimeError, EOFError, SafetensorError, ... for damaged files
        raise _not_torch_file_error(path, name, err) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(
            f"`{name}` file {str(path)!r} must hold a dict of tensors but holds {type(obj).__name__}: pass the "
            "model's weights file."
        )
    return dict(obj)


@contextmanager
def reading_folder(path: str | os.PathLike, name: str, expected: str) -> Iterator[None]:
    """Wrap a library folder loader (`AutoencoderKL.from_pretrained`, transformers) so a missing config, a broken
    config.json or a truncated weights file inside the folder names the folder, the input and what was expected."""
    try:
        yield
    except UserInputError:
        raise
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError, KeyError) as err:
        raise UserInputError(
            f"`{name}` {str(path)!r} could not be read as {expected} ({_reason(err)[:300]}): check that it is that "
            "folder and re-download any incomplete file in it."
        ) from err


__all__ = [
    "UserInputError",
    "check_file",
    "load_torch_tensors",
    "open_safetensors",
    "read_safetensors",
    "reading_folder",
    "sniff_file",
]
