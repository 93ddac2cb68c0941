"""The pack's example workflows in ComfyUI's template browser (Workflow -> Browse Templates -> Extensions ->
comfyui-bfs-layers), against the real server and its frontend.

ComfyUI lists `<custom node folder>/<examples folder>/*.json` at `/api/workflow_templates` and serves the folder at
`/api/workflow_templates/<folder name>/`; the frontend shows `<name>.jpg` from there as each card's thumbnail.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from .comfy_browser import ComfyFrontend, frontend_available
from .comfy_harness import PACK_DIR, PACK_FOLDER


WORKFLOWS = PACK_DIR / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
REGENERATE = "run `python scripts/make_thumbnails.py` after adding or changing a workflow"


def test_every_workflow_has_a_small_thumbnail():
    assert len(NAMES) >= 7, NAMES
    missing = [n for n in NAMES if not (WORKFLOWS / f"{n}.jpg").is_file()]
    assert not missing, f"no thumbnail for {missing}: {REGENERATE}"
    orphans = sorted({p.stem for p in WORKFLOWS.glob("*.jpg")} - set(NAMES))
    assert not orphans, f"thumbnails without a workflow: {orphans}"
    total = sum((WORKFLOWS / f"{n}.jpg").stat().st_size for n in NAMES)
    assert total < 300_000, f"thumbnails take {total} bytes; keep them under 300 KB"


def test_the_server_lists_every_workflow_as_a_template(comfy):
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == NAMES, templates.get(PACK_FOLDER)  # each once, no duplicates
    assert comfy.get_json("/workflow_templates") == templates  # the unprefixed route the frontend falls back to


@pytest.mark.parametrize("name", NAMES)
def test_the_thumbnail_and_workflow_the_frontend_asks_for_are_served(comfy, name):
    # useTemplateWorkflows.getTemplateThumbnailUrl: api.apiURL(`/workflow_templates/${module}/${name}`) + ".jpg"
    status, body = comfy._request("GET", f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
    assert status == 200, f"thumbnail {name}.jpg: HTTP {status}"
    assert body == (WORKFLOWS / f"{name}.jpg").read_bytes()
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG" and image.size == (256, 256), (image.format, image.size)
    workflow = comfy.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
    assert workflow == json.loads((WORKFLOWS / f"{name}.json").read_text())


CARD_IMAGE_JS = """(el) => {
    const img = el.querySelector('img');
    return img ? {src: img.src, complete: img.complete, width: img.naturalWidth} : null;
}"""


def test_the_template_browser_shows_every_workflow_with_its_thumbnail(comfy_server):
    reason = frontend_available()
    if reason:
        pytest.skip(reason)
    frontend = ComfyFrontend(comfy_server.url).open()
    try:
        page = frontend.page
        fetched = {}  # thumbnail URL -> HTTP status, as the frontend fetched them (it shows them as blob: URLs)
        page.on("response", lambda r: fetched.__setitem__(r.url, r.status) if r.url.endswith(".jpg") else None)
        frontend.close_dialogs()
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.get_by_text(PACK_FOLDER, exact=True).first.click()  # the Extensions group's entry for this pack
        shown = {}
        for name in NAMES:
            card = page.locator(f'[data-testid="template-workflow-{name}"]')
            card.scroll_into_view_if_needed()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                shown[name] = card.evaluate(CARD_IMAGE_JS)
                if shown[name] and shown[name]["complete"] and shown[name]["width"]:
                    break
                time.sleep(0.2)
        for name, img in shown.items():
            assert img and img["complete"] and img["width"] == 256, f"{name}: the card's thumbnail did not load: {img}"
            url = f"{comfy_server.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg"
            assert fetched.get(url) == 200, f"{name}: {url} -> {fetched.get(url)}; fetched {sorted(fetched)}"
        others = page.locator('[data-testid^="template-workflow-"]').count()
        assert others == len(NAMES), f"{others} cards under {PACK_FOLDER}, expected {len(NAMES)}"
    finally:
        frontend.close()
