"""The loaders' `validate_inputs` on a real ComfyUI server: a missing, truncated or empty model file is reported when
the graph is queued (HTTP 400, `custom_validation_failed` naming the input), not minutes later while it runs.

Each bad file is written into the server's model folders by the test (ComfyUI rescans a folder whose mtime changed).
"""

from __future__ import annotations

import pytest

from .comfy_client import PromptRejected
from .test_bfs_nodes import flux_vae, graph, models  # noqa: F401  (the fixtures are shared)


def _truncate_into(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst.name


def _decomposition_graph(m, base, weights) -> dict:
    g = graph(m)
    g = {k: g[k] for k in ("bg", "box", "vae", "text", "rgba_vae")}
    g["model"] = {
        "class_type": "BFSLoadDecomposition",
        "inputs": {"base_model": base, "weights": weights, "weight_dtype": "fp32"},
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
            "seed": 0,
            "steps": 1,
            "guidance": 30.0,
            "short_side": 512,
        },
    }
    g["save_fg"] = {"class_type": "SaveImage", "inputs": {"images": ["decompose", 0], "filename_prefix": "t/v"}}
    return g


@pytest.fixture(scope="module")
def bad_files(comfy_models, comfy_tiny_models) -> dict[str, str]:
    tiny = comfy_tiny_models
    names = {
        "base_truncated": _truncate_into(
            tiny["bfl_bf16"].path, comfy_models / "diffusion_models" / "fill-cut.safetensors"
        ),
        "bfs_truncated": _truncate_into(tiny["bfs_release"].path, comfy_models / "bfs" / "bfs-cut.safetensors"),
        "decomposition_truncated": _truncate_into(
            tiny["decomposition"].path, comfy_models / "bfs" / "decomposition-cut.safetensors"
        ),
    }
    (comfy_models / "bfs" / "TransparentVAE_empty.pth").write_bytes(b"")
    names["rgba_empty"] = "TransparentVAE_empty.pth"
    return names


CASES = [
    # (id, node key in the graph, change, expected fragment)
    (
        "bfs-missing",
        "model",
        lambda m, b: graph(m, bfs="gone.safetensors"),
        "`bfs_weights`: 'gone.safetensors' is not in models/bfs",
    ),
    ("bfs-truncated", "model", lambda m, b: graph(m, bfs=b["bfs_truncated"]), "`bfs_weights` file"),
    ("base-missing", "model", lambda m, b: graph(m, base="gone-fill.safetensors"), "`base_model`: 'gone-fill"),
    ("base-truncated", "model", lambda m, b: graph(m, base=b["base_truncated"]), "not a complete safetensors file"),
    (
        "rgba-missing",
        "rgba_vae",
        lambda m, b: graph(m, rgba="gone.pth"),
        "`rgba_vae`: 'gone.pth' is not in models/bfs",
    ),
    ("rgba-empty", "rgba_vae", lambda m, b: graph(m, rgba=b["rgba_empty"]), "(the file is empty)"),
    (
        "decomposition-missing",
        "model",
        lambda m, b: _decomposition_graph(m, m["fill"], "gone.safetensors"),
        "`weights`: 'gone.safetensors' is not in models/bfs",
    ),
    (
        "decomposition-truncated",
        "model",
        lambda m, b: _decomposition_graph(m, m["fill"], b["decomposition_truncated"]),
        "not a complete safetensors file",
    ),
    (
        "decomposition-base-missing",
        "model",
        lambda m, b: _decomposition_graph(m, "gone.safetensors", m["decomposition"]),
        "`base_model`: 'gone.safetensors'",
    ),
]


@pytest.mark.parametrize(("node", "make", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_model_file_is_refused_when_queued(comfy, models, bad_files, node, make, fragment):  # noqa: F811
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue_prompt(make(models, bad_files))
    errors = rejected.value.node_errors[node]["errors"]  # ComfyUI files one error per validated input
    assert {e["type"] for e in errors} == {"custom_validation_failed"}, errors
    assert all(fragment in e["details"] for e in errors), errors
    assert not comfy.queue()["queue_pending"]  # nothing was queued


def test_good_files_still_validate_and_run(comfy, models, bad_files):  # noqa: F811
    """The same graphs with the good files are accepted (validate_inputs returns True) and run."""
    result = comfy.run(graph(models, prefix="t/validated"), timeout=300)
    assert result.ok, result.error
    toy = {
        "toy": {"class_type": "BFSLoadToyModel", "inputs": {}},
        "bg": {"class_type": "BFSToyBackground", "inputs": {"seed": 3}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["bg", 0], "vae": ["toy", 1]}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["toy", 1]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
    }
    assert comfy.run(toy, timeout=120).ok  # no file inputs: nothing to check at queue time, and it still runs


def test_an_sd_vae_as_the_flux_vae_is_named(comfy, models, comfy_models):  # noqa: F811
    """An SD1.5-style VAE (4 latent channels) loaded by the stock Load VAE and wired into BG2FG Sample."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    path = comfy_models / "vae" / "sd15_vae_random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}, str(path))
    g = graph(models, prefix="t/sdvae")
    g["vae"]["inputs"]["vae_name"] = path.name
    result = comfy.run(g, timeout=300)
    assert result.status == "error" and result.error.node_type == "BFSBG2FGSample", result.error
    assert "`vae` must be the Flux VAE (16 latent channels" in result.error.exception_message
    assert "but has 4 latent channels" in result.error.exception_message


def test_an_sd_vae_as_the_rgba_vae_is_named(comfy, models, comfy_models):  # noqa: F811
    """An SD1.5-style VAE file picked in Load RGBA VAE: refused as 'not an RGBA VAE', not asked for scaling factors."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    path = comfy_models / "bfs" / "sd15_vae_tiny.safetensors"
    torch.manual_seed(0)
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    result = comfy.run(graph(models, rgba=path.name, prefix="t/sdrgba"), timeout=300)
    assert result.status == "error" and result.error.node_type == "BFSLoadRGBAVAE", result.error
    message = result.error.exception_message
    assert "`rgba_vae` file" in message and "is not an RGBA VAE" in message and "SD1.5/SDXL-style" in message
    assert "scaling_factor" not in message
