"""Write the example workflows in `workflows/` (ComfyUI UI format) from compact graph descriptions.

Usage: python scripts/make_workflows.py OBJECT_INFO.json [OUT_DIR]
OBJECT_INFO.json is `GET /object_info` of a ComfyUI with this pack installed: it gives each node's widget order
and socket types, so the files match what the frontend expects. The CI checks the committed files against a live
server and loads each one in the real frontend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
BOX_EDITOR_HEIGHT = 640  # a node with the box editor (BG2FG Sample, Extract Foreground, Decompose Layers)

# Model file names the README tells users to download.
FILL = "flux1-fill-dev.safetensors"
BFS = "trained_weights.pt"
RELEASE_VAE = "transparency_vae/diffusion_pytorch_model.safetensors"
LAYERDIFFUSE_VAE = "TransparentVAE.safetensors"


def text_nodes(first_id: int, prompt: str) -> dict:
    return {
        first_id: (
            "DualCLIPLoader",
            {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
            {},
        ),
        first_id + 1: ("CLIPTextEncode", {"text": prompt}, {"clip": (first_id, 0)}),
    }


def drawn_box(x0: int, y0: int, x1: int, y1: int) -> str:
    """The box editor's value ("x,y,w,h" in image pixels) for the box (x0, y0)-(x1, y1)."""
    return f"{x0},{y0},{x1 - x0},{y1 - y0}"


def sample(
    node_type: str,
    model: int,
    background: tuple,
    box: str,
    positive: tuple,
    vae: int,
    seed: int,
    composite: tuple | None = None,
) -> tuple:
    """A sampler whose region is the box drawn on it (`box`, see `drawn_box`)."""
    links = {"bfs_model": (model, 0), "background": background, "positive": positive, "vae": (vae, 0)}
    if composite is not None:
        links["composite"] = composite
    return (node_type, {"seed": seed, "steps": 50, "guidance": 30.0, "short_side": 512, "box": box}, links)


def bg2fg(prompt: str, reference: bool = False, decoder: str = RELEASE_VAE) -> dict:
    nodes = {
        1: ("LoadImage", {"image": "background.png"}, {}),
        3: ("BFSLoadModel", {"base_model": FILL, "bfs_weights": BFS, "weight_dtype": "bf16"}, {}),
        6: ("VAELoader", {"vae_name": "ae.safetensors"}, {}),
        **text_nodes(4, prompt),
    }
    positive = (5, 0)
    if reference:  # Redux: the reference image's tokens are appended to the text tokens (strength_type multiply)
        nodes |= {
            10: ("LoadImage", {"image": "reference.png"}, {}),
            11: ("CLIPVisionLoader", {"clip_name": "sigclip_vision_patch14_384.safetensors"}, {}),
            12: ("CLIPVisionEncode", {"crop": "center"}, {"clip_vision": (11, 0), "image": (10, 0)}),
            13: ("StyleModelLoader", {"style_model_name": "flux1-redux-dev.safetensors"}, {}),
            14: (
                "StyleModelApply",
                {"strength": 1.0, "strength_type": "multiply"},
                {"conditioning": (5, 0), "style_model": (13, 0), "clip_vision_output": (12, 0)},
            ),
        }
        positive = (14, 0)
    nodes |= {
        7: sample("BFSBG2FGSample", 3, (1, 0), drawn_box(160, 220, 360, 480), positive, 6, seed=42),
        8: ("BFSLoadRGBAVAE", {"rgba_vae": decoder}, {}),
        9: ("BFSRGBADecode", {"tta": True}, {"rgba_vae": (8, 0), "foreground": (7, 0), "vae": (6, 0)}),
        15: ("SaveImage", {"filename_prefix": "bfs/foreground"}, {"images": (9, 0)}),
        16: ("PreviewImage", {}, {"images": (7, 1)}),
        17: ("BFSCompositeLayer", {}, {"background": (1, 0), "layer": (9, 0)}),
        18: ("PreviewImage", {}, {"images": (17, 0)}),
        19: (
            "BFSSaveLayers",
            {"names": prompt.removeprefix("a ").removeprefix("an "), "format": "psd", "filename_prefix": "bfs/scene"},
            {"background": (1, 0), "layer_1": (9, 0)},
        ),
    }
    return nodes


def three_layer_scene() -> dict:
    nodes = {
        1: ("LoadImage", {"image": "background.png"}, {}),
        3: ("BFSLoadModel", {"base_model": FILL, "bfs_weights": BFS, "weight_dtype": "bf16"}, {}),
        4: (
            "DualCLIPLoader",
            {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
            {},
        ),
        6: ("VAELoader", {"vae_name": "ae.safetensors"}, {}),
        8: ("BFSLoadRGBAVAE", {"rgba_vae": RELEASE_VAE}, {}),
    }
    background, layers = (1, 0), []
    boxes = [(40, 260, 220, 500), (260, 200, 420, 470), (430, 300, 600, 500)]
    prompts = ["a wooden chair", "a potted plant", "a sleeping cat"]
    for i, (box, prompt) in enumerate(zip(boxes, prompts)):
        base = 20 + 10 * i
        nodes |= {
            base + 1: ("CLIPTextEncode", {"text": prompt}, {"clip": (4, 0)}),
            base + 2: sample("BFSBG2FGSample", 3, background, drawn_box(*box), (base + 1, 0), 6, seed=7 + i),
            base + 3: ("BFSRGBADecode", {"tta": True}, {"rgba_vae": (8, 0), "foreground": (base + 2, 0)}),
            base + 4: ("BFSCompositeLayer", {}, {"background": background, "layer": (base + 3, 0)}),
        }
        layers.append((base + 3, 0))
        background = (base + 4, 0)  # each addition sees the scene so far
    nodes[60] = ("PreviewImage", {}, {"images": background})
    nodes[61] = (
        "BFSSaveLayers",
        {"names": "chair, plant, cat", "format": "psd+ora", "filename_prefix": "bfs/scene3"},
        {"background": (1, 0), **{f"layer_{i + 1}": layer for i, layer in enumerate(layers)}},
    )
    return nodes


def extract_foreground() -> dict:
    return {
        1: ("LoadImage", {"image": "composite.png"}, {}),
        2: ("LoadImage", {"image": "background.png"}, {}),
        3: ("BFSLoadModel", {"base_model": FILL, "bfs_weights": BFS, "weight_dtype": "fp8_e4m3fn"}, {}),
        **text_nodes(4, "a dog"),
        6: ("VAELoader", {"vae_name": "ae.safetensors"}, {}),
        8: sample("BFSExtractForeground", 3, (2, 0), drawn_box(100, 150, 400, 500), (5, 0), 6, 0, composite=(1, 0)),
        9: ("BFSLoadRGBAVAE", {"rgba_vae": RELEASE_VAE}, {}),
        10: ("BFSRGBADecode", {"tta": True}, {"rgba_vae": (9, 0), "foreground": (8, 0)}),
        11: ("SaveImage", {"filename_prefix": "bfs/extracted"}, {"images": (10, 0)}),
        12: ("InvertMask", {}, {"mask": (10, 1)}),
        13: ("MaskToImage", {}, {"mask": (12, 0)}),
        14: ("PreviewImage", {}, {"images": (13, 0)}),
    }


def decompose_layers() -> dict:
    return {
        1: ("LoadImage", {"image": "photo.png"}, {}),
        2: (
            "BFSLoadDecomposition",
            {"base_model": FILL, "weights": "outpaint_and_remove.safetensors", "weight_dtype": "bf16"},
            {},
        ),
        **text_nodes(3, ""),
        5: ("VAELoader", {"vae_name": "ae.safetensors"}, {}),
        6: ("BFSLoadRGBAVAE", {"rgba_vae": RELEASE_VAE}, {}),
        7: ("InvertMask", {}, {"mask": (1, 1)}),  # LoadImage's mask is 1 − alpha of the painted area
        8: (
            "BFSDecomposeLayers",
            {"seed": 0, "steps": 28, "guidance": 30.0, "short_side": 1024},
            {
                "decomposition_model": (2, 0),
                "image": (1, 0),
                "mask": (7, 0),
                "positive": (4, 0),
                "vae": (5, 0),
                "rgba_vae": (6, 0),
            },
        ),
        9: ("SaveImage", {"filename_prefix": "bfs/decomposed_foreground"}, {"images": (8, 0)}),
        10: ("SaveImage", {"filename_prefix": "bfs/decomposed_background"}, {"images": (8, 2)}),
        11: (
            "BFSSaveLayers",
            {"names": "object", "format": "psd", "filename_prefix": "bfs/decomposed"},
            {"background": (8, 2), "layer_1": (8, 0)},
        ),
    }


def toy_scene() -> dict:
    """The embedded toy model (no downloads): the demo's chained scene of `python -m bfs_core demo`."""
    nodes = {
        1: ("BFSToyBackground", {"seed": 3}, {}),
        2: ("BFSLoadToyModel", {}, {}),
    }
    background, layers = (1, 0), []
    boxes = [(10, 38, 26, 54), (38, 40, 54, 56)]
    prompts = ["a red cube", "a blue ball"]
    for i, (box, prompt) in enumerate(zip(boxes, prompts)):
        base = 10 + 10 * i
        nodes |= {
            base + 1: ("BFSToyTextEncode", {"text": prompt}, {"text_encoder": (2, 3)}),
            base + 2: (
                "BFSBG2FGSample",
                {"seed": 10 + i, "steps": 20, "guidance": 30.0, "short_side": 512, "box": drawn_box(*box)},
                {"bfs_model": (2, 0), "background": background, "positive": (base + 1, 0), "vae": (2, 1)},
            ),
            base + 3: ("BFSRGBADecode", {"tta": False}, {"rgba_vae": (2, 2), "foreground": (base + 2, 0)}),
            base + 4: ("BFSCompositeLayer", {}, {"background": background, "layer": (base + 3, 0)}),
            base + 5: ("SaveImage", {"filename_prefix": f"bfs_toy/layer_{i + 1}"}, {"images": (base + 3, 0)}),
        }
        layers.append((base + 3, 0))
        background = (base + 4, 0)
    nodes[40] = ("SaveImage", {"filename_prefix": "bfs_toy/scene"}, {"images": background})
    layer_links = {f"layer_{i + 1}": layer for i, layer in enumerate(layers)}
    nodes[41] = (
        "BFSSaveLayers",
        {"names": "red cube, blue ball", "format": "psd+ora", "filename_prefix": "bfs_toy/scene"},
        {"background": (1, 0), **layer_links},
    )
    return nodes


def toy_reference() -> dict:
    """bg2fg_redux_reference.json on the embedded toy model (no downloads): a reference image of the object through
    ComfyUI's own CLIPVisionEncode and StyleModelApply (the toy loader's clip_vision and style_model), the neutral
    caption "an object", BG2FG, RGBA Decode."""
    nodes = {
        1: ("BFSToyBackground", {"seed": 3}, {}),
        2: ("BFSBoxToMask", {"x0": 24, "y0": 38, "x1": 40, "y1": 54}, {"image": (1, 0)}),
        3: ("BFSLoadToyModel", {}, {}),
        5: ("BFSToyTextEncode", {"text": "an object"}, {"text_encoder": (3, 3)}),
        10: ("BFSToyReferenceImage", {"colour": "yellow", "shape": "ball", "seed": 0}, {}),
        12: ("CLIPVisionEncode", {"crop": "center"}, {"clip_vision": (3, 4), "image": (10, 0)}),
        14: (
            "StyleModelApply",
            {"strength": 1.0, "strength_type": "multiply"},
            {"conditioning": (5, 0), "style_model": (3, 5), "clip_vision_output": (12, 0)},
        ),
        7: (
            "BFSBG2FGSample",
            {"seed": 42, "steps": 20, "guidance": 30.0, "short_side": 512},
            {"bfs_model": (3, 0), "background": (1, 0), "mask": (2, 0), "positive": (14, 0), "vae": (3, 1)},
        ),
        9: ("BFSRGBADecode", {"tta": False}, {"rgba_vae": (3, 2), "foreground": (7, 0)}),
        15: ("SaveImage", {"filename_prefix": "bfs_toy/reference_layer"}, {"images": (9, 0)}),
        16: ("PreviewImage", {}, {"images": (10, 0)}),
        17: ("BFSCompositeLayer", {}, {"background": (1, 0), "layer": (9, 0)}),
        18: ("PreviewImage", {}, {"images": (17, 0)}),
    }
    return nodes


def toy_decompose() -> dict:
    """Decompose Layers on the embedded toy models (no downloads), both methods side by side on one held-out toy scene:
    outpaint_and_remove (Load Toy Decomposition Model, with the toy segmentation and depth maps) and fill_then_extract
    (Load BFS Toy Model: its Fill base removes the object, BFS extraction pulls it out); each saved as a PSD."""
    nodes = {
        1: ("BFSLoadToyDecomposition", {}, {}),
        2: ("BFSLoadToyModel", {}, {}),
        3: ("BFSToyDecompositionScene", {"scene": 7}, {"text_encoder": (1, 3)}),
    }
    scene = {"image": (3, 0), "mask": (3, 1), "positive": (3, 2)}
    sampling = {"seed": 0, "steps": 20, "guidance": 30.0, "short_side": 0}
    methods = {
        "outpaint_and_remove": ({"decomposition_model": (1, 0), "vae": (1, 1), "rgba_vae": (1, 2)}, {}),
        "fill_then_extract": ({"bfs_model": (2, 0), "vae": (2, 1), "rgba_vae": (2, 2)}, {"dilation": 2}),
    }
    for i, (method, (models, widgets)) in enumerate(methods.items()):
        base = 10 + 10 * i
        maps = {"segmentation": (3, 3), "depth": (3, 4)} if method == "outpaint_and_remove" else {}
        nodes |= {
            base: ("BFSDecomposeLayers", {**sampling, "method": method, **widgets}, {**models, **scene, **maps}),
            base + 1: (
                "BFSSaveLayers",
                {"names": "object", "format": "psd", "filename_prefix": f"bfs_toy/decomposed_{method}"},
                {"background": (base, 2), "layer_1": (base, 0)},
            ),
        }
    return nodes


WORKFLOWS = {
    "bg2fg_text.json": lambda: bg2fg("a ceramic vase with flowers"),
    "bg2fg_redux_reference.json": lambda: bg2fg("an object", reference=True),
    "bg2fg_layerdiffuse_decoder.json": lambda: bg2fg("a red bicycle", decoder=LAYERDIFFUSE_VAE),
    "three_layer_scene.json": three_layer_scene,
    "extract_foreground.json": extract_foreground,
    "decompose_layers.json": decompose_layers,
    "toy_scene.json": toy_scene,
    "toy_decompose.json": toy_decompose,
    "toy_reference.json": toy_reference,
}


# ---------------------------------------------------------------------------------------------------------------------
def _input_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _depths(nodes: dict) -> dict[int, int]:
    depth: dict[int, int] = {}

    def visit(node_id: int) -> int:
        if node_id not in depth:
            sources = [src for src, _ in nodes[node_id][2].values()]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in nodes:
        visit(node_id)
    return depth


def to_ui(nodes: dict, info: dict) -> dict:
    """Compact {id: (type, widget values, {input: (src id, src slot)})} -> a LiteGraph/ComfyUI UI workflow."""
    links, ui_nodes, column_y = [], {}, {}
    depth = _depths(nodes)
    for node_id in sorted(nodes, key=lambda i: (depth[i], i)):
        node_type, widgets, inputs = nodes[node_id]
        spec = info[node_type]
        all_inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        order = spec["input_order"].get("required", []) + spec["input_order"].get("optional", [])
        unknown = set(widgets) | set(inputs)
        unknown -= set(order)
        if unknown:
            raise ValueError(f"{node_type} has no inputs {sorted(unknown)}")
        ui_inputs, values = [], []
        for name in order:
            kind = _input_type(all_inputs[name])
            if kind in WIDGET_TYPES and name not in inputs:
                options = all_inputs[name][1] if len(all_inputs[name]) > 1 else {}
                default = options.get("default")
                if default is None and kind == "COMBO":
                    choices = all_inputs[name][0] if isinstance(all_inputs[name][0], list) else options.get("options")
                    default = choices[0] if choices else ""
                values.append(widgets.get(name, default))
                # The frontend adds a "control after generate" widget to these, and to any INT input named seed.
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    values.append("fixed")
                if options.get("image_upload"):
                    values.append("image")
            elif name in inputs or name in spec["input"].get("required", {}):
                ui_inputs.append({"name": name, "type": kind, "link": None})
        column = depth[node_id]
        height = BOX_EDITOR_HEIGHT if "box" in all_inputs else 200  # web/box_editor.js needs room
        y = column_y.get(column, 60)
        column_y[column] = y + height + 60
        ui_nodes[node_id] = {
            "id": node_id,
            "type": node_type,
            "pos": [60 + 380 * column, y],
            "size": [340, height],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": ui_inputs,
            "outputs": [
                {"name": name, "type": kind, "links": [], "slot_index": slot}
                for slot, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))
            ],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
        }
    for node_id, (_, _, inputs) in sorted(nodes.items()):
        for name, (src, slot) in inputs.items():
            link_id = len(links) + 1
            kind = ui_nodes[src]["outputs"][slot]["type"]
            links.append(
                [
                    link_id,
                    src,
                    slot,
                    node_id,
                    next(i for i, x in enumerate(ui_nodes[node_id]["inputs"]) if x["name"] == name),
                    kind,
                ]
            )
            next(x for x in ui_nodes[node_id]["inputs"] if x["name"] == name)["link"] = link_id
            ui_nodes[src]["outputs"][slot]["links"].append(link_id)
    ordered = sorted(ui_nodes.values(), key=lambda n: (depth[n["id"]], n["id"]))
    for order, node in enumerate(ordered):
        node["order"] = order
    return {
        "last_node_id": max(nodes),
        "last_link_id": len(links),
        "nodes": ordered,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def main(argv: list[str]) -> int:
    info = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2]) if len(argv) > 2 else Path(__file__).resolve().parents[1] / "workflows"
    out.mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(to_ui(build(), info), indent=1) + "\n")
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
