"""The headless commands, run as a user runs them (`python -m bfs_core ...`), on the tiny model set."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from bfs_core.bench import CPU_BENCH_CONFIG, BenchShape, step_flops
from bfs_core.models.dual_flux import DualBranchConfig


REPO = Path(__file__).resolve().parents[1]


def bfs(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bfs_core", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny")
    lines = [line.split(": ", 1) for line in bfs("make-tiny", str(out)).splitlines() if ": " in line]
    return {name: Path(path) for name, path in lines}


def test_make_tiny_writes_every_format(tiny):
    expected = {
        "diffusers",
        "bfl_bf16",
        "bfl_fp8",
        "bfl_fp8_scaled",
        "bfl_fp8_comfy_quant",
        "bfl_non_fill",
        "vae",
        "text_encoders",
        "bfs_official_pt",
        "bfs_release",
        "bfs_paper",
    }
    assert expected <= set(tiny)
    assert all(path.exists() for path in tiny.values())
    official = torch.load(tiny["bfs_official_pt"], weights_only=True)
    assert all(".attn1n." in k or k.endswith(".conv1n.weight") for k in official)


def test_convert_then_generate_end_to_end(tiny, tmp_path):
    converted = tmp_path / "bfs.safetensors"
    assert "written" in bfs("convert", str(tiny["bfs_official_pt"]), str(converted))
    from PIL import Image

    Image.new("RGB", (96, 80), (100, 150, 200)).save(tmp_path / "bg.png")
    out = bfs(
        "generate",
        "--base",
        str(tiny["bfl_fp8_scaled"]),
        "--vae",
        str(tiny["vae"]),
        "--text-encoders",
        str(tiny["text_encoders"]),
        "--bfs",
        str(converted),
        "--background",
        str(tmp_path / "bg.png"),
        "--box",
        "10,20,60,70",
        "--prompt",
        "a red cube",
        "--steps",
        "2",
        "--dtype",
        "fp32",
        "--rgba-vae",
        str(tiny["rgba_bfs_release_folder"]),
        "--out",
        str(tmp_path / "out"),
    )
    written = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert Image.open(written["composite"]).size == (96, 80)
    foreground = Image.open(written["foreground"])
    assert foreground.mode == "RGBA" and foreground.size == (96, 80)
    mask = torch.from_numpy(np.array(Image.open(written["mask"]))).bool()
    assert mask[20:70, 10:60].all() and mask.sum() == 50 * 50


def test_step_flops_matches_a_hand_count():
    cfg = dict(
        CPU_BENCH_CONFIG,
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=1,
        attention_head_dim=4,
        in_channels=8,
        joint_attention_dim=2,
        out_channels=3,
    )
    shape = BenchShape(text_tokens=2, latent_h=4, latent_w=2)  # 2 image tokens, S = 4, D = 4
    d, s, t, img = 4, 4, 2, 2
    embed = 2 * img * 8 * d + 2 * t * 2 * d + 2 * img * d * 3
    block = 24 * s * d * d + 4 * s * s * d
    plain = embed + 2 * block
    assert step_flops(cfg, shape, None) == plain
    release = DualBranchConfig.release()  # rank 4: LoRA of a D×D projection costs 2·tokens·4·(D + D)
    joint_single = 3 * 2 * s * 4 * 8 + 4 * s * s * d + 2 * s * d * d
    joint_double = 4 * 2 * img * 4 * 8 + 4 * img * img * d + 2 * img * d * d
    assert step_flops(cfg, shape, release) == 2 * (plain + joint_single + joint_double)


def test_requirements_txt_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert listed == [d for d in deps if not d.startswith("torch")]


def _recording_loader(monkeypatch) -> list:
    """Wrap load_rgba_decoder so a test sees every decoder the CLI builds."""
    import bfs_core.models.rgba_vae as rgba_vae

    built, original = [], rgba_vae.load_rgba_decoder

    def load(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rgba_vae, "load_rgba_decoder", load)
    return built


@pytest.mark.parametrize("fmt", ["rgba_bfs_release_folder", "rgba_layerdiffuse_safetensors"])
def test_rgba_decode_honours_dtype(tiny, tmp_path, monkeypatch, fmt):
    """--dtype bf16: the decoder's weights are bf16 and it computes in bf16 (issue 11: it was always fp32)."""
    from PIL import Image

    from bfs_core.__main__ import main
    from bfs_core.models.rgba_vae import save_latent_file

    built = _recording_loader(monkeypatch)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    latent = save_latent_file(tmp_path / "z.safetensors", z)
    Image.new("RGB", (32, 32), (90, 120, 200)).save(tmp_path / "rgb.png")
    argv = [
        "rgba-decode",
        "--vae",
        str(tiny[fmt]),
        "--latent",
        str(latent),
        "--rgb",
        str(tmp_path / "rgb.png"),
        "--no-tta",
        "--out",
        str(tmp_path / "fg.png"),
        "--dtype",
        "bf16",
    ]
    assert main(argv) == 0
    decoder = built[0]
    net = decoder.vae if hasattr(decoder, "vae") else decoder
    dtypes = {p.dtype for p in net.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert Image.open(tmp_path / "fg.png").size == (32, 32)


def test_rgba_decode_computes_in_the_requested_dtype(tiny, tmp_path, monkeypatch):
    from bfs_core.__main__ import main
    from bfs_core.models.rgba_vae import save_latent_file

    built = _recording_loader(monkeypatch)
    seen = []
    import diffusers

    original = diffusers.AutoencoderKL.decode

    def decode(self, z, *args, **kwargs):
        out = original(self, z, *args, **kwargs)
        seen.append((z.dtype, out.sample.dtype))
        return out

    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", decode)
    latent = save_latent_file(tmp_path / "z.safetensors", torch.zeros(1, 16, 4, 4))
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        argv = [
            "rgba-decode",
            "--vae",
            str(tiny["rgba_bfs_release_folder"]),
            "--latent",
            str(latent),
            "--out",
            str(tmp_path / f"fg_{dtype}.png"),
            "--dtype",
            dtype,
        ]
        assert main(argv) == 0
        assert seen == [(expected, expected)], (dtype, seen)
    assert len(built) == 2


def test_decomposition_short_side_default_is_one_constant(tiny, tmp_path, monkeypatch):
    """CLI, pipeline, node and training config agree on the paper's 1024 (issue 11: the CLI and pipeline had 512)."""
    import ast
    import inspect

    import yaml
    from PIL import Image

    from bfs_core.__main__ import main
    from bfs_core.models.layer_decomposition import DEFAULT_SHORT_SIDE
    from bfs_core.pipelines.decomposition import DecompositionPipeline

    assert DEFAULT_SHORT_SIDE == 1024
    assert inspect.signature(DecompositionPipeline.decompose).parameters["short_side"].default == DEFAULT_SHORT_SIDE
    config = yaml.safe_load((REPO / "training" / "configs" / "decompose.yaml").read_text())
    assert config["resolution"] == DEFAULT_SHORT_SIDE
    node_source = ast.parse((REPO / "nodes" / "decompose.py").read_text())
    calls = [c for c in ast.walk(node_source) if isinstance(c, ast.Call) and c.args]
    node_defaults = [
        kw.value
        for c in calls
        if isinstance(c.args[0], ast.Constant) and c.args[0].value == "short_side"
        for kw in c.keywords
        if kw.arg == "default"
    ]
    assert len(node_defaults) == 1 and isinstance(node_defaults[0], ast.Name)
    assert node_defaults[0].id == "DEFAULT_SHORT_SIDE"

    received = []

    class Stop(BaseException):  # not an Exception: main() does not turn it into an exit code
        pass

    def decompose(self, *args, short_side, **kwargs):
        received.append(short_side)
        raise Stop

    monkeypatch.setattr(DecompositionPipeline, "decompose", decompose)
    Image.new("RGB", (40, 32), (90, 120, 200)).save(tmp_path / "image.png")
    Image.new("L", (40, 32), 255).save(tmp_path / "mask.png")
    argv = [
        "decompose",
        "--base",
        str(tiny["bfl_bf16"]),
        "--weights",
        str(tiny["decomposition"]),
        "--vae",
        str(tiny["vae"]),
        "--rgba-vae",
        str(tiny["rgba_bfs_release_folder"]),
        "--text-encoders",
        str(tiny["text_encoders"]),
        "--image",
        str(tmp_path / "image.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--dtype",
        "fp32",
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(Stop):
        main(argv)
    with pytest.raises(Stop):
        main([*argv, "--short-side", "256"])
    assert received == [DEFAULT_SHORT_SIDE, 256]
