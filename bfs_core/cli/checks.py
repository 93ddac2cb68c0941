"""Input and output checks the commands run before loading any model, each failing with a one-line `UserInputError`
that names the flag, the path and how to fix it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserInputError, open_safetensors


# Virtual file systems: nothing the pack writes belongs there (and writes there fail in odd ways, or worse succeed).
_SYSTEM_TREES = (Path("/proc"), Path("/sys"))


def check_exists(path: str | os.PathLike | None, flag: str, expected: str = "a local file or folder") -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"`{flag}` {str(path)!r} does not exist: pass {expected} (nothing is downloaded).")
    return path


def check_weights(path: str | os.PathLike | None, flag: str) -> Path | None:
    """Exists; a `.safetensors` file must have a readable header (a truncated download fails here, in milliseconds,
    not after the other models are loaded)."""
    path = check_exists(path, flag, "a local weights file or folder")
    if path is not None and path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
        with open_safetensors(path, flag) as f:
            f.metadata()
    return path


def check_image(path: str | os.PathLike, flag: str) -> tuple[int, int]:
    """The file exists and is an image Pillow reads; returns its (width, height)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"`{flag}` image {str(path)!r} does not exist: check the path.")
    if not path.is_file():
        raise UserInputError(f"`{flag}` must be an image file but {str(path)!r} is a folder: pass the file inside it.")
    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # Pillow's damaged-file errors
        reason = "the file is empty" if path.stat().st_size == 0 else " ".join(str(err).split())
        raise UserInputError(
            f"`{flag}` file {str(path)!r} is not an image Pillow can read ({reason}): pass a PNG, JPEG or WebP."
        ) from err


def load_image(path: str | os.PathLike, flag: str, mode: str) -> torch.Tensor:
    """A checked image as [1, C, H, W] float in [0, 1] (C = 1 for mode "L")."""
    check_image(path, flag)
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None]  # [H, W, C] -> [1, C, H, W]


def _check_writable_folder(folder: Path, flag: str, target: Path) -> None:
    resolved = folder.resolve()
    for tree in _SYSTEM_TREES:
        if resolved == tree or tree in resolved.parents:
            raise UserInputError(
                f"`{flag}` {str(target)!r} is inside {tree}, a system folder: write to a folder of your own."
            )
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(
            f"`{flag}` {str(target)!r} cannot be created: {str(existing)!r} is a file, not a folder. Choose another "
            "path."
        )
    try:  # a real write, not os.access: root, read-only mounts and ACLs all answer honestly this way
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".bfs-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserInputError(
            f"`{flag}` {str(target)!r} is not writable ({err.strerror} in {str(existing)!r}): choose a folder you can "
            "write to."
        ) from err


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` is (or can be created as) a folder this process can write in. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(
            f"`{flag}` must be a folder but {str(path)!r} is a file: pass a folder (it is created if needed)."
        )
    _check_writable_folder(path, flag, path)
    return path


def check_output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` can be written as a file: not a folder, the right suffix, in a writable folder. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"`{flag}` must be a file name but {str(path)!r} is a folder: add a file name.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserInputError(
            f"`{flag}` {str(path)!r} must end in {' or '.join(suffixes)} (the format is chosen by it)."
        )
    _check_writable_folder(path.parent, flag, path)
    return path


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """Create `path` for writing the results; if writing fails and the folder is new, remove it again, so a failed
    run leaves no empty or half-filled folder behind."""
    created = None  # the topmost folder this run creates
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        created = folder
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def parse_box(text: str, width: int, height: int, flag: str = "--box") -> tuple[int, int, int, int]:
    """`x0,y0,x1,y1` in pixels (x1, y1 exclusive), inside the `width`×`height` image; never silently clipped."""
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise UserInputError(f"`{flag}` must be x0,y0,x1,y1 (four integers, pixels) but got {text!r}.")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise UserInputError(f"`{flag}` {text!r} is empty or inverted: x1 must exceed x0 and y1 must exceed y0.")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise UserInputError(
            f"`{flag}` {text!r} reaches outside the {width}×{height} image: keep 0 <= x0 < x1 <= {width} and "
            f"0 <= y0 < y1 <= {height}."
        )
    return box
