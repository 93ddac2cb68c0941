"""ComfyUI's `.latent` files (bfs_core/latent_files.py): the convention, round trips, files written and read by the
real ComfyUI Save Latent / Load Latent code, the decode through `rgba-decode`, and the errors for wrong files."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_pipeline import _import_nodes_common

from bfs_core.errors import UserInputError
from bfs_core.latent_files import (
    comfy_from_normalized,
    load_comfy_latent,
    normalized_from_comfy,
    read_latent,
    save_comfy_latent,
)
from bfs_core.models.rgba_vae import save_latent_file


COMFY_ROOT = Path(os.environ.get("BFS_COMFY_ROOT", Path.home() / ".cache" / "bfs-comfyui"))
COMFY_PYTHON = COMFY_ROOT / "venv" / "bin" / "python"


def _latent(seed: int = 0, shape=(2, 16, 4, 6)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def node_conversions(monkeypatch):
    """nodes/common.py's raw_from_normalized / normalized_from_raw: what the nodes hand ComfyUI and take from it."""
    common = _import_nodes_common(monkeypatch)
    return common.raw_from_normalized, common.normalized_from_raw


def test_file_holds_comfyui_raw_latents(node_conversions):
    """`latent_tensor` is the raw VAE latent a ComfyUI LATENT holds: normalised 0 -> shift, 1 -> 1/scale + shift."""
    raw_from_normalized, normalized_from_raw = node_conversions
    z = torch.zeros(1, 16, 2, 2)
    z[0, 1] = 1.0
    z[0, 2] = 0.3611
    raw = comfy_from_normalized(z)
    assert torch.equal(raw, raw_from_normalized(z))  # the nodes' conversion, bit for bit
    assert raw[0, 0, 0, 0].item() == pytest.approx(0.1159, abs=1e-7)
    assert raw[0, 1, 0, 0].item() == pytest.approx(1 / 0.3611 + 0.1159, abs=1e-6)
    assert raw[0, 2, 0, 0].item() == pytest.approx(1.1159, abs=1e-6)
    assert torch.equal(normalized_from_comfy(raw), normalized_from_raw(raw))


def test_round_trip_is_the_identity_on_values(tmp_path):
    z = _latent() * 3
    path = save_comfy_latent(tmp_path / "fg.latent", z)
    stored = load_file(str(path))
    assert set(stored) == {"latent_tensor", "latent_format_version_0"}
    assert stored["latent_tensor"].dtype == torch.float32 and stored["latent_format_version_0"].numel() == 0
    assert torch.equal(stored["latent_tensor"], comfy_from_normalized(z))
    back = load_comfy_latent(path)
    # float32 rounding of the two affine maps only: a few ulps of the raw value
    assert (back - z).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * (z.abs().max().item() + 1)
    assert torch.equal(read_latent(path), back)
    pack = save_latent_file(tmp_path / "fg.safetensors", z)
    assert torch.equal(read_latent(pack), z)


_COMFY_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "ComfyUI"))
from comfy.cli_args import args
args.cpu = True
import folder_paths
out_dir, ours = sys.argv[2], sys.argv[3]
folder_paths.set_output_directory(out_dir)
folder_paths.set_input_directory(os.path.dirname(ours))
import torch
from safetensors.torch import load_file, save_file
import nodes
raw = load_file(os.path.join(out_dir, "raw.safetensors"))["raw"]
saved = nodes.SaveLatent().save({"samples": raw}, filename_prefix="bfs", prompt={"1": {"class_type": "BFS"}})
loaded = nodes.LoadLatent().load(os.path.basename(ours))[0]["samples"]
save_file({"samples": loaded.contiguous()}, os.path.join(out_dir, "loaded.safetensors"))
print(json.dumps(saved["ui"]["latents"][0]))
"""


@pytest.fixture(scope="module")
def comfy_round_trip(tmp_path_factory):
    """Run ComfyUI's own SaveLatent on a raw latent and its LoadLatent on a file this pack wrote."""
    if not COMFY_PYTHON.exists():
        pytest.skip(f"the ComfyUI test environment is not built ({COMFY_PYTHON} missing: scripts/comfyui_env.sh)")
    out = tmp_path_factory.mktemp("comfy")
    raw = comfy_from_normalized(_latent(1, (1, 16, 4, 4)))
    save_file({"raw": raw}, str(out / "raw.safetensors"))
    z_ours = _latent(2, (1, 16, 4, 4))
    (out / "input").mkdir()
    ours = save_comfy_latent(out / "input" / "ours.latent", z_ours)
    done = subprocess.run(
        [str(COMFY_PYTHON), "-c", _COMFY_SCRIPT, str(COMFY_ROOT), str(out), str(ours)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "raw": raw,
        "comfy_file": out / saved["subfolder"] / saved["filename"],
        "z_ours": z_ours,
        "loaded": load_file(str(out / "loaded.safetensors"))["samples"],
    }


def test_comfyui_load_latent_reads_our_file_as_the_nodes_latent(comfy_round_trip, node_conversions):
    raw_from_normalized = node_conversions[0]
    # What ComfyUI's Load Latent hands the graph is exactly what the pack's nodes give ComfyUI for this latent.
    assert torch.equal(comfy_round_trip["loaded"], raw_from_normalized(comfy_round_trip["z_ours"]))


def test_comfyui_save_latent_file_decodes_like_the_pack_latent(comfy_round_trip, node_conversions, tmp_path):
    normalized_from_raw = node_conversions[1]
    from bfs_core.__main__ import main
    from bfs_core.tiny.rgba_vae import write_tiny_rgba_vaes

    raw, comfy_file = comfy_round_trip["raw"], comfy_round_trip["comfy_file"]
    assert comfy_file.suffix == ".latent"
    z = normalized_from_raw(raw)  # the pack's latent for this LATENT, as its nodes compute it
    assert torch.equal(read_latent(comfy_file, "--latent"), z)
    pack_file = save_latent_file(tmp_path / "fg_latent.safetensors", z)
    vae = write_tiny_rgba_vaes(tmp_path / "vae")["bfs_release_folder"]
    pngs = []
    for name, latent in (("comfy", comfy_file), ("pack", pack_file)):
        argv = ["rgba-decode", "--vae", str(vae), "--latent", str(latent), "--out", str(tmp_path / f"{name}.png")]
        assert main(argv) == 0
        pngs.append(np.asarray(Image.open(tmp_path / f"{name}.png")))
    assert pngs[0].shape == (32, 32, 4)
    assert np.array_equal(pngs[0], pngs[1])
    assert pngs[0].std() > 0  # a real decode, not a blank image


def _write(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def test_wrong_files_get_clear_errors(tmp_path, capsys):
    from bfs_core.__main__ import main

    garbage = tmp_path / "garbage.latent"
    garbage.write_bytes(b"not a latent at all" * 10)
    cases = [
        (garbage, "not a complete safetensors file"),
        (_write(tmp_path / "other.latent", {"samples": torch.zeros(1, 16, 2, 2)}), "no `latent_tensor`"),
        (_write(tmp_path / "old.latent", {"latent_tensor": torch.zeros(1, 16, 2, 2)}), "latent_format_version_0"),
        (
            _write(
                tmp_path / "sd.latent",
                {"latent_tensor": torch.zeros(1, 4, 8, 8), "latent_format_version_0": torch.tensor([])},
            ),
            "4 channels: an SD1/SDXL latent",
        ),
        (tmp_path / "missing.latent", "does not exist"),
        (tmp_path / "fg.png", "or a ComfyUI `.latent` file"),
    ]
    for path, message in cases:
        with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
            read_latent(path, "--latent")
    # through the command: exit code 2, one line naming --latent and the file
    from bfs_core.tiny.rgba_vae import write_tiny_rgba_vaes

    vae = write_tiny_rgba_vaes(tmp_path / "vae")["bfs_release_folder"]
    assert (
        main(["rgba-decode", "--vae", str(vae), "--latent", str(cases[2][0]), "--out", str(tmp_path / "x.png")]) == 2
    )
    err = capsys.readouterr().err
    assert "--latent" in err and "old.latent" in err and "latent_format_version_0" in err
    with pytest.raises(ValueError, match="must end in '.latent'"):
        save_comfy_latent(tmp_path / "fg.safetensors", _latent())


def test_generate_writes_comfyui_latents_next_to_its_own(tmp_path, capsys):
    """Headless -> ComfyUI: `generate` writes fg/comp `.latent` files holding its latents; `rgba-decode` decodes the
    `.latent` like the pack's file (the same image up to the float32 rounding of the two conversions)."""
    from bfs_core.__main__ import main
    from bfs_core.tiny.sets import write_tiny_set

    tiny = write_tiny_set(tmp_path / "tiny")
    Image.new("RGB", (48, 40), (100, 150, 200)).save(tmp_path / "bg.png")
    flags = ["--base", str(tiny["diffusers"]), "--bfs", str(tiny["bfs_release"]), "--box", "8,8,24,24"]
    flags += ["--background", str(tmp_path / "bg.png"), "--prompt", "a red cube", "--steps", "2", "--dtype", "fp32"]
    assert main(["generate", *flags, "--out", str(tmp_path / "out")]) == 0
    written = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    for name in ("fg_latent", "comp_latent"):
        ours, comfy = Path(written[name]), Path(written[f"{name}_comfyui"])
        assert comfy == ours.with_suffix(".latent")
        z = read_latent(ours)
        assert z.std() > 0
        err = (read_latent(comfy) - z).abs().max().item()
        assert err <= 4 * torch.finfo(torch.float32).eps * (z.abs().max().item() + 1)
    pngs = []
    for latent in (written["fg_latent"], written["fg_latent_comfyui"]):
        out = tmp_path / f"{Path(latent).suffix[1:]}.png"
        assert (
            main(["rgba-decode", "--vae", str(tiny["rgba_bfs_release_folder"]), "--latent", latent, "--out", str(out)])
            == 0
        )
        pngs.append(np.asarray(Image.open(out)).astype(int))
    assert np.abs(pngs[0] - pngs[1]).max() <= 1
