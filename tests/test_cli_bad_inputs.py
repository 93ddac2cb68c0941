"""The bad-input sweep of the command line: every case gets exit code 2 and one line on stderr that names the input
and says how to fix it — never a traceback.

`CASES` is the table (id, command line, expected message fragment, what the message must name). Command lines use
`{placeholders}` for the files of the `files` fixture: the tiny model set (`bfs_core.tiny.write_tiny_set`) plus
broken copies of it. Cases run in-process through `bfs_core.__main__.main(argv)`; a few also run as a real
`python -m bfs_core` process to prove the exit code and the missing traceback end to end.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bfs_core.__main__ import main


REPO = Path(__file__).resolve().parents[1]


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _sd_vae():
    """An SD1.5-style AutoencoderKL (RGB, 4 latent channels, no shift factor) at tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
    )


class _Refused:  # any object besides tensors makes torch.load(weights_only=True) refuse the file
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from bfs_core.tiny import write_tiny_set

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs")
    tiny = write_tiny_set(root / "tiny")
    bad = root / "bad"
    bad.mkdir()
    f = {k: Path(v) for k, v in tiny.items()}
    f["bg"] = bad / "bg.png"
    Image.new("RGB", (96, 80), (100, 150, 200)).save(f["bg"])
    f["layer"] = bad / "layer.png"
    Image.new("RGBA", (96, 80), (200, 50, 50, 128)).save(f["layer"])
    f["small_png"] = bad / "small.png"
    Image.new("L", (10, 10), 255).save(f["small_png"])
    f["black_mask"] = bad / "black_mask.png"
    Image.new("L", (96, 80), 0).save(f["black_mask"])
    f["text_png"] = bad / "notes.png"
    f["text_png"].write_text("not an image")
    f["empty_png"] = bad / "empty.png"
    f["empty_png"].write_bytes(b"")
    f["missing"] = bad / "missing.png"
    f["folder"] = bad / "a_folder"
    f["folder"].mkdir()
    f["proc_out"] = Path("/proc/bfs_out")
    f["under_file"] = f["bg"] / "out"

    # Broken weights files: truncated, random bytes, empty, an image renamed, a refused pickle.
    f["trunc_base"] = _truncate(f["bfl_bf16"], bad / "flux1-fill-truncated.safetensors")
    f["random_base"] = bad / "random.safetensors"
    f["random_base"].write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    f["empty_st"] = bad / "empty.safetensors"
    f["empty_st"].write_bytes(b"")
    f["png_st"] = bad / "picture.safetensors"
    shutil.copy(f["bg"], f["png_st"])
    f["trunc_bfs"] = _truncate(f["bfs_release"], bad / "bfs-truncated.safetensors")
    f["trunc_pt"] = _truncate(f["bfs_official_pt"], bad / "trained_weights_truncated.pt")
    f["pickle_pt"] = bad / "trained_weights_pickle.pt"
    torch.save({"x": torch.zeros(2), "extra": _Refused()}, f["pickle_pt"])
    f["trunc_rgba"] = _truncate(f["rgba_bfs_release_single"], bad / "rgba-truncated.safetensors")
    f["trunc_pth"] = _truncate(f["rgba_layerdiffuse_pth"], bad / "TransparentVAE_truncated.pth")
    f["trunc_decomp"] = _truncate(f["decomposition"], bad / "decomposition-truncated.safetensors")
    f["trunc_latent"] = bad / "latent-truncated.safetensors"
    save_file({"latent": torch.zeros(1, 16, 4, 4)}, str(f["trunc_latent"]), metadata={"space": "flux_normalized"})
    _truncate(f["trunc_latent"], f["trunc_latent"])
    f["latent"] = bad / "fg_latent.safetensors"
    save_file({"latent": torch.zeros(1, 16, 4, 4)}, str(f["latent"]), metadata={"space": "flux_normalized"})

    # Broken folders: the Flux VAE and the text encoders with a truncated weights file inside.
    f["trunc_vae_dir"] = bad / "vae-truncated"
    shutil.copytree(f["vae"], f["trunc_vae_dir"])
    _truncate(
        f["vae"] / "diffusion_pytorch_model.safetensors", f["trunc_vae_dir"] / "diffusion_pytorch_model.safetensors"
    )
    f["trunc_te_dir"] = bad / "text-encoders-truncated"
    f["trunc_te_dir"].mkdir()
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(f["text_encoders"] / sub, f["trunc_te_dir"] / sub)
    _truncate(
        f["text_encoders"] / "text_encoder_2" / "model.safetensors",
        f["trunc_te_dir"] / "text_encoder_2" / "model.safetensors",
    )

    # Files of the wrong model family: an SD1.5-style VAE (folder and single file).
    vae = _sd_vae()
    f["sd_vae_dir"] = bad / "sd15-vae"
    vae.save_pretrained(f["sd_vae_dir"])
    f["sd_vae_st"] = bad / "sd15-vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(f["sd_vae_st"]))

    return f


def _generate(**over: str) -> str:
    args = {
        "base": "{bfl_bf16}",
        "bfs": "{bfs_release}",
        "vae": "{vae}",
        "text-encoders": "{text_encoders}",
        "background": "{bg}",
        "box": "10,20,60,70",
        "prompt": "'a red cube'",
        "steps": "1",
        "dtype": "fp32",
        "out": "{out}",
    }
    args.update({k.replace("_", "-"): v for k, v in over.items()})
    return "generate " + " ".join(f"--{k} {v}" for k, v in args.items() if v is not None)


def _rgba_decode(**over: str) -> str:
    args = {"vae": "{rgba_bfs_release_folder}", "latent": "{latent}", "out": "{out}/fg.png"}
    args.update({k.replace("_", "-"): v for k, v in over.items()})
    return "rgba-decode " + " ".join(f"--{k} {v}" for k, v in args.items() if v is not None)


def _decompose(**over: str) -> str:
    args = {
        "base": "{bfl_bf16}",
        "weights": "{decomposition}",
        "vae": "{vae}",
        "rgba-vae": "{rgba_bfs_release_folder}",
        "text-encoders": "{text_encoders}",
        "image": "{bg}",
        "mask": "{layer}",
        "steps": "1",
        "dtype": "fp32",
        "out": "{out}",
    }
    args.update({k.replace("_", "-"): v for k, v in over.items()})
    return "decompose " + " ".join(f"--{k} {v}" for k, v in args.items() if v is not None)


# (id, command line, expected fragment of the message, what the message must name)
CASES = [
    # generate: the inputs the user types
    ("gen-missing-background", _generate(background="{missing}"), "does not exist", "{missing}"),
    ("gen-text-file-background", _generate(background="{text_png}"), "is not an image", "{text_png}"),
    ("gen-empty-background", _generate(background="{empty_png}"), "the file is empty", "{empty_png}"),
    ("gen-folder-background", _generate(background="{folder}"), "is a folder", "{folder}"),
    ("gen-box-three-numbers", _generate(box="1,2,3"), "four integers", "--box"),
    ("gen-cache-threshold-word", _generate(cache_threshold="quick"), "a number >= 0 or 'fast'", "--cache-threshold"),
    ("gen-cache-threshold-negative", _generate(cache_threshold="-1"), "a number >= 0", "--cache-threshold"),
    ("gen-box-letters", _generate(box="a,b,c,d"), "four integers", "--box"),
    ("gen-box-inverted", _generate(box="50,20,10,70"), "empty or inverted", "--box"),
    ("gen-box-outside", _generate(box="10,20,500,70"), "reaches outside the 96×80 image", "--box"),
    (
        "gen-mask-wrong-size",
        _generate(box=None, mask="{small_png}"),
        "is 10×10 but the background is 96×80",
        "{small_png}",
    ),
    ("gen-mask-empty", _generate(box=None, mask="{black_mask}"), "has no white pixel", "{black_mask}"),
    ("gen-mask-missing", _generate(box=None, mask="{missing}"), "does not exist", "{missing}"),
    ("gen-out-is-a-file", _generate(out="{bg}"), "is a file", "{bg}"),
    ("gen-out-in-proc", _generate(out="{proc_out}"), "inside /proc", "{proc_out}"),
    ("gen-out-under-a-file", _generate(out="{under_file}"), "is a file, not a folder", "{under_file}"),
    # generate: every model flag, with missing, truncated, corrupt and wrong-family files
    ("gen-base-missing", _generate(base="{missing}"), "does not exist", "{missing}"),
    (
        "gen-base-truncated",
        _generate(base="{trunc_base}"),
        "not a complete safetensors file (incomplete metadata",
        "{trunc_base}",
    ),
    ("gen-base-random-bytes", _generate(base="{random_base}"), "not a complete safetensors file", "{random_base}"),
    ("gen-base-empty", _generate(base="{empty_st}"), "(the file is empty): re-download it", "{empty_st}"),
    ("gen-base-png-renamed", _generate(base="{png_st}"), "(it is a PNG image)", "{png_st}"),
    ("gen-base-sd-vae", _generate(base="{sd_vae_st}"), "` is not a FLUX transformer", "`--base`: `{sd_vae_st}"),
    ("gen-base-flux-dev", _generate(base="{bfl_non_fill}"), "BFS needs FLUX.1-Fill-dev", "`--base`: `{bfl_non_fill}"),
    ("gen-bfs-missing", _generate(bfs="{missing}"), "does not exist", "{missing}"),
    ("gen-bfs-truncated", _generate(bfs="{trunc_bfs}"), "not a complete safetensors file", "{trunc_bfs}"),
    ("gen-bfs-truncated-pt", _generate(bfs="{trunc_pt}"), "not a readable PyTorch weights file", "{trunc_pt}"),
    ("gen-bfs-refused-pickle", _generate(bfs="{pickle_pt}"), "refuses to load", "{pickle_pt}"),
    ("gen-bfs-decomposition-file", _generate(bfs="{decomposition}"), "is not a BFS weights file", "{decomposition}"),
    ("gen-vae-sd15", _generate(vae="{sd_vae_dir}"), "is an SD1.5/SDXL-style VAE", "{sd_vae_dir}"),
    ("gen-vae-rgba", _generate(vae="{rgba_bfs_release_folder}"), "is an RGBA VAE", "{rgba_bfs_release_folder}"),
    (
        "gen-vae-truncated",
        _generate(vae="{trunc_vae_dir}"),
        "could not be read as a diffusers AutoencoderKL",
        "{trunc_vae_dir}",
    ),
    ("gen-vae-a-file", _generate(vae="{sd_vae_st}"), "is a file", "{sd_vae_st}"),
    (
        "gen-text-encoders-truncated",
        _generate(text_encoders="{trunc_te_dir}"),
        "could not be read as the T5-XXL",
        "--text-encoders",
    ),
    ("gen-text-encoders-wrong-folder", _generate(text_encoders="{vae}"), "lacks", "--text-encoders"),
    ("gen-rgba-vae-truncated", _generate(rgba_vae="{trunc_rgba}"), "not a complete safetensors file", "{trunc_rgba}"),
    ("gen-rgba-vae-sd15-file", _generate(rgba_vae="{sd_vae_st}"), "is not an RGBA VAE", "{sd_vae_st}"),
    ("gen-rgba-vae-sd15-folder", _generate(rgba_vae="{sd_vae_dir}"), "is not an RGBA VAE", "{sd_vae_dir}"),
    # rgba-decode
    ("rgba-vae-sd15-file", _rgba_decode(vae="{sd_vae_st}"), "(an SD1.5/SDXL-style RGB VAE)", "{sd_vae_st}"),
    ("rgba-vae-sd15-folder", _rgba_decode(vae="{sd_vae_dir}"), "is not an RGBA VAE", "{sd_vae_dir}"),
    ("rgba-vae-truncated", _rgba_decode(vae="{trunc_rgba}"), "not a complete safetensors file", "{trunc_rgba}"),
    ("rgba-vae-truncated-pth", _rgba_decode(vae="{trunc_pth}"), "not a readable PyTorch weights file", "{trunc_pth}"),
    ("rgba-vae-png-renamed", _rgba_decode(vae="{png_st}"), "(it is a PNG image)", "{png_st}"),
    (
        "rgba-vae-bfs-file",
        _rgba_decode(vae="{bfs_release}"),
        "neither a BFS release transparency VAE",
        "{bfs_release}",
    ),
    ("rgba-latent-missing", _rgba_decode(latent="{missing}"), "must be an existing .safetensors file", "{missing}"),
    (
        "rgba-latent-truncated",
        _rgba_decode(latent="{trunc_latent}"),
        "not a complete safetensors file",
        "{trunc_latent}",
    ),
    ("rgba-latent-is-weights", _rgba_decode(latent="{bfs_release}"), "`--latent` file", "{bfs_release}"),
    ("rgba-out-is-a-folder", _rgba_decode(out="{folder}"), "is a folder", "{folder}"),
    ("rgba-out-wrong-suffix", _rgba_decode(out="{out}/fg.jpg"), "must end in .png", "--out"),
    (
        "rgba-flux-vae-sd15",
        _rgba_decode(vae="{rgba_layerdiffuse_safetensors}", flux_vae="{sd_vae_dir}"),
        "is an SD1.5/SDXL-style VAE",
        "{sd_vae_dir}",
    ),
    (
        "rgba-layerdiffuse-without-rgb",
        _rgba_decode(vae="{rgba_layerdiffuse_safetensors}"),
        "pass --rgb",
        "{rgba_layerdiffuse_safetensors}",
    ),
    # convert
    ("convert-refused-pickle", "convert {pickle_pt} {out}/bfs.safetensors", "refuses to load", "{pickle_pt}"),
    ("convert-truncated-pt", "convert {trunc_pt} {out}/bfs.safetensors", "not a readable PyTorch", "{trunc_pt}"),
    ("convert-missing", "convert {missing} {out}/bfs.safetensors", "does not exist", "{missing}"),
    ("convert-wrong-output-suffix", "convert {bfs_official_pt} {out}/bfs.pt", "must end in .safetensors", "output"),
    ("convert-output-in-proc", "convert {bfs_official_pt} /proc/bfs.safetensors", "inside /proc", "/proc/bfs"),
    # convert-rgba-vae
    (
        "convert-rgba-refused-pickle",
        "convert-rgba-vae {pickle_pt} --out {out}/t.safetensors",
        "refuses to load",
        "{pickle_pt}",
    ),
    (
        "convert-rgba-truncated",
        "convert-rgba-vae {trunc_pth} --out {out}/t.safetensors",
        "not a readable PyTorch",
        "{trunc_pth}",
    ),
    # save-layers
    ("save-layers-missing-layer", "save-layers {bg} {missing} --out {out}/s.psd", "does not exist", "{missing}"),
    ("save-layers-text-layer", "save-layers {bg} {text_png} --out {out}/s.psd", "is not an image", "{text_png}"),
    ("save-layers-wrong-size", "save-layers {bg} {small_png} --out {out}/s.ora", "`layers` image", "{small_png}"),
    ("save-layers-tif", "save-layers {bg} {layer} --out {out}/s.tif", "must end in .psd or .ora", "--out"),
    ("save-layers-out-in-proc", "save-layers {bg} {layer} --out /proc/s.psd", "inside /proc", "/proc/s.psd"),
    ("save-layers-out-is-a-folder", "save-layers {bg} {layer} --out {folder}", "is a folder", "{folder}"),
    # demo, evaluate-toy, make-tiny: their outputs
    ("demo-out-is-a-file", "demo --out {bg}", "is a file", "{bg}"),
    ("demo-out-in-proc", "demo --out /proc/bfs-demo", "inside /proc", "/proc/bfs-demo"),
    ("evaluate-toy-out-in-proc", "evaluate-toy --count 2 --out /proc/toy", "inside /proc", "/proc/toy.md"),
    ("make-tiny-into-a-file", "make-tiny {bg}", "is a file", "{bg}"),
    # decompose
    ("decompose-cache-threshold-nan", _decompose(cache_threshold="nan"), "a number >= 0", "--cache-threshold"),
    (
        "decompose-weights-truncated",
        _decompose(weights="{trunc_decomp}"),
        "not a complete safetensors file",
        "{trunc_decomp}",
    ),
    (
        "decompose-weights-bfs-file",
        _decompose(weights="{bfs_release}"),
        "is not a decomposition weights file",
        "{bfs_release}",
    ),
    ("decompose-rgba-vae-sd15", _decompose(rgba_vae="{sd_vae_dir}"), "is not an RGBA VAE", "{sd_vae_dir}"),
    ("decompose-mask-wrong-size", _decompose(mask="{small_png}"), "is 10×10 but the image is 96×80", "{small_png}"),
    ("decompose-image-not-image", _decompose(image="{text_png}"), "is not an image", "{text_png}"),
    ("decompose-out-is-a-file", _decompose(out="{bg}"), "is a file", "{bg}"),
]


def _fill(text: str, files: dict[str, Path], out: Path) -> str:
    return text.format(out=out, **{k: str(v) for k, v in files.items()})


def _argv(command: str, files: dict[str, Path], out: Path) -> list[str]:
    return shlex.split(_fill(command, files, out))


def _error_lines(stderr: str) -> list[str]:
    """stderr without log records (`INFO name: ...`) and library progress bars: what the user reads as the error."""
    log_or_progress = re.compile(r"^(INFO|DEBUG) |\d+%\|")
    return [line for line in stderr.splitlines() if line.strip() and not log_or_progress.search(line)]


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 35 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("command", "fragment", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(files, tmp_path, capsys, command, fragment, names):
    out = tmp_path / "out"
    assert main(_argv(command, files, out)) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    message = lines[0]
    assert message.startswith("error: ") and "Traceback" not in message
    assert fragment in message, message
    assert _fill(names, files, out) in message, message
    assert not out.exists(), "a failed run must not leave its --out behind"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bfs_core", *argv], cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs
    )


@pytest.mark.parametrize("case", ["gen-vae-sd15", "convert-refused-pickle"])
def test_a_real_process_exits_2_without_traceback(files, tmp_path, case):
    _, command, fragment, names = next(c for c in CASES if c[0] == case)
    out = tmp_path / "out"
    done = _run(_argv(command, files, out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and fragment in lines[0] and _fill(names, files, out) in lines[0], lines


def test_debug_shows_the_traceback(files, tmp_path, capsys):
    assert main(["--debug", *_argv(_generate(vae="{sd_vae_dir}"), files, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserInputError" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write in. Root ignores permission bits, so as root it is made immutable (chattr +i)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a folder unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(
    "command",
    ["save-layers {bg} {layer} --out {ro}/scene.psd", _generate(out="{ro}/results")],
    ids=["save-layers", "generate"],
)
def test_unwritable_out_is_found_before_any_model_loads(files, read_only_dir, monkeypatch, capsys, command):
    import bfs_core.pipelines.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(bfs_core.pipelines.loading, "load_pipeline", no_loading)
    argv = shlex.split(command.format(ro=read_only_dir, out="unused", **{k: str(v) for k, v in files.items()}))
    assert main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is not writable (" in lines[0] and str(read_only_dir) in lines[0], lines
    assert list(read_only_dir.iterdir()) == []


def test_internal_errors_still_show_a_traceback_and_exit_1(monkeypatch, capsys):
    """A bug (here a TypeError inside a command) is not dressed up as bad input."""
    import bfs_core.cli.make_tiny as make_tiny

    def broken(args):
        return None + 1

    monkeypatch.setattr(make_tiny, "run", broken)
    assert main(["make-tiny", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError" in err and "internal error in `make-tiny`" in err


def test_a_library_value_error_is_an_internal_error(monkeypatch, capsys):
    """Only the pack's own ValueErrors are bad input; one raised inside torch is a bug and keeps its traceback."""
    import bfs_core.cli.make_tiny as make_tiny

    monkeypatch.setattr(make_tiny, "run", lambda args: torch.zeros(2).view(3))
    assert main(["make-tiny", "/nonexistent"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_generate_leaves_no_out_folder_when_writing_fails(files, tmp_path, monkeypatch, capsys):
    """The run gets all the way to writing; the first write fails; the folder it created is removed again."""
    import bfs_core.models.rgba_vae as rgba_vae

    def full_disk(path, latent):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(rgba_vae, "save_latent_file", full_disk)
    out = tmp_path / "new" / "out"
    assert main(_argv(_generate(), files, out)) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert not out.exists() and not out.parent.exists()
