"""GGUF-quantised FLUX.1-Fill-dev transformers (city96's ComfyUI-GGUF files: Q8_0 ... Q4_K), through diffusers' GGUF
support: the quantised Linears become diffusers' `GGUFLinear` with `GGUFParameter` weights (raw GGML blocks), and
every forward dequantises them to the compute dtype.
"""

from __future__ import annotations

import torch


def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A `GGUFParameter` (GGML blocks) as a plain `dtype` tensor of its logical shape, with diffusers' dequantiser."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(weight).to(dtype)
