"""Stored reference outputs: the dual-branch model's numbers must not drift when its code is restructured.

The reference in `tests/assets/reference_outputs.safetensors` was computed before the joint module became an attention
processor on stock diffusers blocks (the blocks' classes used to be swapped). The tiny models are filled from numpy's
PCG64 generator, not torch's RNG, so the same weights are built under every torch version CI tests (both ends of the
dependency ranges); kernels may round differently across versions, hence a small tolerance instead of equality.

Regenerate (only when a numerical change is intended, and say why in the commit):
    python tests/test_reference_outputs.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file


ASSET = Path(__file__).parent / "assets" / "reference_outputs.safetensors"
TOLERANCE = 2e-5  # max |Δ| relative to the output's max |value|, fp32

TINY_FLUX = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _fill(module_or_tensors, seed: int, std: float = 0.05):
    """Overwrite every tensor with N(0, std²) draws from numpy's PCG64 (stable across numpy and torch versions)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    items = module_or_tensors.named_parameters() if hasattr(module_or_tensors, "named_parameters") else None
    with torch.no_grad():
        for _, p in sorted(items, key=lambda kv: kv[0]):
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32) * std))


def _official_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from bfs_core.tiny import official_release_state_dict

    sd = official_release_state_dict(TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"], 64, rank=4)
    rng = np.random.Generator(np.random.PCG64(seed))
    draw = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) * 0.05 for k, v in sorted(sd.items())}
    return {k: torch.from_numpy(v) for k, v in draw.items()}


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    from bfs_core.sampling.flow_match import latent_image_ids

    rng = np.random.Generator(np.random.PCG64(seed))

    def r(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    return dict(
        comp_latents=r(1, 16, 64),
        fg_latents=r(1, 16, 64),
        fill_cond=r(1, 16, 320),
        prompt_embeds=r(1, 5, 32),
        pooled=r(1, 32),
        timestep_comp=torch.tensor([0.75]),
        timestep_fg=torch.tensor([0.5]),
        img_ids=latent_image_ids(8, 8),
    )


def _base():
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(**TINY_FLUX).eval()
    _fill(transformer, seed=1)
    return transformer


def compute_outputs(tmp_dir: Path) -> dict[str, torch.Tensor]:
    """Release preset from an official-layout `.pt` and paper preset (MLP post, content LoRA) on one tiny base."""
    from bfs_core.models.bfs_checkpoint import load_bfs
    from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux, prepare_for_inference

    outputs = {}
    pt = tmp_dir / "trained_weights.pt"
    torch.save(_official_state_dict(seed=2), pt)
    release = load_bfs(_base(), pt)
    paper = DualBranchFlux(_base(), DualBranchConfig.paper())
    _fill(
        torch.nn.ParameterList([p for n, p in paper.transformer.named_parameters() if "lora" in n or "joint" in n]),
        seed=3,
    )
    prepare_for_inference(paper.transformer)
    with torch.no_grad():
        for name, model in (("release", release), ("paper", paper)):
            v_comp, v_fg = model(**_inputs(seed=4))
            outputs[f"{name}.v_comp"], outputs[f"{name}.v_fg"] = v_comp.contiguous(), v_fg.contiguous()
    return outputs


def test_dual_branch_outputs_match_the_stored_reference(tmp_path):
    reference = load_file(ASSET)
    outputs = compute_outputs(tmp_path)
    assert sorted(outputs) == sorted(reference)
    for key, ref in reference.items():
        scale = float(ref.abs().max())
        err = float((outputs[key] - ref).abs().max()) / scale
        assert err < TOLERANCE, f"{key}: relative max error {err:.2e} vs the stored reference (tolerance {TOLERANCE})"
        assert scale > 0.1  # a reference of zeros would check nothing


def test_the_reference_checks_the_bfs_parts(tmp_path):
    """The stored numbers are not those of the plain base: a change that dropped the joint module or the content
    LoRA would fail the test above."""
    from bfs_core.models.dual_flux import run_two_branches

    x = _inputs(seed=4)
    with torch.no_grad():
        comp, fg = (torch.cat([x[k], x["fill_cond"]], -1) for k in ("comp_latents", "fg_latents"))
        plain = run_two_branches(
            _base(), comp, fg, x["prompt_embeds"], x["pooled"], x["timestep_comp"], x["timestep_fg"], x["img_ids"]
        )
    reference = load_file(ASSET)
    for name in ("release", "paper"):
        for i, branch in enumerate(("v_comp", "v_fg")):
            ref = reference[f"{name}.{branch}"]
            assert float((plain[i] - ref).abs().max()) > 100 * TOLERANCE * float(ref.abs().max())


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file(compute_outputs(Path(d)), ASSET)
    print(f"wrote {ASSET}")
elif __name__ == "__main__":
    pytest.main([__file__, "-q"])
