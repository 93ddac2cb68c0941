"""The pack's models through ComfyUI's own memory management, in a ComfyUI process (run by test_model_patcher.py).

    python model_patcher_check.py <ComfyUI dir> <tiny set dir> <case> <out.json>

Loads a model exactly as its loader node does (the node's `execute`, with the tiny set registered in folder_paths),
then drives ComfyUI's `load_models_gpu` / `unload_all_models` on it:

* `cpu`: load, run, unload, reload, run: the two outputs must be equal (ComfyUI's moves keep every value).
* `meta`: the load device set to `meta`, which stands in for CUDA (a tensor left behind on the CPU raises when the
  model runs), with ComfyUI in its normal-VRAM state (partial loading allowed) and a free-memory reading that fits
  the model: after `load_models_gpu`, every parameter and buffer must be on the device and one forward must run there.
* `meta_tight`: the same with free memory for half of the model, where ComfyUI would load it partially: the pack's
  models are loaded whole (see `PatchedModel.load`), never left half on the CPU.

Writes {"ok": bool, "left_behind": [...], "max_abs_diff": float, "error": str | null} to <out.json>.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def _import_pack(repo: Path):
    """Import the repository as a package (ComfyUI imports custom_nodes/<name> the same way)."""
    parent = Path(tempfile.mkdtemp(prefix="bfs_pack_"))
    (parent / "bfs_pack").symlink_to(repo, target_is_directory=True)
    sys.path.insert(0, str(parent))
    import bfs_pack  # noqa: F401
    import bfs_pack.nodes.decompose as decompose_nodes
    import bfs_pack.nodes.loaders as loader_nodes

    return loader_nodes, decompose_nodes


def _inputs(transformer, device, dtype):
    import torch

    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    length = 16
    ids = torch.stack([torch.zeros(16), torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)], 1)
    # Fill conditioning (BFS), or all the decomposition's contexts (its input projection was grown past the config's)
    cond = transformer.x_embedder.in_features - 64

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(
        comp_latents=r(1, length, 64),
        fg_latents=r(1, length, 64),
        fill_cond=r(1, length, cond),
        prompt_embeds=r(1, 6, cfg.joint_attention_dim),
        pooled=r(1, cfg.pooled_projection_dim),
        timestep_comp=0.7,
        timestep_fg=0.4,
        img_ids=ids.to(device, dtype),
    )


def _forward(inner, device, dtype):
    import torch

    with torch.no_grad():
        if hasattr(inner, "fuse"):  # the decomposition model: its forward takes the fused condition directly
            from bfs_pack.bfs_core.models.dual_flux import run_two_branches

            x = _inputs(inner.transformer, device, dtype)
            return run_two_branches(
                inner.transformer,
                torch.cat([x["comp_latents"], x["fill_cond"]], -1),
                torch.cat([x["fg_latents"], x["fill_cond"]], -1),
                x["prompt_embeds"],
                x["pooled"],
                0.7,
                0.4,
                x["img_ids"],
            )
        return inner(**_inputs(inner.transformer, device, dtype))


def main(comfy_dir: str, tiny_dir: str, case: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as the test server runs (`--cpu`); the meta case below plays the GPU
    import comfy.model_management as mm
    import folder_paths
    import torch
    import utils.install_util  # noqa: F401  (ComfyUI's own `utils` package, before anything can shadow the name)

    result = {"ok": False, "left_behind": [], "max_abs_diff": None, "error": None}
    try:
        tiny = Path(tiny_dir)
        folder_paths.add_model_folder_path("diffusion_models", str(tiny))
        folder_paths.add_model_folder_path("bfs", str(tiny / "bfs"))
        folder_paths.add_model_folder_path("bfs", str(tiny / "decomposition"))
        loader_nodes, decompose_nodes = _import_pack(Path(__file__).resolve().parents[2])
        kind, device_name = case.split(":")
        base = "flux1-fill-tiny-bf16.safetensors"
        if kind == "bfs_official":
            out_node = loader_nodes.LoadBFS.execute(base, "trained_weights.pt", "fp32")
        elif kind == "bfs_paper_fp8":
            out_node = loader_nodes.LoadBFS.execute(base, "bfs_paper_tiny.safetensors", "fp8_e4m3fn")
        elif kind == "decomposition":
            out_node = decompose_nodes.LoadDecomposition.execute(base, "decomposition_tiny.safetensors", "fp32")
        else:
            raise ValueError(f"unknown case {case}")
        handle = out_node.args[0]
        dtype = torch.bfloat16 if kind.endswith("fp8") else torch.float32

        if device_name == "cpu":
            first = [t.clone() for t in _forward(handle.load(), torch.device("cpu"), dtype)]
            mm.unload_all_models()
            mm.soft_empty_cache()
            second = _forward(handle.load(), torch.device("cpu"), dtype)
            result["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(first, second))
            result["ok"] = result["max_abs_diff"] == 0.0
        else:
            meta = torch.device("meta")
            handle.patcher.load_device = meta
            mm.vram_state = mm.VRAMState.NORMAL_VRAM
            # "meta": an 80 GB card with nothing else loaded; "meta_tight": a card with room for half of the model,
            # where ComfyUI would load it partially.
            free = 80 * 1024**3 if device_name == "meta" else handle.patcher.model_size() // 2
            mm.get_free_memory = lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free
            loaded = handle.load()
            result["left_behind"] = [
                n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.device != meta
            ]
            outputs = _forward(loaded, meta, dtype)
            result["ok"] = not result["left_behind"] and all(t.device == meta for t in outputs)
    except Exception as exc:  # reported to the test, which prints it
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
