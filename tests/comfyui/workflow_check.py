"""Check UI-format ComfyUI workflows (the JSON the editor saves) against a live server's `/object_info`.

Checked, per node (subgraphs included):
  * the node type is registered (frontend-only types such as Note, Reroute and PrimitiveNode are allowed);
  * every link: both ends exist, the origin output and the target input exist, and the link type, the origin's output
    type and the target's input type are compatible ("*" and comma-separated unions as the frontend treats them);
  * required socket inputs are connected (unless the node is muted or bypassed);
  * widget values, mapped to the widget inputs in `input_order` (plus the seed "control_after_generate" widget and
    the "upload" widget of image-upload combos): COMBO in its choices, INT/FLOAT within min/max, BOOLEAN, STRING.
    A COMBO that holds a model or input file name is only reported as a note when its value is missing, since the
    test server has no real models.

Run as a script: `python workflow_check.py http://127.0.0.1:8188 workflows/*.json`.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".gguf", ".pkl", ".onnx")
# Input names of model-file combos whose choices may hold folder names without an extension (diffusers layouts).
MODEL_INPUT_WORDS = ("ckpt", "checkpoint", "unet", "vae", "clip_name", "lora", "weights", "control_net", "model_name")
MODEL_INPUT_WORDS += ("base_model", "style_model", "bfs", "file")
SUBGRAPH_IO_NODE_IDS = {-10, -20}  # a subgraph's own input (-10) and output (-20) nodes in its links
MUTED_MODES = {2, 4}  # 2: never, 4: bypass


@dataclass
class WorkflowReport:
    """Problems found in one workflow: `errors` fail the check, `notes` are for information (e.g. model names)."""

    path: str
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    node_types: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.errors)} error(s), {len(self.notes)} note(s)"]
        lines += [f"  ERROR {e}" for e in self.errors] + [f"  note  {n}" for n in self.notes]
        return "\n".join(lines)


def input_type(spec: list[Any]) -> str:
    """The socket type of an /object_info input spec: "COMBO" for lists of choices, else the type string."""
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def input_options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec: list[Any]) -> list[Any]:
    if isinstance(spec[0], list):
        return spec[0]
    return list(input_options(spec).get("options", []))


def output_type(node_info: dict[str, Any], slot: int) -> str | None:
    outputs = node_info.get("output", [])
    if not 0 <= slot < len(outputs):
        return None
    kind = outputs[slot]
    return "COMBO" if isinstance(kind, list) else str(kind)


def types_compatible(a: str, b: str) -> bool:
    if a == b or "*" in (a, b) or "" in (a, b):
        return True
    return bool({t.strip() for t in a.split(",")} & {t.strip() for t in b.split(",")})


def all_inputs(node_info: dict[str, Any]) -> dict[str, list[Any]]:
    inputs = node_info.get("input", {})
    return {**inputs.get("required", {}), **inputs.get("optional", {})}


def is_widget(spec: list[Any]) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def expected_widgets(node_info: dict[str, Any]) -> list[tuple[str, list[Any] | None]]:
    """(input name, spec) per value in `widgets_values`, in order; spec None marks a frontend-added widget."""
    order = node_info.get("input_order") or {
        k: list(v) for k, v in node_info.get("input", {}).items() if k in ("required", "optional")
    }
    specs = all_inputs(node_info)
    widgets: list[tuple[str, list[Any] | None]] = []
    for name in [*order.get("required", []), *order.get("optional", [])]:
        spec = specs.get(name)
        if spec is None or not is_widget(spec):
            continue
        widgets.append((name, spec))
        opts = input_options(spec)
        if input_type(spec) in ("INT", "FLOAT") and (
            opts.get("control_after_generate") or (name in ("seed", "noise_seed") and input_type(spec) == "INT")
        ):
            widgets.append((f"{name}:control_after_generate", None))
        elif input_type(spec) == "COMBO" and (opts.get("image_upload") or opts.get("video_upload")):
            widgets.append((f"{name}:upload", None))
    return widgets


def looks_like_file_combo(name: str, spec: list[Any], value: Any) -> bool:
    """Model or input-file combos: their choices depend on the machine, so a missing value is only a note."""
    opts = input_options(spec)
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload") or opts.get("remote"):
        return True
    choices = [str(c) for c in combo_choices(spec)]
    if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
        return True
    if any(c.lower().endswith(MODEL_EXTENSIONS) for c in choices):
        return True
    return not choices or any(word in name.lower() for word in MODEL_INPUT_WORDS)


def check_value(where: str, name: str, spec: list[Any], value: Any, report: WorkflowReport) -> None:
    kind = input_type(spec)
    opts = input_options(spec)
    if kind == "COMBO":
        choices = combo_choices(spec)
        if value in choices:
            return
        if looks_like_file_combo(name, spec, value):
            report.notes.append(f"{where}: {name}={value!r} is not on this server (file combo, allowed)")
        else:
            report.errors.append(f"{where}: {name}={value!r} not in choices {choices[:20]}")
        return
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            report.errors.append(f"{where}: {name}={value!r} is not a BOOLEAN")
        return
    if kind == "STRING":
        if not isinstance(value, str):
            report.errors.append(f"{where}: {name}={value!r} is not a STRING")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        report.errors.append(f"{where}: {name}={value!r} is not a number ({kind})")
        return
    if kind == "INT" and value != int(value):
        report.errors.append(f"{where}: {name}={value!r} is not an INT")
    lo, hi = opts.get("min"), opts.get("max")
    eps = 1e-9 * max(1.0, abs(value))
    if lo is not None and value < lo - eps:
        report.errors.append(f"{where}: {name}={value!r} below min {lo}")
    if hi is not None and value > hi + eps:
        report.errors.append(f"{where}: {name}={value!r} above max {hi}")


def check_widgets(where: str, node: dict[str, Any], node_info: dict[str, Any], report: WorkflowReport) -> None:
    values = node.get("widgets_values")
    if values is None:
        return
    widgets = expected_widgets(node_info)
    if isinstance(values, dict):  # some nodes save widgets by name
        specs = all_inputs(node_info)
        for name, value in values.items():
            if name in specs and is_widget(specs[name]):
                check_value(where, name, specs[name], value, report)
        return
    names = [n for n, _ in widgets]
    if len(values) < len(widgets):
        report.errors.append(f"{where}: {len(values)} widget value(s) {values!r} but the node has {names}")
        return
    if len(values) > len(widgets):  # frontend extensions add display widgets (3D preview, size readouts)
        report.notes.append(f"{where}: extra trailing widget values {values[len(widgets) :]!r} after {names}")
    for (name, spec), value in zip(widgets, values):
        if spec is not None:
            check_value(where, name, spec, value, report)
        elif name.endswith(":control_after_generate") and value not in SEED_CONTROL_VALUES:
            report.errors.append(f"{where}: {name}={value!r} not one of {sorted(SEED_CONTROL_VALUES)}")


def normalise_link(link: Any) -> tuple[int, int, int, int, int, str] | None:
    """UI links are [id, origin_id, origin_slot, target_id, target_slot, type] or dicts (subgraphs, newer saves)."""
    if isinstance(link, dict):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        return tuple(link.get(k) for k in keys)  # type: ignore[return-value]
    if isinstance(link, list) and len(link) >= 6:
        return tuple(link[:6])  # type: ignore[return-value]
    return None


def check_graph(
    graph: dict[str, Any],
    object_info: dict[str, Any],
    report: WorkflowReport,
    subgraphs: dict[str, Any],
    prefix: str = "",
    depth: int = 0,
) -> None:
    nodes = {node.get("id"): node for node in graph.get("nodes", [])}
    for node in nodes.values():
        node_type = node.get("type", "")
        where = f"{prefix}node {node.get('id')} ({node_type})"
        report.node_types.add(node_type)
        if node_type in subgraphs:
            if depth < 8:
                inner = subgraphs[node_type]
                check_graph(inner, object_info, report, subgraphs, f"{where} > ", depth + 1)
            continue
        if node_type in FRONTEND_ONLY_TYPES:
            continue
        info = object_info.get(node_type)
        if info is None:
            report.errors.append(f"{where}: node type {node_type!r} is not registered on the server")
            continue
        specs = all_inputs(info)
        connected = {i.get("name") for i in node.get("inputs", []) or [] if i.get("link") is not None}
        for ui_input in node.get("inputs", []) or []:
            if ui_input.get("name") not in specs:
                report.errors.append(f"{where}: input {ui_input.get('name')!r} does not exist on the server")
        if node.get("mode", 0) not in MUTED_MODES:
            for name, spec in info.get("input", {}).get("required", {}).items():
                if not is_widget(spec) and name not in connected:
                    report.errors.append(f"{where}: required input {name!r} ({input_type(spec)}) is not connected")
        check_widgets(where, node, info, report)

    for raw in graph.get("links", []) or []:
        link = normalise_link(raw)
        if link is None:
            report.errors.append(f"{prefix}malformed link {raw!r}")
            continue
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = link
        where = f"{prefix}link {link_id}"
        link_type = "COMBO" if isinstance(link_type, list) else str(link_type or "*")
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None and origin_id not in SUBGRAPH_IO_NODE_IDS:
            report.errors.append(f"{where}: origin node {origin_id} does not exist")
        if target is None and target_id not in SUBGRAPH_IO_NODE_IDS:
            report.errors.append(f"{where}: target node {target_id} does not exist")
        origin_info = object_info.get(origin.get("type")) if origin else None
        if origin_info is not None:
            out_type = output_type(origin_info, origin_slot)
            if out_type is None:
                report.errors.append(f"{where}: {origin.get('type')} has no output slot {origin_slot}")
            elif not types_compatible(out_type, link_type):
                report.errors.append(f"{where}: type {link_type} but {origin.get('type')} output is {out_type}")
        target_info = object_info.get(target.get("type")) if target else None
        if target_info is not None:
            ui_inputs = target.get("inputs", []) or []
            if not 0 <= target_slot < len(ui_inputs):
                report.errors.append(f"{where}: {target.get('type')} has no input slot {target_slot}")
                continue
            name = ui_inputs[target_slot].get("name")
            spec = all_inputs(target_info).get(name)
            if spec is not None and not types_compatible(input_type(spec), link_type):
                report.errors.append(
                    f"{where}: type {link_type} into {target.get('type')}.{name}, which takes {input_type(spec)}"
                )


def check_workflow(workflow: dict[str, Any], object_info: dict[str, Any], path: str = "<workflow>") -> WorkflowReport:
    """Check one UI-format workflow (a dict with `nodes` and `links`) against `/object_info`."""
    report = WorkflowReport(path)
    if not isinstance(workflow.get("nodes"), list):
        report.errors.append("not a UI-format workflow (no `nodes` list); API-format prompts are not supported here")
        return report
    subgraphs = {sg.get("id"): sg for sg in (workflow.get("definitions") or {}).get("subgraphs", []) or []}
    check_graph(workflow, object_info, report, subgraphs)
    if not any(n.get("type") not in FRONTEND_ONLY_TYPES for n in workflow["nodes"]):
        report.errors.append("the workflow has no executable nodes")
    return report


def check_file(path: str | Path, object_info: dict[str, Any]) -> WorkflowReport:
    try:
        workflow = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        report = WorkflowReport(str(path))
        report.errors.append(f"cannot read JSON: {err}")
        return report
    return check_workflow(workflow, object_info, str(path))


def main(argv: list[str]) -> int:
    url, *paths = argv
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as resp:
        object_info = json.load(resp)
    reports = [check_file(p, object_info) for p in paths]
    for report in reports:
        print(report)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
