"""Decomposition training set builder and a two-step decomposition training run (tiny, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bfs_core.decomposition_eval import load_image
from bfs_core.layer_math import composite_stack
from bfs_core.tiny import write_tiny_models
from training import train_decompose
from training.config import load_config
from training.decomposition_data import DataConfig, imperfect_mask
from training.decomposition_data import main as build


ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("decomp") / "data"
    cfg = DataConfig(
        foreground_dir=str(ASSETS / "stamps"),
        background_dir=str(ASSETS / "photos"),
        output_dir=str(out),
        count=6,
        size=64,
        min_objects=1,
        max_objects=3,
    )
    return build(cfg).weights


def test_builder_layers_recomposite_exactly(data):
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and max(len(r["layers"]) for r in rows) > 1
    for r in rows:
        photo = load_image(data / r["photo"], "RGB")
        layers = [load_image(data / p, "RGBA") for p in r["layers"]]
        others = [lay for j, lay in enumerate(layers) if j != r["target"]]
        comp = load_image(data / r["composite"], "RGB")
        torch.testing.assert_close(composite_stack([photo, *layers])[:, :3], comp, atol=0.6 / 255, rtol=0)
        torch.testing.assert_close(
            composite_stack([photo, *others])[:, :3], load_image(data / r["background"], "RGB"), atol=0.6 / 255, rtol=0
        )
        assert torch.equal(load_image(data / r["foreground"], "RGBA"), layers[r["target"]])
        mask = load_image(data / r["mask"], "L")
        assert mask.sum() > 0 and (mask <= (layers[r["target"]][:, 3:] > 0.5).float()).all()


def test_imperfect_mask_spoils_but_keeps_the_object():
    m = torch.zeros(4, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    spoiled = imperfect_mask(m, torch.Generator().manual_seed(0), probability=1.0)
    assert not torch.equal(spoiled, m)
    inter = (spoiled * m).flatten(1).sum(1)
    assert (inter >= 0.2 * m.flatten(1).sum(1)).all()  # erosion 4 px + shift 4 px of a 16 px square


def test_imperfect_mask_shift_never_wraps_to_the_opposite_edge():
    m = torch.zeros(64, 1, 32, 32)
    m[..., 10:20, 26:] = 1  # touches the right edge (and no other)
    spoiled = imperfect_mask(
        m, torch.Generator().manual_seed(0), dilate_px=2, erode_px=1, jitter_px=4, probability=1.0
    )
    assert spoiled[..., :20].sum() == 0  # with a wrap-around shift, right-edge pixels land in the left columns
    assert spoiled[..., 20:].sum(dim=(1, 2, 3)).min() > 0  # the object is still there in every sample
    assert not torch.equal(spoiled, m.expand_as(spoiled))  # and the masks did move


def test_shift_without_wrap_moves_and_drops():
    from training.decomposition_data import shift_without_wrap

    m = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(shift_without_wrap(m, 1, -1), torch.tensor([[[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0.0]]]))
    assert torch.equal(shift_without_wrap(m, 0, 0), m)
    assert shift_without_wrap(m, 3, 0).sum() == 0


def _config(data, models, run_dir, **overrides):
    values = dict(
        output_dir=str(run_dir),
        data_dir=str(data),
        flux_fill=str(models["flux_fill"]),
        rgba_vae=str(models["rgba_vae"]),
        lora_rank=4,
        decomposition_overrides={"joint_rank": 4, "fusion_dim": 32, "fusion_latents": 8, "fusion_heads": 2},
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=2,
        max_steps=2,
        checkpointing_steps=1,
        validation_steps=0,
        num_workers=0,
        report_to="none",
        resolution=64,
        learning_rate=1e-3,
        max_sequence_length=8,
        optimizer="adamw",
        lr_scheduler="constant",
    )
    return load_config(train_decompose.TrainConfig, None, {**values, **overrides})


def test_kill_and_resume_gives_bit_identical_next_losses(data, tmp_path):
    import shutil

    models = write_tiny_models(tmp_path / "models")
    full = train_decompose.main(_config(data, models, tmp_path / "full", max_steps=3))
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-000001", resumed_dir / "checkpoint-000001")
    resumed = train_decompose.main(
        _config(data, models, tmp_path / "resumed", max_steps=3, resume_from_checkpoint="latest")
    )
    assert resumed.first_step == 2
    assert resumed.losses == full.losses[1:]  # bit for bit


def test_two_steps_checkpoint_is_the_trainable_set_and_loads_in_the_node_loader(data, tmp_path):
    models = write_tiny_models(tmp_path / "models")
    cfg = load_config(
        train_decompose.TrainConfig,
        None,
        dict(
            output_dir=str(tmp_path / "run"),
            data_dir=str(data),
            flux_fill=str(models["flux_fill"]),
            rgba_vae=str(models["rgba_vae"]),
            lora_rank=4,
            decomposition_overrides={"joint_rank": 4, "fusion_dim": 32, "fusion_latents": 8, "fusion_heads": 2},
            mixed_precision="no",
            gradient_checkpointing=False,
            batch_size=2,
            max_steps=2,
            checkpointing_steps=1,
            validation_steps=0,
            num_workers=0,
            report_to="none",
            resolution=64,
            learning_rate=1e-3,
            max_sequence_length=8,
            optimizer="adamw",
            lr_scheduler="constant",
        ),
    )
    seen = {}
    result = train_decompose.main(cfg, callback=lambda step, info, model: seen.setdefault("model", model))
    model = seen["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"transformer", "fusion"}
    assert "transformer.x_embedder.weight" in trainable and any("lora_A.fg" in n for n in trainable)
    with safe_open(str(result.weights), "pt") as f:
        assert set(f.keys()) == trainable
    with safe_open(
        str(tmp_path / "run" / "checkpoints" / "checkpoint-000002" / "decomposition_weights.safetensors"), "pt"
    ) as f:
        assert set(f.keys()) == trainable
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # The new input columns moved away from zero: the fused context is being learned.
    assert model.transformer.x_embedder.weight[:, 384:].abs().max() > 0
    from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
    from bfs_core.models.layer_decomposition import apply_decomposition_weights

    loaded = apply_decomposition_weights(
        load_flux_fill_transformer(models["flux_fill"], torch_dtype=torch.float32), result.weights
    )
    for name in trainable:
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name).detach())


def test_trainer_contexts_are_the_masked_images():
    """The decomposition trainer's condition: background context = the composite with the object blanked + mask,
    foreground context = the composite inside the mask only + mask (hand-built tensors, a recording encoder)."""
    from bfs_core.sampling.flow_match import fill_condition

    class RecordingEncoder:
        def __init__(self):
            self.rgb_inputs = []

        @staticmethod
        def latent(images):  # [N, C, 16, 16] -> [N, 16, 2, 2]: a fixed function of the pixels
            return torch.nn.functional.avg_pool2d(images, 8).repeat(1, 6, 1, 1)[:, :16]

        def rgb(self, images):
            self.rgb_inputs.append(images.clone())
            return self.latent(images)

        def rgba_latent(self, rgba):
            return self.latent(rgba)

    class FixedTexts:
        def get(self, captions, max_len, device, dtype):
            return torch.zeros(len(captions), 3, 32), torch.zeros(len(captions), 32)

    gen = torch.Generator().manual_seed(0)
    composite = torch.rand(1, 3, 16, 16, generator=gen) * 0.6 + 0.3  # nowhere black
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:12, 3:6] = 1  # an L
    mask[..., 9:12, 3:14] = 1
    raw = {
        "composite": composite,
        "mask": mask,
        "background": torch.rand(1, 3, 16, 16, generator=gen),
        "foreground": torch.rand(1, 4, 16, 16, generator=gen),
        "caption": ["x"],
    }
    outside_only, inside_only = composite.clone(), torch.zeros_like(composite)
    for ys, xs in ((slice(2, 12), slice(3, 6)), (slice(9, 12), slice(3, 14))):
        outside_only[..., ys, xs] = 0
        inside_only[..., ys, xs] = composite[..., ys, xs]
    cfg = train_decompose.TrainConfig(edges=False, mask_spoil_probability=0.0)  # the mask exactly as given
    encoder = RecordingEncoder()
    b = train_decompose.encode_batch(raw, encoder, FixedTexts(), cfg, [0], "cpu", torch.float32)
    want_bg = fill_condition(RecordingEncoder.latent(outside_only), mask)
    want_fg = fill_condition(RecordingEncoder.latent(inside_only), mask)
    assert torch.equal(b.condition, torch.cat([want_bg, want_fg], -1))
    assert (want_bg - want_fg)[..., :64].abs().max() > 0.05  # the two contexts differ
    unmasked = fill_condition(RecordingEncoder.latent(composite), mask)[..., :64]
    assert (unmasked - want_bg[..., :64]).abs().max() > 0.05 and (unmasked - want_fg[..., :64]).abs().max() > 0.05
