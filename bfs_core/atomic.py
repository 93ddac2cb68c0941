"""Atomic file writes: every file the pack writes goes through here.

A file is written to a temporary name in the *same folder* (so the final rename never crosses a file system), flushed
and fsynced, then renamed over the target with `os.replace`. A failure half-way removes the temporary file and leaves
whatever was at the target before untouched: a good existing file is never replaced by a broken one.

    with atomic_path("scene.psd") as tmp:   # a path to write to by any library (psd-tools, PIL, safetensors)
        psd.save(tmp)

    with atomic_open("report.json", "w") as f:
        json.dump(data, f)

    atomic_dir("checkpoint-100")           # the same for a folder (written under `<name>.tmp`, then renamed)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (single-threaded then): `os.umask` can only be read by setting it, which would race with other
# threads of a server creating files.
_UMASK = _current_umask()


def _final_mode(path: Path) -> int:
    """The mode a plain `open(path, "w")` would leave: an existing file's own, else 0o666 less the umask.

    `mkstemp` creates its file 0o600; renamed as is, every saved PSD/PNG would be private to its owner.
    """
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~_UMASK


def _tmp_name(path: Path) -> Path:
    # `.<name>.<random>.tmp`: hidden, in the target's folder, never a name a user would pick.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix_like_target: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on any error it is removed.

    `suffix_like_target` keeps the target's extension at the end of the temporary name (`.x.psd.<rand>.psd`), for
    writers that pick the format from the extension (PIL's `Image.save`).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    tmp = _tmp_name(path)
    if suffix_like_target and path.suffix:
        renamed = tmp.with_name(tmp.name + path.suffix)
        os.replace(tmp, renamed)
        tmp = renamed
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` once the `with` block finished without an error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must start with 'w', got {mode!r}.")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, suffix_like_target=False) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `<path>.tmp` (emptied first) to fill; on success it replaces `path` (an old `path` is removed only then).

    A kill before the rename leaves at most `<path>.tmp`, which the next run clears; never a half-written `path`.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
