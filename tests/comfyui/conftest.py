"""Fixtures for the tests that run the pack inside a real ComfyUI 0.3.75 server (CPU).

These tests run only with `BFS_COMFY_TESTS=1`, from the ComfyUI venv that `scripts/comfyui_env.sh` builds
(`scripts/comfyui_tests.sh` does both). Elsewhere, e.g. in the main suite, every test here is skipped.

One server per session, on 127.0.0.1 and a free port, started with `--base-directory` pointing at a pytest temp dir:

    <base>/models/{diffusion_models,diffusers,bfs,vae,rgba_vae,text_encoders,...}   (fixture `comfy_models`)
    <base>/custom_nodes/comfyui-bfs-layers -> this repository
    <base>/{input,output,temp,user}/ , <base>/server.log ; database in memory

Model files should exist before the server starts, or at least before the graph that needs them is queued (ComfyUI
rescans a model folder when its mtime changes, so late files are seen too). Three ways to provide them:
  * request the `comfy_tiny_models` fixture in a test: when any collected test does, `comfy_models` writes the
    `python -m bfs_core make-tiny` set into the folders of `comfy_harness.TINY_MODEL_LAYOUT` before the server starts;
  * implement the hook `pytest_bfs_comfy_models(models_dir, config)` in a conftest.py in a subfolder;
  * write files into `comfy_models` from a test or fixture (seen by the next queued graph).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .comfy_client import ComfyClient
from .comfy_harness import ComfyServer, HarnessError, TinyModel, prepare_base_dir, start_server, write_tiny_models


HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("BFS_COMFY_TESTS") == "1"
SKIP_REASON = (
    "real-ComfyUI tests are off: set BFS_COMFY_TESTS=1 and run from the ComfyUI venv "
    "(bash scripts/comfyui_tests.sh does both)"
)
START_TIMEOUT_S = float(os.environ.get("BFS_COMFY_START_TIMEOUT", "300"))
_TINY_KEY = pytest.StashKey[dict]()
_SERVER: ComfyServer | None = None


class ComfyModelHooks:
    @pytest.hookspec
    def pytest_bfs_comfy_models(self, models_dir: Path, config: pytest.Config) -> None:
        """Write model files under `models_dir` (= <base>/models) before the ComfyUI test server starts."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(ComfyModelHooks)


def pytest_configure(config: pytest.Config) -> None:
    if ENABLED and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # `timeout` (CI) sends SIGTERM: turn it into KeyboardInterrupt so pytest runs the teardown stopping the server.
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_this_folder(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _in_this_folder(item):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Append the tail of the server log to the report of a failing test in this folder."""
    report = yield
    if report.failed and _SERVER is not None and _in_this_folder(item):
        report.sections.append((f"ComfyUI server log, last 60 lines ({_SERVER.log_path})", _SERVER.log_tail(60)))
    return report


@pytest.fixture(scope="session")
def comfy_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's --base-directory: models/, custom_nodes/ (our pack linked in), input/, output/, temp/, user/."""
    return prepare_base_dir(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def comfy_models(request: pytest.FixtureRequest, comfy_base_dir: Path) -> Path:
    """The models root (<base>/models), filled before the server starts (tiny set on demand, then the hook)."""
    models_dir = comfy_base_dir / "models"
    if any("comfy_tiny_models" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.config.stash[_TINY_KEY] = _tiny(models_dir)
    request.config.hook.pytest_bfs_comfy_models(models_dir=models_dir, config=request.config)
    return models_dir


def _tiny(models_dir: Path) -> dict[str, TinyModel]:
    try:
        return write_tiny_models(models_dir)
    except HarnessError as err:
        failure = str(err)
    pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def comfy_tiny_models(request: pytest.FixtureRequest, comfy_models: Path) -> dict[str, TinyModel]:
    """role -> TinyModel of the `make-tiny` set; `.name` is the combo value in folder `.folder`, `.path` the file.

    Written before the server starts when a collected test requests this fixture by name; otherwise now.
    """
    if _TINY_KEY not in request.config.stash:
        request.config.stash[_TINY_KEY] = _tiny(comfy_models)
    return request.config.stash[_TINY_KEY]


def _say(config: pytest.Config, message: str) -> None:
    """Print past pytest's output capture (fixture setup output is otherwise shown only for failing tests)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(f"\n{message}", file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        print(f"\n{message}", file=sys.stderr)


@pytest.fixture(scope="session")
def comfy_server(request: pytest.FixtureRequest, comfy_base_dir: Path, comfy_models: Path) -> Iterator[ComfyServer]:
    """The running server (CPU, 127.0.0.1, free port). Stops the session if it fails to start or our pack fails."""
    global _SERVER
    try:
        server = start_server(comfy_base_dir, timeout=START_TIMEOUT_S)
    except HarnessError as err:
        failure = str(err)
    else:
        failure = ""
    if failure:  # nothing in this folder can run: stop the session with one clear message
        _say(request.config, f"ComfyUI test server failed:\n{failure}")
        pytest.exit(f"ComfyUI test server failed: {failure.splitlines()[0]}", returncode=pytest.ExitCode.TESTS_FAILED)
    atexit.register(server.stop)  # in case the session dies without running the fixture teardown
    if os.environ.get("BFS_COMFY_PIDFILE"):  # scripts/comfyui_tests.sh kills this process group if pytest is killed
        Path(os.environ["BFS_COMFY_PIDFILE"]).write_text(str(server.process.pid))
    _SERVER = server
    _say(request.config, f"ComfyUI up on {server.url} in {server.startup_s:.1f} s (log: {server.log_path})")
    try:
        yield server
    finally:
        _SERVER = None
        server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_server: ComfyServer) -> ComfyClient:
    """A client for the session's server; `file_path(record)` resolves /history file records to local paths."""
    return ComfyClient(
        comfy_server.url,
        output_dir=comfy_server.output_dir,
        input_dir=comfy_server.input_dir,
        temp_dir=comfy_server.temp_dir,
        timeout=60,
    )


@pytest.fixture(scope="session")
def comfy_object_info(comfy: ComfyClient) -> dict:
    """`/object_info` fetched once per session (node type -> spec)."""
    return comfy.object_info()
