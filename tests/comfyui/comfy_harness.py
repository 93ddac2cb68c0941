"""Start and stop a real ComfyUI server for the tests, and lay out its model folders (stdlib only).

`conftest.py` wraps this in session fixtures; it also works on its own, e.g. for poking at the server by hand:

    python -c "import comfy_harness as h, pathlib; s = h.start_server(pathlib.Path('/tmp/b')); print(s.url)"
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK_FOLDER = "comfyui-bfs-layers"
PACK_DIR = Path(os.environ.get("BFS_COMFY_PACK_DIR", REPO))  # what custom_nodes/<PACK_FOLDER> links to
# Folders created under models/ (ComfyUI's own names plus the pack's `bfs` and `rgba_vae`).
MODEL_FOLDERS = ("diffusion_models", "diffusers", "bfs", "vae", "rgba_vae", "text_encoders", "loras", "checkpoints")
# `python -m bfs_core make-tiny` role -> (models subfolder, name there; None keeps the written name).
TINY_MODEL_LAYOUT: dict[str, tuple[str, str | None]] = {
    "diffusers": ("diffusers", "flux-fill-tiny"),
    "text_encoders": ("diffusers", "flux-fill-tiny"),  # the same folder as `diffusers`
    "vae": ("vae", "flux-fill-tiny-vae"),
    "bfl_bf16": ("diffusion_models", None),
    "bfl_fp8": ("diffusion_models", None),
    "bfl_fp8_scaled": ("diffusion_models", None),
    "bfl_fp8_comfy_quant": ("diffusion_models", None),
    "bfl_non_fill": ("diffusion_models", None),
    "bfs_official_pt": ("bfs", None),
    "bfs_release": ("bfs", None),
    "bfs_paper": ("bfs", None),
    "decomposition": ("bfs", None),
    "rgba_bfs_release_folder": ("bfs", None),  # Load RGBA VAE reads models/bfs
    "rgba_bfs_release_single": ("bfs", None),
    "rgba_layerdiffuse_pth": ("bfs", None),
    "rgba_layerdiffuse_safetensors": ("bfs", None),
}
UNSORTED_TINY_FOLDER = "tiny_unsorted"  # make-tiny roles missing from TINY_MODEL_LAYOUT land here


class HarnessError(RuntimeError):
    """The server could not be started, or our pack did not import into it."""


@dataclass
class TinyModel:
    """One file or folder of the tiny set: `name` is what a ComfyUI combo for `folder` lists."""

    role: str
    folder: str
    name: str
    path: Path


@dataclass
class ComfyServer:
    """A running server. `startup_s`: seconds from process start until /system_stats answered."""

    url: str
    port: int
    process: subprocess.Popen
    base_dir: Path
    models_dir: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    log_path: Path
    startup_s: float = 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)


def comfy_paths() -> tuple[Path, Path]:
    """(ComfyUI directory, its venv's python) from BFS_COMFY_DIR / BFS_COMFY_PYTHON / BFS_COMFY_ROOT."""
    root = Path(os.environ.get("BFS_COMFY_ROOT", Path.home() / ".cache" / "bfs-comfyui"))
    comfy_dir = Path(os.environ.get("BFS_COMFY_DIR", root / "ComfyUI"))
    python = Path(os.environ.get("BFS_COMFY_PYTHON", root / "venv" / "bin" / "python"))
    return comfy_dir, python


def prepare_base_dir(base: Path) -> Path:
    """Create the --base-directory layout: custom_nodes/ (our pack linked in), models/<MODEL_FOLDERS>, i/o dirs."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.is_symlink():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return base


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 15 s; every wait is bounded."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def pack_import_problems(log: str) -> list[str]:
    """Lines of the log saying our pack failed to import, or a note that it was not loaded at all."""
    failed = [line.strip() for line in log.splitlines() if "(IMPORT FAILED)" in line and PACK_FOLDER in line]
    loaded = re.search(rf"^\s*[\d.]+ seconds: .*custom_nodes[/\\]{re.escape(PACK_FOLDER)}\s*$", log, re.M)
    if not failed and not loaded:
        failed.append(f"custom node folder {PACK_FOLDER} missing from 'Import times for custom nodes'")
    return failed


def pack_import_traceback(log: str) -> str:
    """The traceback ComfyUI logged for our pack (from "Traceback" to "Cannot import .../<pack> ..."), or ""."""
    lines = log.splitlines()
    for end in range(len(lines) - 1, -1, -1):
        if lines[end].startswith("Cannot import") and PACK_FOLDER in lines[end]:
            start = max((i for i in range(end) if lines[i].startswith("Traceback")), default=end)
            return "\n".join(lines[start : end + 1])
    return ""


def start_server(base: Path, timeout: float = 300.0, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start ComfyUI on 127.0.0.1:<free port> with --cpu, --base-directory `base`, an in-memory database.

    Returns once `GET /system_stats` answers. Raises HarnessError (after stopping the process) when it exits, does
    not answer within `timeout` seconds, or its log shows our pack failed to import.
    """
    comfy_dir, python = comfy_paths()
    if not (comfy_dir / "main.py").is_file() or not python.exists():
        raise HarnessError(f"no ComfyUI at {comfy_dir} / {python}: run scripts/comfyui_env.sh first")
    prepare_base_dir(base)
    port = free_port()
    log_path = base / "server.log"
    cmd = [
        str(python),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--disable-api-nodes",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        *extra_args,
    ]
    # BFS_TEST_NODES registers the pack's test-only CONDITIONING node (tiny text encoders don't fit ComfyUI's loaders)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["BFS_TEST_NODES"] = "1"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=comfy_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stopping it takes anything ComfyUI spawned along
        )
    server = ComfyServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        process=proc,
        base_dir=base,
        models_dir=base / "models",
        input_dir=base / "input",
        output_dir=base / "output",
        temp_dir=base / "temp",
        log_path=log_path,
    )
    try:
        while True:
            if not server.alive():
                raise HarnessError(f"ComfyUI exited with {proc.returncode} during startup:\n{server.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise HarnessError(f"ComfyUI not up after {timeout:.0f} s:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.url + "/system_stats", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        server.startup_s = time.monotonic() - t0
        problems = pack_import_problems(server.log_text())
        if problems:
            details = pack_import_traceback(server.log_text()) or server.log_tail(80)
            raise HarnessError(f"{PACK_FOLDER} did not import into ComfyUI: {problems}\n--- server log ---\n{details}")
    except BaseException:
        stop_process(proc)
        raise
    return server


def write_tiny_models(models_dir: Path) -> dict[str, TinyModel]:
    """Run `python -m bfs_core make-tiny` and copy its files into the model folders of TINY_MODEL_LAYOUT."""
    scratch = models_dir.parent / "make_tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "bfs_core", "make-tiny", str(scratch)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise HarnessError(f"make-tiny failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    written: dict[Path, Path] = {}
    models: dict[str, TinyModel] = {}
    for line in proc.stdout.splitlines():
        role, sep, src = line.partition(": ")
        if not sep or not Path(src).exists():
            continue
        folder, name = TINY_MODEL_LAYOUT.get(role, (UNSORTED_TINY_FOLDER, None))
        src_path = Path(src)
        dest = written.get(src_path) or models_dir / folder / (name or src_path.name)
        if src_path not in written:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src_path.is_dir():
                shutil.copytree(src_path, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(src_path, dest)
            written[src_path] = dest
        models[role] = TinyModel(role, folder, dest.relative_to(models_dir / folder).as_posix(), dest)
    shutil.rmtree(scratch, ignore_errors=True)
    if not models:
        raise HarnessError(f"make-tiny wrote nothing recognisable:\n{proc.stdout[-3000:]}")
    return models
