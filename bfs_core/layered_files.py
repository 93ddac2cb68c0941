"""Layered-file export: a background plus named straight-alpha RGBA layers as Photoshop PSD or OpenRaster (.ora).

Layers are given **bottom to top**, all at the background's full resolution (paste crops back with
:func:`bfs_core.layer_math.uncrop_layer` first). Both formats also carry a merged preview, composited with
:func:`bfs_core.layer_math.composite_stack`. PSD is written with psd-tools (8-bit RGB document with layer
transparency); OpenRaster is written here from its specification (zip: ``mimetype``, ``stack.xml``,
``data/*.png``, ``mergedimage.png``, ``Thumbnails/thumbnail.png``).
"""

import io
import logging
import pathlib
import unicodedata
import zipfile
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .layer_math import composite_stack


logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | torch.Tensor
SUPPORTED_SUFFIXES = (".psd", ".ora")
ORA_THUMBNAIL_MAX = 256
PSD_PASCAL_NAME_MAX = 31  # Photoshop's own limit for the legacy name (the spec pads it to 4 bytes)


def to_rgba_image(image: ImageLike, name: str = "image") -> Image.Image:
    """PIL (any mode), uint8/float numpy [H, W, C] or a float tensor [C, H, W] / [1, C, H, W] -> PIL RGBA."""
    if isinstance(image, Image.Image):
        return image.convert("RGBA")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (3, 4):
            raise ValueError(f"`{name}` tensor must be [3 or 4, H, W] in [0, 1] but has shape {tuple(image.shape)}.")
        image = t.permute(1, 2, 0).float().numpy()  # [C, H, W] -> [H, W, C]
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"`{name}` array must be [H, W, 3 or 4] but has shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    if array.shape[-1] == 3:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return Image.fromarray(np.ascontiguousarray(array), "RGBA")


def check_layer_name(name: str, where: str) -> None:
    """Any script and emoji are fine; refused: what no layered file can hold (XML 1.0 forbids control characters in
    ORA's stack.xml; a lone surrogate, as from a file name in another encoding, is no Unicode text)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"The name of {where} ({name!r}) is not valid Unicode text (a file name in another encoding?): rename it."
        ) from None
    bad = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) == "Cc"})
    if bad:
        raise ValueError(
            f"The name of {where} ({name!r}) holds control characters ({', '.join(bad)}), which PSD/ORA layer names "
            "cannot carry: remove them."
        )


def _prepare(background: ImageLike, layers: Sequence[tuple[str, ImageLike]]) -> list[tuple[str, Image.Image]]:
    stack = [("Background", to_rgba_image(background, "background"))]
    size = stack[0][1].size
    for i, item in enumerate(layers):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"layers[{i}] must be a (name, image) pair but got {type(item).__name__}.")
        name, image = item
        check_layer_name(name, f"layers[{i}]")
        rgba = to_rgba_image(image, f"layers[{i}] ({name!r})")
        if rgba.size != size:
            raise ValueError(
                f"layer {name!r} is {rgba.size[0]}x{rgba.size[1]} but the background is {size[0]}x{size[1]}; every "
                f"layer must be the background's size: resize it to {size[0]}x{size[1]} (ComfyUI: Upscale Image to "
                "that width and height), or paste a crop onto a transparent canvas of that size where it belongs."
            )
        stack.append((name, rgba))
    names = [n for n, _ in stack]
    if len(set(names)) != len(names):
        logger.warning("duplicate layer names %s; layered-file readers keep them but users may be confused", names)
    return stack


def merged_preview(stack: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """Composite the named RGBA layers (bottom first) into one RGBA image (8-bit, rounded)."""
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).double() / 255 for _, im in stack]
    merged = composite_stack(tensors)  # [4, H, W], straight
    return to_rgba_image(merged.permute(1, 2, 0).numpy(), "merged")


def pascal_name(name: str) -> str:
    """The legacy Pascal layer name: ASCII (accents dropped, other characters `?`), at most 31 bytes.

    The full name goes in the Unicode layer-name block ('luni'), which Photoshop, GIMP, Krita and psd-tools read
    first; the Pascal name is only what a reader without 'luni' support shows. psd-tools would encode it as MacRoman
    and fail on any other character (`'charmap' codec can't encode`), so it gets a name every encoding can hold.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_name = "".join(c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c))
    return ascii_name[:PSD_PASCAL_NAME_MAX] or "Layer"


def write_psd(path: pathlib.Path, stack: Sequence[tuple[str, Image.Image]]) -> pathlib.Path:
    from psd_tools import PSDImage
    from psd_tools.constants import Tag

    width, height = stack[0][1].size
    # An RGBA document stores each layer's alpha as layer transparency (an RGB one would turn it into a mask).
    psd = PSDImage.new("RGBA", (width, height))
    for name, image in stack:  # create_pixel_layer adds on top: bottom first
        layer = psd.create_pixel_layer(image, name=pascal_name(name), top=0, left=0)
        layer.tagged_blocks.set_data(Tag.UNICODE_LAYER_NAME, name)  # 'luni': the full name, UTF-16BE
    with atomic_path(path) as tmp:
        psd.save(str(tmp))  # psd-tools renders the merged image data section from the layers on save
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_ora(path: pathlib.Path, stack: Sequence[tuple[str, Image.Image]]) -> pathlib.Path:
    width, height = stack[0][1].size
    merged = merged_preview(stack)
    thumbnail = merged.copy()
    thumbnail.thumbnail((ORA_THUMBNAIL_MAX, ORA_THUMBNAIL_MAX))
    entries = []
    # stack.xml lists the topmost layer first.
    for index, (name, _) in reversed(list(enumerate(stack))):
        entries.append(
            f'    <layer name={quoteattr(name)} src="data/layer{index:03d}.png" x="0" y="0" '
            'opacity="1.000" visibility="visible" composite-op="svg:src-over"/>'
        )
    stack_xml = (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        f'<image version="0.0.5" w="{width}" h="{height}" xres="72" yres="72">\n'
        '  <stack composite-op="svg:src-over" opacity="1.000" visibility="visible">\n'
        + "\n".join(entries)
        + "\n  </stack>\n</image>\n"
    )
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        # The spec requires `mimetype` first and uncompressed, so readers can sniff the type.
        zf.writestr(zipfile.ZipInfo("mimetype"), "image/openraster", compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", stack_xml, compress_type=zipfile.ZIP_DEFLATED)
        for index, (_, image) in enumerate(stack):
            zf.writestr(f"data/layer{index:03d}.png", _png_bytes(image), compress_type=zipfile.ZIP_STORED)
        zf.writestr("mergedimage.png", _png_bytes(merged), compress_type=zipfile.ZIP_STORED)
        zf.writestr("Thumbnails/thumbnail.png", _png_bytes(thumbnail), compress_type=zipfile.ZIP_STORED)
    return path


def write_layered_file(
    path: str | pathlib.Path,
    background: ImageLike,
    layers: Sequence[tuple[str, ImageLike]],
    background_name: str = "Background",
) -> pathlib.Path:
    """Write ``background`` + named RGBA ``layers`` (bottom to top) as ``.psd`` or ``.ora`` (chosen by suffix).

    Args:
        path: Output file; its suffix picks the format.
        background: The bottom layer (RGB or RGBA; RGB is opaque).
        layers: ``(name, image)`` pairs, bottom to top, each at the background's size, straight alpha.
        background_name: Name of the bottom layer.
    Returns:
        The written path.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"Output {str(path)!r} must end in .psd or .ora but ends in {path.suffix!r}.")
    check_layer_name(background_name, "the background")
    stack = _prepare(background, layers)
    stack[0] = (background_name, stack[0][1])
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_psd if suffix == ".psd" else write_ora)(path, stack)
    logger.info("Wrote %s: %d layers (%s), %dx%d", path, len(stack), ", ".join(n for n, _ in stack), *stack[0][1].size)
    return path


def read_ora(path: str | pathlib.Path) -> list[tuple[str, Image.Image]]:
    """Read an OpenRaster file's layers as (name, RGBA image at canvas size), bottom to top (nested stacks flatten)."""
    import xml.etree.ElementTree as ET

    path = pathlib.Path(path)
    with zipfile.ZipFile(path) as zf:
        root = ET.fromstring(zf.read("stack.xml"))
        width, height = int(root.get("w")), int(root.get("h"))
        layers = []
        for element in root.iter("layer"):
            tile = Image.open(io.BytesIO(zf.read(element.get("src")))).convert("RGBA")
            canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
            canvas.paste(tile, (int(element.get("x", 0)), int(element.get("y", 0))))
            layers.append((element.get("name", ""), canvas))
    return list(reversed(layers))
