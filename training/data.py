"""Training datasets on disk (see training/README.md): a folder with `manifest.jsonl`, one sample per line.

Kinds and their fields (paths relative to the folder; images any PIL-readable format):
- `triplet` (BFS stage 1 and stage-2 L_reg): `foreground` (RGBA, straight alpha), `background` (RGB), `composite`
  (RGB), `box` [x0, y0, x1, y1] in pixels (exclusive x1/y1) and/or `mask` (binary image, 1 = foreground region),
  `caption`, optional `name`.
- `pair` (BFS stage-2 L_real): `composite`, `background`, `box` and/or `mask`, `caption`, optional `name`.
- `phi` (Φ): `foreground` (RGBA), `background` (RGB), optional `name`; the composite is made with eq. (1).

Every line is checked before training (files exist and decode their headers, RGBA has alpha, sizes agree, the box
lies inside the image, the caption is non-empty). Bad lines are reported by name and skipped; a file that fails to
decode later is reported and replaced by the next good sample, so an epoch never crashes on one bad file.
Images keep their aspect: each is cropped to a square (`square_window`: centred, moved just enough to hold the box,
or the mask's extent, when that fits) and resized to `resolution` × `resolution` (bicubic; masks nearest); boxes
are cropped and scaled with them, so a box covers the same object pixels as in the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bfs_core.layer_math import alpha_blend, box_from_mask, mask_from_box


logger = logging.getLogger(__name__)

REQUIRED = {
    "triplet": ("foreground", "background", "composite", "caption"),
    "pair": ("composite", "background", "caption"),
    "phi": ("foreground", "background"),
    "removal": ("composite", "background", "mask", "caption"),  # synth-data input: object-removal pairs
}
IMAGE_KEYS = ("foreground", "background", "composite", "mask")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def check_entry(root: Path, entry: dict, kind: str) -> str | None:
    """Why this manifest entry is unusable, or None when it is fine (reads only image headers)."""
    missing = [k for k in REQUIRED[kind] if not entry.get(k)]
    if kind in ("triplet", "pair") and not (entry.get("box") or entry.get("mask")):
        missing.append("box or mask")
    if missing:
        return f"missing fields {missing}"
    sizes = {}
    for key in IMAGE_KEYS:
        if key not in entry or (kind == "phi" and key == "mask"):
            continue
        path = root / entry[key]
        if not path.is_file():
            return f"{key} file not found: {path}"
        try:
            with Image.open(path) as img:
                sizes[key] = img.size
                if key == "foreground" and not _has_alpha(img):
                    return f"foreground {path.name} has no alpha channel (mode {img.mode}); it must be RGBA"
        except Exception as err:  # PIL raises many types for broken files
            return f"{key} {path.name} cannot be read: {err}"
    if kind != "phi" and len(set(sizes.values())) > 1:
        return f"image sizes differ: {sizes}"
    if entry.get("box") is not None:
        box = entry["box"]
        width, height = next(iter(sizes.values()))
        if not (isinstance(box, list) and len(box) == 4 and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3]):
            return f"box {box!r} is not [x0, y0, x1, y1] inside the {width}x{height} image"
        if box[3] > height:
            return f"box {box!r} is not [x0, y0, x1, y1] inside the {width}x{height} image"
    return None


def read_manifest(root: str | Path, kind: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(good entries, [(sample name, reason)] for bad ones) of `root/manifest.jsonl`."""
    if kind not in REQUIRED:
        raise ValueError(f"Dataset kind must be one of {sorted(REQUIRED)} but got {kind!r}.")
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise ValueError(
            f"{manifest} not found; a {kind} dataset is a folder with manifest.jsonl (training/README.md)."
        )
    good, bad = [], []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((f"line {number}", f"not JSON: {err}"))
            continue
        entry.setdefault("name", Path(str(entry.get("composite") or entry.get("foreground") or number)).stem)
        reason = check_entry(root, entry, kind)
        (bad.append((entry["name"], reason)) if reason else good.append(entry))
    if bad:
        logger.warning(
            "%s: %d of %d samples are unusable and skipped: %s",
            manifest,
            len(bad),
            len(good) + len(bad),
            "; ".join(f"{n}: {r}" for n, r in bad[:10]) + (" …" if len(bad) > 10 else ""),
        )
    if not good:
        raise ValueError(f"{manifest} holds no usable {kind} sample ({len(bad)} bad ones, see the warnings).")
    return good, bad


def _hold(start: int, lo: int, hi: int, side: int, length: int) -> int:
    """Start of a `side`-long window in [0, length): `start`, moved as little as possible to hold [lo, hi)."""
    if hi - lo <= side:
        start = min(max(start, hi - side), lo)
    else:  # the region is longer than the window: centre on it
        start = (lo + hi) // 2 - side // 2
    return min(max(start, 0), length - side)


def square_window(width: int, height: int, region: tuple[int, int, int, int] | None = None) -> tuple[int, int, int]:
    """(left, top, side) of the square crop of a width × height image: centred, then moved just enough to hold
    `region` [x0, y0, x1, y1] (the box or the mask's extent) when it fits, else centred on it."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if region is not None:
        x0, y0, x1, y1 = region
        left, top = _hold(left, x0, x1, side, width), _hold(top, y0, y1, side, height)
    return left, top, side


def crop_box(box: list[int], window: tuple[int, int, int], resolution: int) -> list[int]:
    """A box [x0, y0, x1, y1] in file pixels -> the same pixels in the cropped, resized [resolution]² image."""
    left, top, side = window
    scale = resolution / side
    x0, y0, x1, y1 = ((v - o) * scale for v, o in zip(box, (left, top, left, top)))
    return [min(max(round(v), 0), resolution) for v in (x0, y0, x1, y1)]


def load_image(path: Path, channels: int, resolution: int, window: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Image file -> [C, resolution, resolution] float in [0, 1] (RGBA resized premultiplied, so no dark fringes).

    `window` (left, top, side): the square to crop first; default the centred one (`square_window`)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels]), dtype=np.float32) / 255.0
    array = array.reshape(array.shape[0], array.shape[1], channels)
    left, top, side = window or square_window(array.shape[1], array.shape[0])
    if top + side > array.shape[0] or left + side > array.shape[1]:
        raise ValueError(f"{path.name} is {array.shape[1]}x{array.shape[0]}, smaller than its sample's other images.")
    x = torch.from_numpy(np.ascontiguousarray(array[top : top + side, left : left + side])).permute(2, 0, 1)
    if x.shape[-2:] == (resolution, resolution):
        return x
    if channels == 1:
        return F.interpolate(x[None], size=(resolution, resolution), mode="nearest-exact")[0]
    if channels == 4:
        x = torch.cat([x[:3] * x[3:], x[3:]])  # straight -> premultiplied
    x = F.interpolate(x[None], size=(resolution, resolution), mode="bicubic", antialias=True)[0].clamp(0, 1)
    if channels == 4:
        alpha = x[3:]
        x = torch.cat([torch.where(alpha > 1e-6, x[:3] / alpha.clamp_min(1e-6), 0).clamp(0, 1), alpha])
    return x


class ManifestDataset(torch.utils.data.Dataset):
    """One of the three dataset kinds (see the module docstring); items are dicts of tensors plus caption/name."""

    def __init__(self, root: str | Path, kind: str, resolution: int):
        if resolution % 64:
            raise ValueError(f"`resolution` must be a multiple of 64 (the RGBA VAE needs it) but got {resolution}.")
        self.root, self.kind, self.resolution = Path(root), kind, resolution
        self.entries, self.bad = read_manifest(self.root, kind)

    def __len__(self) -> int:
        return len(self.entries)

    def _window(self, entry: dict) -> tuple[int, int, int]:
        """One square crop for all images of a sample, holding its box (or its mask's extent) when that fits."""
        with Image.open(self.root / entry["background"]) as img:
            width, height = img.size
        region = entry.get("box")
        if entry.get("mask") and width != height:
            with Image.open(self.root / entry["mask"]) as img:
                mask = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            region = box_from_mask(mask) if (mask >= 0.5).any() else region
        return square_window(width, height, region)

    def _load(self, entry: dict) -> dict:
        res, root = self.resolution, self.root
        item = {"name": entry["name"]}
        if self.kind == "phi":  # foreground and background may differ in size: each is centre-cropped
            item["foreground"] = load_image(root / entry["foreground"], 4, res)
            item["background"] = load_image(root / entry["background"], 3, res)
            fg = item["foreground"]
            item["composite"] = alpha_blend(fg[:3], fg[3:], item["background"])  # eq. (1)
            return item
        window = self._window(entry)
        if "foreground" in REQUIRED[self.kind]:
            item["foreground"] = load_image(root / entry["foreground"], 4, res, window)
        item["background"] = load_image(root / entry["background"], 3, res, window)
        item["composite"] = load_image(root / entry["composite"], 3, res, window)
        item["caption"] = entry["caption"]
        if entry.get("mask"):
            item["mask"] = (load_image(root / entry["mask"], 1, res, window) >= 0.5).float()
        else:
            item["mask"] = mask_from_box(crop_box(entry["box"], window, res), res, res)[None]
        return item

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.entries)):
            entry = self.entries[(index + offset) % len(self.entries)]
            try:
                return self._load(entry)
            except Exception as err:  # report the file by name and move on deterministically
                logger.warning("Skipping sample %s of %s: %s", entry["name"], self.root, err)
        raise ValueError(f"No sample of {self.root} could be loaded.")


class ResumableSampler(torch.utils.data.Sampler):
    """Endless, seeded, per-epoch shuffled indices for this process, startable at any batch.

    The order is a function of (seed, epoch) only, so resuming at `start_batch` reproduces the data order exactly;
    process `rank` of `world` takes every `world`-th index of the shared permutation.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_batch=0):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start_batch = rank, world, start_batch
        # Every process takes the same number of batches per epoch (the ranks stay in one epoch together, and
        # P processes of batch B see exactly the global batches of one process of batch P·B).
        self.batches_per_epoch = num_samples // world // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"The dataset has {num_samples} usable samples, fewer than one batch of {batch_size} per process "
                f"({world} processes). Lower `batch_size` or add data."
            )

    def __iter__(self) -> Iterator[int]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            local = torch.randperm(self.num_samples, generator=gen)[self.rank :: self.world].tolist()
            yield from local[batch * self.batch_size : self.batches_per_epoch * self.batch_size]
            epoch, batch = epoch + 1, 0


def make_loader(dataset, batch_size: int, seed: int, start_batch: int, accelerator, num_workers: int = 0):
    """A DataLoader over `ResumableSampler`; its own generator keeps the global RNG untouched (bit-exact resume)."""
    sampler = ResumableSampler(
        len(dataset), batch_size, seed, accelerator.process_index, accelerator.num_processes, start_batch
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
