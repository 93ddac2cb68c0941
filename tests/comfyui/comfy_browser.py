"""Drive the real ComfyUI frontend in headless Debian Chromium through Playwright (never `playwright install`).

Playwright is imported lazily, so this module imports without it; `ComfyFrontend.open` raises ImportError then.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APP_READY_JS = """() => !!(window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types || {}).length > 50)"""
LOAD_JS = """async ({workflow, name}) => {
    const app = window.app, reg = window.LiteGraph.registered_node_types;
    const options = {showMissingNodesDialog: true, showMissingModelsDialog: false};
    await app.loadGraphData(workflow, true, true, name, options);
    const isSubgraph = (n) => typeof n.isSubgraphNode === "function" && n.isSubgraphNode();
    const graphs = [app.graph, ...(app.graph.subgraphs ? Array.from(app.graph.subgraphs.values()) : [])];
    const nodes = graphs.flatMap((g) => g.nodes ?? g._nodes ?? []);
    const missing = nodes.filter((n) => !reg[n.type] && !isSubgraph(n)).map((n) => n.type);
    let prompt = null, promptError = null;
    try { prompt = (await app.graphToPrompt()).output; } catch (e) { promptError = String(e); }
    return {missing, types: nodes.map((n) => n.type), prompt, promptError};
}"""
DIALOGS_JS = "() => Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText)"
CLOSE_DIALOGS_JS = """() => {
    const selector = ".p-dialog .p-dialog-close-button, .p-dialog button[aria-label='Close']";
    const buttons = document.querySelectorAll(selector);
    buttons.forEach((b) => b.click());
    return buttons.length;
}"""


@dataclass
class LoadResult:
    """What the frontend made of one workflow.

    Attributes:
        missing: node types in the loaded graph (subgraphs included) that the frontend has not registered.
        types: every node type in the loaded graph.
        prompt: `app.graphToPrompt().output`, the API-format prompt the UI would queue (None if it threw).
        prompt_error: the exception text when graphToPrompt threw.
        dialogs: the text of the dialogs open after loading (e.g. the missing-nodes dialog).
        page_errors: uncaught JavaScript errors raised while loading.
    """

    missing: list[str]
    types: list[str]
    prompt: dict[str, Any] | None
    prompt_error: str | None
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


class ComfyFrontend:
    """One headless Chromium with the ComfyUI web app open; `load(workflow)` loads a UI-format workflow dict."""

    def __init__(self, url: str, timeout_s: float = 180.0):
        self.url = url
        self.timeout_ms = timeout_s * 1000
        self._pw = self._context = self.page = None
        self._profile: str | None = None
        self.page_errors: list[str] = []

    def open(self) -> ComfyFrontend:
        from playwright.sync_api import sync_playwright

        # A first visit opens the templates browser over the canvas; mark the tutorial done to keep it closed.
        req = urllib.request.Request(self.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
        urllib.request.urlopen(req, timeout=30).close()
        self._profile = tempfile.mkdtemp(prefix="bfs-chromium-")
        self._pw = sync_playwright().start()
        try:
            # A persistent context is Playwright's way to give Chromium a fresh --user-data-dir.
            self._context = self._pw.chromium.launch_persistent_context(
                self._profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=self.timeout_ms
            )
            self._context.set_default_timeout(self.timeout_ms)
            self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
            self.page.on("pageerror", lambda err: self.page_errors.append(str(err)))
            self.page.goto(self.url, wait_until="domcontentloaded")
            self.page.wait_for_function(APP_READY_JS, timeout=self.timeout_ms)
        except BaseException:
            self.close()
            raise
        return self

    def registered_node_types(self) -> list[str]:
        return self.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")

    def load(self, workflow: dict[str, Any], name: str = "workflow.json") -> LoadResult:
        self.close_dialogs()  # the templates dialog of the first visit, the previous load's missing-nodes dialog
        errors_before = len(self.page_errors)
        raw = self.page.evaluate(LOAD_JS, {"workflow": workflow, "name": name})
        dialogs: list[str] = []
        if raw["missing"]:  # the missing-nodes dialog opens asynchronously
            try:
                self.page.wait_for_selector(".p-dialog", timeout=5000)
            except Exception:  # the dialog is supplementary evidence only
                pass
        dialogs = self.page.evaluate(DIALOGS_JS)
        return LoadResult(
            missing=raw["missing"],
            types=raw["types"],
            prompt=raw["prompt"],
            prompt_error=raw["promptError"],
            dialogs=dialogs,
            page_errors=self.page_errors[errors_before:],
        )

    def close_dialogs(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.page.evaluate(CLOSE_DIALOGS_JS) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.page.evaluate(DIALOGS_JS):
            self.page.keyboard.press("Escape")

    def close(self) -> None:
        for closer in (self._context, self._pw):
            if closer is not None:
                try:
                    closer.close() if closer is self._context else closer.stop()
                except Exception:  # best effort at teardown
                    pass
        self._context = self._pw = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None


def frontend_available() -> str | None:
    """None when the browser check can run, else the reason it cannot."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (scripts/comfyui_env.sh installs Debian's chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed in this venv"
    return None
