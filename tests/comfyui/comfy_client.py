"""A small HTTP client for a real ComfyUI server (stdlib only, so the test modules import anywhere).

It polls `/history` instead of reading the websocket: `/history/{id}` is written once a prompt has finished (with
success, an execution error or an interrupt), which is all the tests need, and polling has no connection state to get
wrong. Every call has a timeout.
"""

from __future__ import annotations

import json
import mimetypes
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ComfyHTTPError(RuntimeError):
    """The server answered with an HTTP error status."""

    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class PromptRejected(RuntimeError):
    """`POST /prompt` refused the graph (validation failed); nothing was queued.

    Attributes:
        status: the HTTP status (400).
        error: the `error` object, e.g. `{"type": "prompt_outputs_failed_validation", "message": ..., "details": ...}`.
        node_errors: `{node_id: {"errors": [{"type", "message", "details", "extra_info"}], "class_type": ...}}`.
    """

    def __init__(self, status: int, body: dict[str, Any]):
        self.status = status
        self.error: dict[str, Any] = body.get("error") or {}
        self.node_errors: dict[str, Any] = body.get("node_errors") or {}
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:2000]}")

    @property
    def error_types(self) -> set[str]:
        """The top-level error type plus every node error type, e.g. {"prompt_outputs_failed_validation", ...}."""
        types = {self.error.get("type", "")}
        for node in self.node_errors.values():
            types.update(e.get("type", "") for e in node.get("errors", []))
        return types - {""}


@dataclass
class ExecutionError:
    """The payload of ComfyUI's `execution_error` message for the node that raised."""

    node_id: str
    node_type: str
    exception_type: str
    exception_message: str
    traceback: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"node {self.node_id} ({self.node_type}) raised {self.exception_type}: {self.exception_message.strip()}"


@dataclass
class PromptResult:
    """What `ComfyClient.wait` returns.

    Attributes:
        prompt_id: the id `queue_prompt` returned.
        status: "success", "error" (a node raised: see `error`) or "interrupted".
        outputs: `/history` outputs, `{node_id: {"images": [{"filename", "subfolder", "type"}], "text": [...], ...}}`.
        error: the execution error when `status == "error"`, else None.
        messages: the raw `[event, data]` status messages from `/history`.
        history: the whole `/history/{prompt_id}` entry.
    """

    prompt_id: str
    status: str
    outputs: dict[str, Any]
    error: ExecutionError | None
    messages: list[Any]
    history: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def files(self, node_id: str | None = None, kind: str = "images") -> list[dict[str, Any]]:
        """The file records ({"filename", "subfolder", "type"}) one node (or every node) produced under `kind`."""
        nodes = [self.outputs.get(node_id, {})] if node_id is not None else list(self.outputs.values())
        return [item for out in nodes for item in out.get(kind, []) if isinstance(item, dict) and "filename" in item]


class ComfyClient:
    """Talks to one ComfyUI server.

    Args:
        base_url: e.g. "http://127.0.0.1:8188".
        output_dir / input_dir / temp_dir: the server's folders (the test fixture knows them), used to resolve the
            file records in `/history` to paths.
        timeout: seconds per HTTP request.
    """

    def __init__(
        self,
        base_url: str,
        output_dir: Path | None = None,
        input_dir: Path | None = None,
        temp_dir: Path | None = None,
        timeout: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.output_dir = Path(output_dir) if output_dir else None
        self.input_dir = Path(input_dir) if input_dir else None
        self.temp_dir = Path(temp_dir) if temp_dir else None
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None):
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str) -> Any:
        status, body = self._request("GET", path)
        if status != 200:
            raise ComfyHTTPError("GET", path, status, body.decode("utf-8", "replace"))
        return json.loads(body)

    def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        """POST JSON; returns (status, decoded body or None when the body is empty/not JSON)."""
        status, body = self._request(
            "POST", path, json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode("utf-8", "replace")

    # -- API --------------------------------------------------------------------------------------------------------
    def system_stats(self) -> dict[str, Any]:
        return self.get_json("/system_stats")

    def object_info(self, node_type: str | None = None) -> dict[str, Any]:
        """`/object_info` (every node type) or the entry of one node type (KeyError if it is not registered)."""
        if node_type is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{urllib.parse.quote(node_type)}")[node_type]

    def queue_prompt(self, graph: dict[str, Any]) -> str:
        """Queue an API-format graph (`{node_id: {"class_type", "inputs"}}`) and return its prompt id.

        Raises PromptRejected when the server's validation refuses it (HTTP 400).
        """
        status, body = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(status, body if isinstance(body, dict) else {"error": {"message": str(body)}})
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's `/history` entry, or None while it is queued or running."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def queue(self) -> dict[str, Any]:
        return self.get_json("/queue")

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> PromptResult:
        """Wait until the prompt finished and return its result; on timeout interrupt it and raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return _result(prompt_id, entry)
            if time.monotonic() > deadline:
                queue = self.queue()
                self.interrupt()
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s; queue: {queue}")
            time.sleep(poll)

    def run(self, graph: dict[str, Any], timeout: float = 120.0) -> PromptResult:
        """queue_prompt + wait."""
        return self.wait(self.queue_prompt(graph), timeout=timeout)

    def interrupt(self) -> None:
        """Interrupt the running prompt (ComfyUI checks between nodes and at `throw_exception_if_...` calls)."""
        status, body = self.post_json("/interrupt", {})
        if status != 200:
            raise ComfyHTTPError("POST", "/interrupt", status, str(body))

    def free(self, unload_models: bool = True) -> None:
        """Ask the server to unload models and free memory (handy between model-heavy tests)."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": True})

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload a file to the input folder; returns the value a `LoadImage` widget takes ("sub/name.png")."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        fields = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: {mime}\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self._request(
            "POST", "/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        if status != 200:
            raise ComfyHTTPError("POST", "/upload/image", status, body.decode("utf-8", "replace"))
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def file_path(self, record: dict[str, Any]) -> Path:
        """Resolve a `/history` file record ({"filename", "subfolder", "type": output|temp|input}) to a local path."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        root = roots.get(record.get("type", "output"))
        if root is None:
            raise ValueError(f"no local folder known for file type {record.get('type')!r}")
        return root / record.get("subfolder", "") / record["filename"]


def _result(prompt_id: str, entry: dict[str, Any]) -> PromptResult:
    status = entry.get("status", {})
    messages = status.get("messages", [])
    events = {name: data for name, data in messages if isinstance(data, dict)}
    error = None
    state = "success" if status.get("status_str") == "success" else "error"
    if "execution_interrupted" in events:
        state = "interrupted"
    elif "execution_error" in events:
        data = events["execution_error"]
        error = ExecutionError(
            node_id=str(data.get("node_id")),
            node_type=str(data.get("node_type")),
            exception_type=str(data.get("exception_type")),
            exception_message=str(data.get("exception_message")),
            traceback=list(data.get("traceback") or []),
        )
    return PromptResult(prompt_id, state, entry.get("outputs", {}), error, messages, entry)
