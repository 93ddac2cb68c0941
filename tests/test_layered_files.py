"""PSD/ORA export read back by readers independent of the writers (own PSD parser, GIMP, pyora, Krita)."""

import io
import pathlib
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bfs_core import layer_math as lm
from bfs_core.layered_files import read_ora, write_layered_file


ASSETS = pathlib.Path(__file__).parent / "assets"
W, H = 160, 100


def stamp_layer(name: str, height: int, left: int, top: int) -> np.ndarray:
    """A real stamp scaled to `height` and pasted as a full-canvas straight RGBA layer (uint8 [H, W, 4])."""
    stamp = Image.open(ASSETS / "stamps" / f"{name}.png").convert("RGBA")
    stamp = stamp.resize((round(stamp.width * height / stamp.height), height), Image.LANCZOS)
    tensor = torch.from_numpy(np.asarray(stamp, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    box = (left, top, left + stamp.width, top + stamp.height)
    layer = lm.uncrop_layer(tensor, box, H, W)[0].permute(1, 2, 0).numpy()
    return np.round(layer * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    bg = Image.open(ASSETS / "photos" / "path_forest_640x400.jpg").convert("RGB").resize((W, H), Image.LANCZOS)
    layers = [("goat", stamp_layer("goat", 80, 20, 10)), ("brown hen", stamp_layer("hen", 60, 70, 35))]
    return np.asarray(bg), layers


def expected_stack(scene) -> list[tuple[str, np.ndarray]]:
    bg, layers = scene
    return [("Background", np.concatenate([bg, np.full((H, W, 1), 255, np.uint8)], -1)), *layers]


def expected_merged(scene) -> np.ndarray:
    stack = [torch.from_numpy(a.astype(np.float64) / 255).permute(2, 0, 1) for _, a in expected_stack(scene)]
    return np.round(lm.composite_stack(stack).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# -- a minimal PSD reader written from Adobe's file-format spec, independent of psd-tools ----------------------


def _unpackbits(data: bytes, size: int) -> bytes:
    out, i = bytearray(), 0
    while len(out) < size:
        n = struct.unpack(">b", data[i : i + 1])[0]
        i += 1
        if n >= 0:
            out += data[i : i + n + 1]
            i += n + 1
        elif n != -128:
            out += data[i : i + 1] * (1 - n)
            i += 1
    return bytes(out)


def read_unicode_name(f: io.BytesIO, end: int) -> str | None:
    """The 'luni' additional layer information (tagged block): a 4-byte count of UTF-16 code units, then UTF-16BE."""
    while f.tell() + 12 <= end:
        signature, key, length = struct.unpack(">4s4sI", f.read(12))
        assert signature in (b"8BIM", b"8B64"), signature
        data = f.read(length)
        if key == b"luni":
            units = struct.unpack(">I", data[:4])[0]
            assert 4 + 2 * units <= length, (units, length)
            return data[4 : 4 + 2 * units].decode("utf-16-be")  # strict: a lone surrogate would fail here
    return None


def read_psd_layers(
    path: pathlib.Path, *, pascal_names: bool = False
) -> tuple[tuple[int, int], list[tuple[str, np.ndarray]]]:
    """(width, height), [(name, RGBA uint8 [H, W, 4] on the canvas)] bottom to top.

    The name is the Unicode one ('luni') where the layer has it, else (or with `pascal_names`) the legacy Pascal one.
    """
    f = io.BytesIO(path.read_bytes())
    sig, version, _, n_channels, height, width, depth, mode = struct.unpack(">4sH6sHIIHH", f.read(26))
    assert sig == b"8BPS" and version == 1 and depth == 8 and mode == 3
    for _ in range(2):  # colour mode data, image resources
        f.seek(struct.unpack(">I", f.read(4))[0], 1)
    f.read(4)  # layer and mask section length
    f.read(4)  # layer info length
    count = abs(struct.unpack(">h", f.read(2))[0])
    records = []
    for _ in range(count):
        top, left, bottom, right, nch = struct.unpack(">iiiiH", f.read(18))
        channels = [struct.unpack(">hI", f.read(6)) for _ in range(nch)]
        f.read(12)  # blend signature, key, opacity, clipping, flags, filler
        extra_end = struct.unpack(">I", f.read(4))[0] + f.tell()
        f.seek(struct.unpack(">I", f.read(4))[0], 1)  # mask data
        f.seek(struct.unpack(">I", f.read(4))[0], 1)  # blending ranges
        length = f.read(1)[0]
        pascal = f.read(length)
        # The Pascal name is padded with zeros to a multiple of 4 bytes, its length byte included.
        assert f.read(-(1 + length) % 4).strip(b"\0") == b""
        unicode_name = read_unicode_name(f, extra_end)
        name = pascal.decode("latin-1") if pascal_names or unicode_name is None else unicode_name
        f.seek(extra_end)
        records.append((name, (top, left, bottom, right), channels))
    layers = []
    for name, (top, left, bottom, right), channels in records:
        h, w = bottom - top, right - left
        canvas = np.zeros((height, width, 4), np.uint8)
        planes = {}
        for channel_id, length in channels:
            start = f.tell()
            compression = struct.unpack(">H", f.read(2))[0]
            if compression == 0:
                plane = f.read(h * w)
            else:
                assert compression == 1
                row_sizes = struct.unpack(f">{h}H", f.read(2 * h))
                plane = b"".join(_unpackbits(f.read(n), w) for n in row_sizes)
            f.seek(start + length)
            planes[channel_id] = np.frombuffer(plane, np.uint8).reshape(h, w)
        canvas[top:bottom, left:right] = np.stack([planes[c] for c in (0, 1, 2, -1)], -1)
        layers.append((name, canvas))
    return (width, height), layers


# -- tests -------------------------------------------------------------------------------------------------------


class TestPSD:
    def test_round_trip_through_independent_parser(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.psd", scene[0], scene[1])
        size, layers = read_psd_layers(path)
        assert size == (W, H)
        expected = expected_stack(scene)
        assert [n for n, _ in layers] == [n for n, _ in expected] == ["Background", "goat", "brown hen"]
        for (name, got), (_, want) in zip(layers, expected):
            assert np.array_equal(got, want), name
        # Real soft alpha edges survived (not a binary mask).
        soft = (layers[1][1][..., 3] > 0) & (layers[1][1][..., 3] < 255)
        assert soft.sum() > 50

    def test_merged_preview(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.psd", scene[0], scene[1])
        merged = np.asarray(Image.open(path).convert("RGB")).astype(int)  # Pillow reads the merged image section
        assert np.abs(merged - expected_merged(scene)[..., :3].astype(int)).max() <= 1

    @pytest.mark.skipif(shutil.which("gimp") is None, reason="GIMP is not installed (Debian package `gimp`)")
    def test_gimp_opens_psd_with_identical_layers(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.psd", scene[0], scene[1])
        out = tmp_path / "gimp"
        out.mkdir()
        # One save per layer, named "<index from top>_<layer name>.png" (GIMP lists layers top first).
        script = f"""
(let* ((image (car (gimp-file-load RUN-NONINTERACTIVE "{path}" "{path}")))
       (layers (vector->list (cadr (gimp-image-get-layers image))))
       (i 0))
  (for-each (lambda (layer)
      (let ((name (string-append "{out}/" (number->string i) "_" (car (gimp-item-get-name layer)) ".png")))
        (file-png-save2 RUN-NONINTERACTIVE image layer name name 0 1 0 0 0 0 0 0 1))
      (set! i (+ i 1)))
    layers)
  (gimp-quit 0))"""
        cmd = ["gimp", "-i", "-d", "-f", "--batch-interpreter=plug-in-script-fu-eval", "-b", script]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        files = sorted(out.glob("*.png"))
        names = [p.stem.split("_", 1)[1] for p in files]
        expected = expected_stack(scene)
        assert names == [n for n, _ in reversed(expected)]
        for file, (name, want) in zip(files, reversed(expected)):
            got = np.asarray(Image.open(file).convert("RGBA"))
            assert got.shape == want.shape and np.array_equal(got, want), name


class TestORA:
    def test_container_follows_spec(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.ora", scene[0], scene[1])
        with zipfile.ZipFile(path) as zf:
            first = zf.infolist()[0]
            assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
            assert zf.read("mimetype") == b"image/openraster"
            names = set(zf.namelist())
            assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= names
            thumb = Image.open(io.BytesIO(zf.read("Thumbnails/thumbnail.png")))
            assert max(thumb.size) <= 256
            merged = np.asarray(Image.open(io.BytesIO(zf.read("mergedimage.png"))).convert("RGBA"))
        assert np.array_equal(merged, expected_merged(scene))
        # The pack's own reader round-trips too.
        assert [n for n, _ in read_ora(path)] == ["Background", "goat", "brown hen"]

    def test_round_trip_through_pyora(self, scene, tmp_path):
        pyora = pytest.importorskip("pyora", reason="pyora (PyPI) is the independent ORA reader")
        path = write_layered_file(tmp_path / "scene.ora", scene[0], scene[1])
        project = pyora.Project.load(str(path))
        assert project.dimensions == (W, H)
        layers = list(project.children)  # pyora lists top first
        expected = expected_stack(scene)
        assert [layer.name for layer in layers] == [n for n, _ in reversed(expected)]
        for layer, (name, want) in zip(layers, reversed(expected)):
            got = np.asarray(layer.get_image_data(raw=True).convert("RGBA"))
            assert np.array_equal(got, want), name

    @pytest.mark.skipif(
        shutil.which("krita") is None or shutil.which("xvfb-run") is None,
        reason="Krita + xvfb-run not installed (Debian `krita`, `xvfb`, `xauth`); GIMP 2.10 in bookworm has no ORA",
    )
    def test_krita_renders_ora_like_our_preview(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.ora", scene[0], scene[1])
        out = tmp_path / "krita.png"
        cmd = ["xvfb-run", "-a", "krita", str(path), "--export", "--export-filename", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=240)
        got = np.asarray(Image.open(out).convert("RGBA")).astype(int)
        assert np.abs(got - expected_merged(scene).astype(int)).max() <= 1


UNICODE_NAMES = ["猫", "Ελληνικά", "🐈‍⬛ black cat 🐾", "Café crème", "a long ASCII name, longer than 31 bytes"]


def unicode_scene(scene) -> list[tuple[str, np.ndarray]]:
    return [(name, scene[1][i % 2][1]) for i, name in enumerate(UNICODE_NAMES)]


class TestUnicodeNames:
    def test_psd_round_trip_through_independent_parser_and_psd_tools(self, scene, tmp_path):
        from psd_tools import PSDImage

        path = write_layered_file(tmp_path / "scene.psd", scene[0], unicode_scene(scene))
        _, layers = read_psd_layers(path)
        assert [n for n, _ in layers] == ["Background", *UNICODE_NAMES]
        assert [layer.name for layer in PSDImage.open(path)] == ["Background", *UNICODE_NAMES]
        for (_, got), (_, want) in zip(layers[1:], unicode_scene(scene)):
            assert np.array_equal(got, want)  # the pixels did not move with the longer tagged blocks

    def test_psd_pascal_fallback_is_ascii_and_at_most_31_bytes(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.psd", scene[0], unicode_scene(scene))
        _, layers = read_psd_layers(path, pascal_names=True)
        assert [n for n, _ in layers] == [
            "Background",
            "?",
            "????????",
            "??? black cat ?",
            "Cafe creme",
            "a long ASCII name, longer than ",
        ]

    def test_emoji_are_surrogate_pairs_in_the_luni_block(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.psd", scene[0], [("🐈", scene[1][0][1])])
        data = path.read_bytes()
        # 'luni', block length, 2 UTF-16 code units (one character outside the BMP), the pair D83D DC08.
        assert b"luni" + struct.pack(">I", 8) + struct.pack(">I", 2) + b"\xd8\x3d\xdc\x08" in data

    def test_ora_round_trip_through_own_reader_and_pyora(self, scene, tmp_path):
        path = write_layered_file(tmp_path / "scene.ora", scene[0], unicode_scene(scene))
        assert [n for n, _ in read_ora(path)] == ["Background", *UNICODE_NAMES]
        pyora = pytest.importorskip("pyora", reason="pyora (PyPI) is the independent ORA reader")
        assert [layer.name for layer in pyora.Project.load(str(path)).children] == [
            *reversed(UNICODE_NAMES),
            "Background",
        ]

    def test_cli_layer_named_by_a_chinese_file_name(self, scene, tmp_path):
        from bfs_core.__main__ import main

        Image.fromarray(scene[0]).save(tmp_path / "bg.png")
        Image.fromarray(scene[1][0][1], "RGBA").save(tmp_path / "猫.png")
        for suffix in (".psd", ".ora"):
            out = tmp_path / f"scene{suffix}"
            assert main(["save-layers", str(tmp_path / "bg.png"), str(tmp_path / "猫.png"), "--out", str(out)]) == 0
            names = [n for n, _ in (read_ora(out) if suffix == ".ora" else read_psd_layers(out)[1])]
            assert names == ["Background", "猫"]


@pytest.mark.parametrize("suffix", [".psd", ".ora"])
@pytest.mark.parametrize(
    ("name", "message"),
    [("tab\tand bell\x07", r"control characters \(U\+0007, U\+0009\)"), ("bad\udcff", "not valid Unicode")],
    ids=["control", "lone-surrogate"],
)
def test_names_no_layered_file_can_hold_are_refused_before_writing(scene, tmp_path, suffix, name, message):
    path = tmp_path / f"scene{suffix}"
    with pytest.raises(ValueError, match=message):
        write_layered_file(path, scene[0], [(name, scene[1][0][1])])
    assert not path.exists()


class TestFailingWriterKeepsTheOldFile:
    """A writer failing half-way (disk full, Ctrl-C) leaves the good file the user had and no partial or temp file."""

    def existing(self, scene, tmp_path, suffix):
        path = write_layered_file(tmp_path / f"scene{suffix}", scene[0], scene[1])
        return path, path.read_bytes()

    def test_psd(self, scene, tmp_path, monkeypatch):
        from psd_tools import PSDImage

        path, good = self.existing(scene, tmp_path, ".psd")
        real_save = PSDImage.save

        def save_half(self, fp, *args, **kwargs):
            real_save(self, fp, *args, **kwargs)
            with open(fp, "r+b") as f:  # the real bytes are on disk, then the write "fails" half-way
                f.truncate(len(good) // 2)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(PSDImage, "save", save_half)
        with pytest.raises(OSError, match="No space left"):
            write_layered_file(path, scene[0], unicode_scene(scene))
        assert path.read_bytes() == good
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.psd"]

    def test_ora(self, scene, tmp_path, monkeypatch):
        import bfs_core.layered_files as layered_files

        path, good = self.existing(scene, tmp_path, ".ora")
        real_png, calls = layered_files._png_bytes, []

        def png_then_fail(image):
            calls.append(image)
            if len(calls) == 3:  # mimetype, stack.xml and two layers are in the zip by now
                raise OSError(28, "No space left on device")
            return real_png(image)

        monkeypatch.setattr(layered_files, "_png_bytes", png_then_fail)
        with pytest.raises(OSError, match="No space left"):
            write_layered_file(path, scene[0], scene[1])
        assert len(calls) == 3
        assert path.read_bytes() == good
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.ora"]

    def test_bad_layer_name_error_before_writing(self, scene, tmp_path):
        path, good = self.existing(scene, tmp_path, ".psd")
        with pytest.raises(ValueError, match="must be the background's size: resize it to"):
            write_layered_file(path, scene[0], [("tiny", np.zeros((10, 10, 4), np.uint8))])
        assert path.read_bytes() == good


class TestErrors:
    def test_bad_suffix_and_size(self, scene, tmp_path):
        with pytest.raises(ValueError, match=r"\.psd or \.ora"):
            write_layered_file(tmp_path / "scene.tif", scene[0], scene[1])
        small = np.zeros((10, 10, 4), np.uint8)
        with pytest.raises(ValueError, match="must be the background's size: resize it to") as err:
            write_layered_file(tmp_path / "scene.ora", scene[0], [("tiny", small)])
        assert "uncrop_layer" not in str(err.value)  # no node offers it; the message names what the user can do


def test_save_layers_cli(scene, tmp_path):
    from bfs_core.__main__ import main

    bg_path = tmp_path / "BG.png"
    Image.fromarray(scene[0]).save(bg_path)
    paths = []
    for name, array in scene[1]:
        paths.append(tmp_path / f"{name.replace(' ', '_')}.png")
        Image.fromarray(array, "RGBA").save(paths[-1])
    for suffix in (".ora", ".psd"):
        out = tmp_path / f"scene{suffix}"
        assert main(["save-layers", str(bg_path), *map(str, paths), "--out", str(out)]) == 0
        names = [n for n, _ in (read_ora(out) if suffix == ".ora" else read_psd_layers(out)[1])]
        assert names == ["Background", "goat", "brown_hen"]
