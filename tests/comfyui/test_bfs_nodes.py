"""The pack's nodes on a real ComfyUI server, end to end on CPU with the tiny model set.

Text encoders cannot be tiny in ComfyUI's loaders, so CONDITIONING comes from the test-only `BFSTestConditioning`
node (same structure as CLIPTextEncode; Redux-style appended image tokens on request). The Flux VAE must be the real
architecture for ComfyUI's VAELoader: a randomly initialised one is written once per session.
"""

from __future__ import annotations

import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image


EXPECTED = {  # node id -> (input types by name, output types): the documented interface
    "BFSLoadModel": ({"base_model": "COMBO", "bfs_weights": "COMBO", "weight_dtype": "COMBO"}, ["BFS_MODEL"]),
    "BFSLoadRGBAVAE": ({"rgba_vae": "COMBO"}, ["BFS_RGBA_VAE"]),
    "BFSBG2FGSample": (
        {
            "bfs_model": "BFS_MODEL",
            "background": "IMAGE",
            "mask": "MASK",
            "positive": "CONDITIONING",
            "vae": "VAE",
            "seed": "INT",
            "steps": "INT",
            "guidance": "FLOAT",
            "short_side": "INT",
            "box": "STRING",
        },
        ["LATENT", "IMAGE", "MASK"],
    ),
    "BFSExtractForeground": (
        {
            "bfs_model": "BFS_MODEL",
            "composite": "IMAGE",
            "background": "IMAGE",
            "mask": "MASK",
            "positive": "CONDITIONING",
            "vae": "VAE",
            "box": "STRING",
        },
        ["LATENT", "IMAGE", "MASK"],
    ),
    "BFSRGBADecode": (
        {"rgba_vae": "BFS_RGBA_VAE", "foreground": "LATENT", "vae": "VAE", "tta": "BOOLEAN"},
        ["IMAGE", "MASK"],
    ),
    "BFSCompositeLayer": ({"background": "IMAGE", "layer": "IMAGE", "alpha": "MASK"}, ["IMAGE"]),
    "BFSBoxToMask": ({"image": "IMAGE", "x0": "INT", "y0": "INT", "x1": "INT", "y1": "INT"}, ["MASK"]),
    "BFSSaveLayers": (
        {
            "background": "IMAGE",
            "layer_1": "IMAGE",
            "layer_6": "IMAGE",
            "names": "STRING",
            "format": "COMBO",
            "filename_prefix": "STRING",
        },
        ["STRING"],
    ),
    "BFSLoadDecomposition": (
        {"base_model": "COMBO", "weights": "COMBO", "weight_dtype": "COMBO"},
        ["BFS_DECOMPOSITION_MODEL"],
    ),
    "BFSDecomposeLayers": (
        {
            "decomposition_model": "BFS_DECOMPOSITION_MODEL",
            "image": "IMAGE",
            "mask": "MASK",
            "positive": "CONDITIONING",
            "vae": "VAE",
            "rgba_vae": "BFS_RGBA_VAE",
            "edge": "IMAGE",
            "segmentation": "IMAGE",
            "depth": "IMAGE",
            "seed": "INT",
            "box": "STRING",
        },
        ["IMAGE", "MASK", "IMAGE", "MASK"],
    ),
    "BFSLoadToyModel": (
        {},
        ["BFS_MODEL", "VAE", "BFS_RGBA_VAE", "BFS_TOY_TEXT_ENCODER", "CLIP_VISION", "STYLE_MODEL"],
    ),
    "BFSToyTextEncode": ({"text_encoder": "BFS_TOY_TEXT_ENCODER", "text": "COMBO"}, ["CONDITIONING"]),
    "BFSToyBackground": ({"seed": "INT"}, ["IMAGE"]),
}
WIDTH, HEIGHT = 150, 110  # not a multiple of 64: exercises processing size and paste-back


@pytest.fixture(scope="session")
def flux_vae(comfy_models) -> str:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    path = comfy_models / "vae" / "flux_vae_random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path.name


@pytest.fixture(scope="session")
def models(comfy_tiny_models, flux_vae) -> dict[str, str]:
    tiny = comfy_tiny_models
    return {
        "fill": tiny["bfl_bf16"].name,
        "fill_scaled_fp8": tiny["bfl_fp8_scaled"].name,
        "not_fill": tiny["bfl_non_fill"].name,
        "bfs": tiny["bfs_official_pt"].name,
        "bfs_paper": tiny["bfs_paper"].name,
        "vae": flux_vae,
        "release_vae": f"{tiny['rgba_bfs_release_folder'].name}/diffusion_pytorch_model.safetensors",
        "layerdiffuse": tiny["rgba_layerdiffuse_safetensors"].name,
        "decomposition": tiny["decomposition"].name,
    }


def graph(
    m,
    *,
    steps=2,
    text="a red cube",
    image_tokens=0,
    base=None,
    bfs=None,
    rgba=None,
    width=32,
    box=None,
    weight_dtype="fp32",
    prefix="t/scene",
) -> dict:
    x0, y0, x1, y1 = box or (40, 30, 110, 100)
    return {
        "bg": {
            "class_type": "EmptyImage",
            "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1, "color": 0x6688AA},
        },
        "box": {"class_type": "BFSBoxToMask", "inputs": {"image": ["bg", 0], "x0": x0, "y0": y0, "x1": x1, "y1": y1}},
        "model": {
            "class_type": "BFSLoadModel",
            "inputs": {"base_model": base or m["fill"], "bfs_weights": bfs or m["bfs"], "weight_dtype": weight_dtype},
        },
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "text": {
            "class_type": "BFSTestConditioning",
            "inputs": {
                "text": text,
                "width": width,
                "pooled_width": 32,
                "text_tokens": 8,
                "image_tokens": image_tokens,
            },
        },
        "sample": {
            "class_type": "BFSBG2FGSample",
            "inputs": {
                "bfs_model": ["model", 0],
                "background": ["bg", 0],
                "mask": ["box", 0],
                "positive": ["text", 0],
                "vae": ["vae", 0],
                "seed": 3,
                "steps": steps,
                "guidance": 30.0,
                "short_side": 512,
            },
        },
        "rgba_vae": {"class_type": "BFSLoadRGBAVAE", "inputs": {"rgba_vae": rgba or m["release_vae"]}},
        "decode": {
            "class_type": "BFSRGBADecode",
            "inputs": {"rgba_vae": ["rgba_vae", 0], "foreground": ["sample", 0], "vae": ["vae", 0], "tta": False},
        },
        "save_fg": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "t/fg"}},
        "layers": {
            "class_type": "BFSSaveLayers",
            "inputs": {
                "background": ["bg", 0],
                "layer_1": ["decode", 0],
                "names": "cube",
                "format": "psd+ora",
                "filename_prefix": prefix,
            },
        },
    }


def _rgba(comfy, result, node="save_fg") -> np.ndarray:
    image = Image.open(comfy.file_path(result.files(node)[0]))
    assert image.mode == "RGBA"
    return np.asarray(image)


def _ora_layers(path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        stack = z.read("stack.xml").decode()
    return [part.split('"')[0] for part in stack.split('name="')[1:]]


def test_object_info_documents_every_node(comfy_object_info):
    for node_id, (inputs, outputs) in EXPECTED.items():
        info = comfy_object_info[node_id]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, kind in inputs.items():
            spec_kind = specs[name][0]
            assert (spec_kind if isinstance(spec_kind, str) else "COMBO") == kind, (node_id, name)
            assert specs[name][1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert info["output"] == outputs, node_id
        assert info["category"].startswith("BFS/")
    assert comfy_object_info["BFSSaveLayers"]["output_node"] is True
    assert "1 − α" in comfy_object_info["BFSRGBADecode"]["output_tooltips"][1]


def test_bg2fg_decode_save_layers(comfy, models):
    result = comfy.run(graph(models), timeout=300)
    assert result.ok, result.error
    rgba = _rgba(comfy, result)
    assert rgba.shape == (HEIGHT, WIDTH, 4)  # pasted back at the background's own size
    assert rgba[..., 3].std() > 1.0  # a non-trivial alpha
    paths = result.outputs["layers"]["text"]
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["ora", "psd"]
    ora = next(p for p in paths if p.endswith(".ora"))
    assert set(_ora_layers(ora)) == {"Background", "cube"}
    from psd_tools import PSDImage

    psd = PSDImage.open(next(p for p in paths if p.endswith(".psd")))
    assert [layer.name for layer in psd] == ["Background", "cube"] and psd.size == (WIDTH, HEIGHT)


def test_sampler_region_is_the_drawn_masks_bounding_box(comfy, models):
    """The paper's region rule inside ComfyUI: an L-shaped MASK (core SolidMask + MaskComposite) reaches BG2FG
    Sample, whose `region` output must be exactly the L's bounding box (last row / column exclusive)."""
    g = {k: v for k, v in graph(models, steps=1).items() if k in ("bg", "model", "vae", "text", "sample")}
    g["empty"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": WIDTH, "height": HEIGHT}}
    g["bar"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 10, "height": 40}}  # x 40..49, y 30..69
    g["foot"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 50, "height": 10}}  # x 40..89, y 60..69
    g["l1"] = {
        "class_type": "MaskComposite",
        "inputs": {"destination": ["empty", 0], "source": ["bar", 0], "x": 40, "y": 30, "operation": "add"},
    }
    g["l2"] = {
        "class_type": "MaskComposite",
        "inputs": {"destination": ["l1", 0], "source": ["foot", 0], "x": 40, "y": 60, "operation": "add"},
    }
    g["sample"]["inputs"]["mask"] = ["l2", 0]
    g["region_image"] = {"class_type": "MaskToImage", "inputs": {"mask": ["sample", 2]}}
    g["save_region"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["region_image", 0], "filename_prefix": "t/region"},
    }
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    region = np.asarray(Image.open(comfy.file_path(result.files("save_region")[0])).convert("L"))
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[30:70, 40:90] = 255  # the box: rows 30..69, columns 40..89
    assert region.shape == expected.shape and (region == expected).all()


def test_three_additions_by_chaining(comfy, models):
    g = graph(models)
    boxes = [(5, 40, 50, 105), (55, 20, 100, 100), (105, 50, 145, 108)]
    background = ["bg", 0]
    layers = {}
    for i, box in enumerate(boxes):
        s = f"_{i}"
        g[f"box{s}"] = {
            "class_type": "BFSBoxToMask",
            "inputs": {"image": background, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]},
        }
        g[f"sample{s}"] = {
            "class_type": "BFSBG2FGSample",
            "inputs": {**g["sample"]["inputs"], "background": background, "mask": [f"box{s}", 0], "seed": 10 + i},
        }
        g[f"decode{s}"] = {
            "class_type": "BFSRGBADecode",
            "inputs": {**g["decode"]["inputs"], "foreground": [f"sample{s}", 0]},
        }
        g[f"comp{s}"] = {
            "class_type": "BFSCompositeLayer",
            "inputs": {"background": background, "layer": [f"decode{s}", 0]},
        }
        background = [f"comp{s}", 0]
        layers[f"layer_{i + 1}"] = [f"decode{s}", 0]
    for name in ("box", "sample", "decode", "save_fg"):
        del g[name]
    g["layers"]["inputs"] = {
        "background": ["bg", 0],
        **layers,
        "names": "chair, plant, cat",
        "format": "ora",
        "filename_prefix": "t/chain",
    }
    g["final"] = {"class_type": "SaveImage", "inputs": {"images": background, "filename_prefix": "t/chain_final"}}
    result = comfy.run(g, timeout=600)
    assert result.ok, result.error
    (ora,) = result.outputs["layers"]["text"]
    assert _ora_layers(ora) == ["cat", "plant", "chair", "Background"]  # stack.xml lists top first
    final = np.asarray(Image.open(comfy.file_path(result.files("final")[0])).convert("RGB")).astype(int)
    assert final.shape == (HEIGHT, WIDTH, 3) and np.abs(final - [0x66, 0x88, 0xAA]).max() > 10  # layers are in it


def test_extract_foreground(comfy, models, tmp_path):
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "assets"
    photo = Image.open(assets / "photos" / "coffee.png").convert("RGB").resize((WIDTH, HEIGHT))
    stamp = Image.open(sorted((assets / "stamps").glob("*.png"))[0]).convert("RGBA").resize((60, 60))
    composite = photo.copy()
    composite.paste(stamp, (45, 30), stamp)
    photo.save(tmp_path / "bg.png")
    composite.save(tmp_path / "comp.png")
    g = graph(models)
    g["bg"] = {"class_type": "LoadImage", "inputs": {"image": comfy.upload_image(tmp_path / "bg.png")}}
    g["comp"] = {"class_type": "LoadImage", "inputs": {"image": comfy.upload_image(tmp_path / "comp.png")}}
    g["sample"] = {"class_type": "BFSExtractForeground", "inputs": {**g["sample"]["inputs"], "composite": ["comp", 0]}}
    g["layers"]["inputs"]["format"] = "psd"
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    rgba = _rgba(comfy, result)
    assert rgba.shape == (HEIGHT, WIDTH, 4) and rgba[..., 3].std() > 1.0


def test_redux_style_conditioning_changes_the_layer(comfy, models):
    plain = comfy.run(graph(models, text="redux", prefix="t/plain"), timeout=300)
    redux = comfy.run(graph(models, text="redux", image_tokens=24, prefix="t/redux"), timeout=300)
    assert plain.ok and redux.ok, (plain.error, redux.error)
    assert np.abs(_rgba(comfy, plain).astype(int) - _rgba(comfy, redux).astype(int)).max() > 0


def test_one_model_feeding_two_samplers_is_not_altered(comfy, models):
    g = graph(models, text="shared")
    g["sample_b"] = {"class_type": "BFSBG2FGSample", "inputs": dict(g["sample"]["inputs"])}
    g["decode_b"] = {"class_type": "BFSRGBADecode", "inputs": {**g["decode"]["inputs"], "foreground": ["sample_b", 0]}}
    g["save_b"] = {"class_type": "SaveImage", "inputs": {"images": ["decode_b", 0], "filename_prefix": "t/fg_b"}}
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    assert np.array_equal(_rgba(comfy, result), _rgba(comfy, result, "save_b"))


def test_other_weight_formats_and_decoders(comfy, models):
    g = graph(
        models,
        base=models["fill_scaled_fp8"],
        bfs=models["bfs_paper"],
        rgba=models["layerdiffuse"],
        weight_dtype="fp8_e4m3fn",
        prefix="t/formats",
    )
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    assert _rgba(comfy, result).shape == (HEIGHT, WIDTH, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(width=48), "Text conditioning must be [batch, tokens, 32]"),
        (dict(base="not_fill"), "BFS needs FLUX.1-Fill-dev"),
        (dict(box=(200, 30, 260, 100)), "outside"),
        (dict(rgba="layerdiffuse", no_vae=True), "needs the Flux VAE"),
        (dict(latent="sd"), "must be a Flux LATENT with 16 channels"),
    ],
    ids=["conditioning-width", "not-fill", "empty-region", "layerdiffuse-without-vae", "wrong-latent"],
)
def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(comfy, models, change, message):
    change = dict(change)
    no_vae, latent = change.pop("no_vae", False), change.pop("latent", None)
    if "base" in change:
        change["base"] = models[change["base"]]
    if "rgba" in change:
        change["rgba"] = models[change["rgba"]]
    g = graph(models, **change)
    if no_vae:
        del g["decode"]["inputs"]["vae"]
    if latent:
        g["sd"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        g["decode"]["inputs"]["foreground"] = ["sd", 0]
    result = comfy.run(g, timeout=300)
    assert result.status == "error" and message in result.error.exception_message, result.error
    ok = comfy.run(
        {
            "a": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "b": {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}},
        },
        timeout=60,
    )
    assert ok.ok


def test_interrupt_stops_sampling_promptly(comfy, models):
    g = graph(models, steps=200, text="long run", prefix="t/long")
    g["bg"]["inputs"].update(
        width=512, height=512
    )  # ~1000 tokens per branch: the 200 steps take far longer than the test
    prompt_id = comfy.queue_prompt(g)
    deadline = time.monotonic() + 60
    while not comfy.queue()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # loading done, sampling under way
    start = time.monotonic()
    comfy.interrupt()
    result = comfy.wait(prompt_id, timeout=120)
    assert result.status == "interrupted", result.status
    assert time.monotonic() - start < 20
    assert not result.files("save_fg")  # nothing downstream ran


def test_decompose_layers(comfy, models):
    g = graph(models)
    g = {k: g[k] for k in ("bg", "box", "vae", "text", "rgba_vae")}
    g["depth"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1, "color": 0x808080},
    }
    g["model"] = {
        "class_type": "BFSLoadDecomposition",
        "inputs": {"base_model": models["fill"], "weights": models["decomposition"], "weight_dtype": "fp32"},
    }
    g["decompose"] = {
        "class_type": "BFSDecomposeLayers",
        "inputs": {
            "decomposition_model": ["model", 0],
            "image": ["bg", 0],
            "mask": ["box", 0],
            "positive": ["text", 0],
            "vae": ["vae", 0],
            "rgba_vae": ["rgba_vae", 0],
            "depth": ["depth", 0],
            "seed": 0,
            "steps": 2,
            "guidance": 30.0,
            "short_side": 512,
        },
    }
    g["save_fg"] = {"class_type": "SaveImage", "inputs": {"images": ["decompose", 0], "filename_prefix": "t/dfg"}}
    g["save_bg"] = {"class_type": "SaveImage", "inputs": {"images": ["decompose", 2], "filename_prefix": "t/dbg"}}
    result = comfy.run(g, timeout=300)
    assert result.ok, result.error
    assert _rgba(comfy, result).shape == (HEIGHT, WIDTH, 4)
    background = np.asarray(Image.open(comfy.file_path(result.files("save_bg")[0])).convert("RGB")).astype(int)
    assert background.shape == (HEIGHT, WIDTH, 3)
    # Outside the (slightly grown) mask the background keeps the input's own pixels at native resolution.
    assert np.abs(background[:20, :20] - [0x66, 0x88, 0xAA]).max() <= 1


def test_toy_vae_works_with_stock_vae_nodes(comfy):
    """The toy VAE behind ComfyUI's VAE interface: stock VAEEncode -> VAEDecode reproduces the toy background."""
    from bfs_core.toy.demo import background_image

    g = {
        "bg": {"class_type": "BFSToyBackground", "inputs": {"seed": 5}},
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["bg", 0], "vae": ["toy", 1]}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["toy", 1]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "t/toy_vae"}},
        "save_bg": {"class_type": "SaveImage", "inputs": {"images": ["bg", 0], "filename_prefix": "t/toy_bg"}},
    }
    result = comfy.run(g, timeout=120)
    assert result.ok, result.error
    background = np.asarray(Image.open(comfy.file_path(result.files("save_bg")[0]))).astype(np.float32) / 255
    expected = background_image(5)[0].permute(1, 2, 0).numpy()
    assert np.abs(background - expected).max() <= 1 / 255  # the node's image is the demo's background
    decoded = np.asarray(Image.open(comfy.file_path(result.files("save")[0]))).astype(np.float32) / 255
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded - background).mean() < 0.03  # a trained autoencoder's round trip, not noise
