"""Tiny FLUX.1-Fill transformers as GGUF files (what city96's ComfyUI-GGUF conversions look like: BFL keys, no
`model.diffusion_model.` prefix, `general.architecture = flux`, 1-D tensors in F32, 2-D ones quantised where the row
length is a multiple of the block size and kept in F16 otherwise), written with the `gguf` package.

- Q8_0: the same random weights as `write_tiny_flux_fill`'s `bfl_bf16` file, quantised by `gguf.quants.quantize`.
- Q4_K: `gguf` cannot quantise K-quants, so the Q4_K tensors are valid random Q4_K blocks (random 4-bit codes and
  6-bit scales/mins, fp16 super-block scales sized so the weights come out fan-in scaled); the model is wider
  (hidden 256, one Q4_K super-block per row), since Q4_K rows need a multiple of 256 values.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch

from ..atomic import atomic_path
from ..models.flux_keys import diffusers_to_bfl
from .flux import _random_flux, _tiny_fill_config


Q4_K_BLOCK_VALUES, Q4_K_BLOCK_BYTES = 256, 144  # 2 (d, fp16) + 2 (dmin, fp16) + 12 (scales/mins) + 128 (4-bit codes)


def _gguf():
    import gguf

    return gguf


def random_q4_k_blocks(rows: int, cols: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """[rows, cols / 256 * 144] uint8: random Q4_K super-blocks whose values have roughly zero mean and `std` spread.

    A value is d * sc * q - dmin * m with q in 0..15 and sc, m in 0..63 (6-bit, packed in the 12 scale bytes).
    """
    if cols % Q4_K_BLOCK_VALUES:
        raise ValueError(f"`cols` must be a multiple of {Q4_K_BLOCK_VALUES} for Q4_K but got {cols}.")
    n_blocks = rows * cols // Q4_K_BLOCK_VALUES
    # E[sc * q] ≈ 31.5 * 7.5 and E[m] ≈ 31.5: dmin = 7.5 d centres the values; std(d·sc·q) ≈ 190 d.
    d = (std / 190.0) * rng.uniform(0.5, 1.5, size=(n_blocks, 1))
    dmin = 7.5 * d * rng.uniform(0.9, 1.1, size=(n_blocks, 1))
    blocks = np.concatenate(
        [
            d.astype(np.float16).view(np.uint8),
            dmin.astype(np.float16).view(np.uint8),
            rng.integers(0, 256, size=(n_blocks, 12 + 128), dtype=np.uint8),  # any bytes are valid scales and codes
        ],
        axis=1,
    )
    return blocks.reshape(rows, -1)


def _tensor_for(array: np.ndarray, quant: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(data, raw GGML type) for one tensor, ComfyUI-GGUF style: 1-D in F32, rows that do not fit a block in F16."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    if array.ndim != 2:
        return array.astype(np.float32), types.F32
    cols = array.shape[1]
    if quant == "Q4_K" and cols % Q4_K_BLOCK_VALUES == 0:
        return random_q4_k_blocks(array.shape[0], cols, rng, std=1.0 / math.sqrt(cols)), types.Q4_K
    if quant in ("Q8_0", "Q4_K") and cols % 32 == 0:  # Q4_K files fall back to Q8_0 for rows of 32k values
        return gguf.quants.quantize(array.astype(np.float32), types.Q8_0), types.Q8_0
    return array.astype(np.float16), types.F16


def write_gguf(path: pathlib.Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "flux") -> pathlib.Path:
    """Write {name: (data, GGML type)} as a GGUF file (atomically); quantised data is the raw [rows, bytes] blocks."""
    gguf = _gguf()
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        for name, (data, raw_type) in tensors.items():
            plain = raw_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor(name, data, raw_dtype=None if plain else raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def flux_gguf_tensors(model: torch.nn.Module, quant: str, seed: int) -> dict[str, tuple[np.ndarray, object]]:
    """A diffusers FluxTransformer2DModel as ComfyUI-GGUF tensors (BFL keys) in `quant` ("Q8_0" or "Q4_K")."""
    if quant not in ("Q8_0", "Q4_K"):
        raise ValueError(f"`quant` must be 'Q8_0' or 'Q4_K' but got {quant!r}.")
    rng = np.random.default_rng(seed)
    bfl = diffusers_to_bfl(model.state_dict())
    return {name: _tensor_for(t.float().numpy(), quant, rng) for name, t in sorted(bfl.items())}


def tiny_q4_k_config() -> dict:
    """The tiny Fill config widened to hidden 256 (2 heads of 128) so its block Linears hold whole Q4_K rows."""
    return {**_tiny_fill_config(), "attention_head_dim": 128, "num_attention_heads": 2, "axes_dims_rope": [16, 56, 56]}


def write_tiny_flux_fill_gguf(out_dir: pathlib.Path, *, seed: int = 0) -> dict[str, pathlib.Path]:
    """`gguf_q8_0` (the `bfl_bf16` weights, Q8_0) and `gguf_q4_k` (random Q4_K blocks, `tiny_q4_k_config`)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "gguf_q8_0": out_dir / "flux1-fill-tiny-Q8_0.gguf",
        "gguf_q4_k": out_dir / "flux1-fill-tiny-Q4_K.gguf",
    }
    write_gguf(paths["gguf_q8_0"], flux_gguf_tensors(_random_flux(_tiny_fill_config(), seed), "Q8_0", seed))
    write_gguf(paths["gguf_q4_k"], flux_gguf_tensors(_random_flux(tiny_q4_k_config(), seed), "Q4_K", seed))
    return paths
