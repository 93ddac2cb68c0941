"""Loading the BFS pipeline from local files: the FLUX.1 VAE (checked to be one), the base, the BFS weights."""

from __future__ import annotations

import torch

from .bfs import BFSPipeline
from .codec import DiffusersFluxVAE


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} but got {name!r}.")
    return DTYPES[name]


def check_flux_vae_config(config, source: str) -> None:
    """The FLUX.1 VAE encodes RGB to 16 latent channels with a shift factor; say what a wrong VAE is instead."""
    problems = []
    if config.latent_channels != 16:
        problems.append(f"{config.latent_channels} latent channels (FLUX.1: 16)")
    if config.in_channels != 3 or config.out_channels != 3:
        problems.append(f"{config.in_channels}/{config.out_channels} in/out channels (FLUX.1: 3/3, RGB)")
    if config.get("shift_factor") is None:
        problems.append("no shift_factor (FLUX.1: 0.1159)")
    if not problems:
        return
    if config.latent_channels == 4:
        kind = "an SD1.5/SDXL-style VAE"
    elif config.in_channels == 4:
        kind = "an RGBA VAE (pass it as the RGBA VAE instead)"
    else:
        kind = "not the FLUX.1 VAE"
    from ..errors import UserInputError

    raise UserInputError(
        f"{source} is {kind}: {'; '.join(problems)}. Pass the FLUX.1 VAE (the `vae/` folder of FLUX.1-Fill-dev)."
    )


def load_flux_vae(
    path: str, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", name: str = "vae"
):
    """The FLUX.1 VAE (diffusers `AutoencoderKL` folder), checked to be one; `name` is the input, named in errors."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    from ..errors import UserInputError, reading_folder

    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "is a file" if folder.is_file() else "has no config.json"
        raise UserInputError(
            f"`{name}` must be the FLUX.1 VAE as a diffusers folder (config.json + diffusion_pytorch_model."
            f"safetensors) but {str(folder)!r} {what}. Pass the `vae/` folder of FLUX.1-Fill-dev."
        )
    with reading_folder(folder, name, "a diffusers AutoencoderKL folder (the FLUX.1 VAE)"):
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    check_flux_vae_config(vae.config, f"`{name}` folder {str(folder)!r}")
    return vae.to(device).eval()


def load_pipeline(
    base: str,
    bfs: str,
    *,
    vae: str | None = None,
    text_encoders: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    input_names: dict[str, str] | None = None,
    offload: str = "none",
) -> BFSPipeline:
    """Load everything from local files (nothing is downloaded).

    Args:
        base: FLUX.1-Fill-dev as a diffusers pipeline folder (or its `transformer/`), a single BFL safetensors file
            (bf16 / fp8 / ComfyUI scaled fp8), or a ComfyUI-GGUF `.gguf` file (Q8_0 ... Q4_K, computed in `dtype`).
        bfs: BFS weights: the official `trained_weights.pt` (or its folder) or our `.safetensors`.
        vae: the Flux VAE folder (diffusers AutoencoderKL); defaults to `<base>/vae` when `base` is a folder.
        text_encoders: a folder with `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`; defaults to
            `base` when it holds them. Optional: without it, prompt embeddings must be given.
        input_names: how the caller names these inputs (e.g. `{"text_encoders": "--text-encoders"}`), used in every
            error message.
        offload: `none`, `model` or `block` (`bfs_core.offload`): with offloading the transformer is assembled on the
            CPU and diffusers' / accelerate's hooks bring it to `device` as it runs.
    """
    from pathlib import Path

    from ..errors import UserInputError
    from ..models.bfs_checkpoint import load_bfs
    from ..models.flux_fill_loading import load_flux_fill_transformer, load_shipped_config
    from ..offload import apply_offload, parse_offload

    names = {"base": "base", "bfs": "bfs", "vae": "vae", "text_encoders": "text_encoders", **(input_names or {})}
    base_path = Path(base)
    for key, value in (("base", base), ("bfs", bfs), ("vae", vae), ("text_encoders", text_encoders)):
        if value is not None and not Path(value).exists():
            raise UserInputError(
                f"`{names[key]}` path {str(value)!r} does not exist; pass a local file or folder (nothing is fetched)."
            )
    vae = vae or (str(base_path / "vae") if (base_path / "vae").is_dir() else None)
    if vae is None:
        raise UserInputError(
            f"No Flux VAE given and `{names['base']}` {str(base)!r} has no `vae/` folder: pass the FLUX.1 VAE folder "
            f"as `{names['vae']}`."
        )
    if text_encoders is None and (base_path / "text_encoder_2").is_dir():
        text_encoders = base
    offload = parse_offload(offload, names.get("offload", "offload"))
    vae_model = load_flux_vae(vae, dtype=dtype, device=device, name=names["vae"])  # small: checked first
    where = device if offload == "none" else "cpu"
    transformer = load_flux_fill_transformer(base, torch_dtype=dtype, device=where, name=names["base"])
    model = load_bfs(transformer, bfs, name=names["bfs"])
    if offload != "none":
        apply_offload(transformer, offload, device)
    encoders = None
    if text_encoders is not None:
        from ..text_encoders import FluxTextEncoders

        encoders = FluxTextEncoders.from_pretrained(
            text_encoders, torch_dtype=dtype, device=device, name=names["text_encoders"]
        )
    scheduler_file = base_path / "scheduler" / "scheduler_config.json"
    scheduler_config = load_shipped_config("flux_fill_scheduler")
    if scheduler_file.is_file():
        import json

        scheduler_config = {**scheduler_config, **json.loads(scheduler_file.read_text())}
    return BFSPipeline(model, DiffusersFluxVAE(vae_model), scheduler_config, encoders)
