"""fill_then_extract on the tiny random models: Flux-Fill removal from the BFS model's own base, then BFS extraction.

Values, not shapes: the Fill step is bit-for-bit the plain Flux-Fill transformer; the background is the input image
exactly outside the grown mask and the Fill output inside it; extraction receives that background; the grown region
is the hand-made dilation of the mask.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfs_core.errors import UserInputError
from bfs_core.models.bfs_checkpoint import save_bfs_weights
from bfs_core.models.dual_flux import DualBranchConfig, DualBranchFlux
from bfs_core.models.flux_fill_loading import load_flux_fill_transformer
from bfs_core.models.rgba_vae import load_rgba_decoder
from bfs_core.pipelines.bfs import BFSPipeline
from bfs_core.pipelines.decomposition import FillThenExtractPipeline, bfs_adapters_off
from bfs_core.pipelines.loading import load_pipeline
from bfs_core.sampling.flow_match import latent_image_ids
from bfs_core.tiny import randomize_bfs_parameters, write_tiny_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    return write_tiny_set(tmp_path_factory.mktemp("tiny_fte"))


@pytest.fixture(scope="module")
def bfs(tiny) -> BFSPipeline:
    # The paper preset (random non-zero content LoRAs and joint modules): bypassing them changes every output.
    return load_pipeline(str(tiny["diffusers"]), str(tiny["bfs_paper"]), dtype=torch.float32)


@pytest.fixture(scope="module")
def plain(tiny):
    return load_flux_fill_transformer(tiny["diffusers"], torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(bfs, tiny) -> FillThenExtractPipeline:
    rgba = load_rgba_decoder(tiny["rgba_bfs_release_folder"], dtype=torch.float32)
    return FillThenExtractPipeline(bfs.model, bfs.codec, rgba, bfs.scheduler_config)


def _transformer_inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(n, 16, 384, generator=gen),
        encoder_hidden_states=torch.randn(n, 6, 32, generator=gen),
        pooled_projections=torch.randn(n, 32, generator=gen),
        timestep=torch.rand(n, generator=gen),
        img_ids=latent_image_ids(8, 8),  # 16 tokens
        txt_ids=torch.zeros(6, 3),
        guidance=torch.full((n,), 30.0),
        return_dict=False,
    )


def _scene(height=64, width=64, box=(20, 24, 36, 40)):
    """A random image with a flat red object in `box` (x0, y0, x1, y1) and its exact mask."""
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    x0, y0, x1, y1 = box
    image[..., y0:y1, x0:x1] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    mask = torch.zeros(1, 1, height, width)
    mask[..., y0:y1, x0:x1] = 1
    return image, mask


def _grown_by_hand(height, width, box, r):
    """The box grown by r pixels on every side (square structuring element), clipped, written out with loops."""
    x0, y0, x1, y1 = box
    m = torch.zeros(1, 1, height, width)
    for y in range(height):
        for x in range(width):
            if y0 - r <= y < y1 + r and x0 - r <= x < x1 + r:
                m[0, 0, y, x] = 1
    return m


@torch.no_grad()
def test_adapters_off_is_exactly_the_flux_fill_base(bfs, plain):
    transformer = bfs.model.transformer
    inputs = _transformer_inputs(n=4)  # with adapters the batch is N comp rows then N fg rows
    expected = plain(**inputs)[0]
    with_adapters = transformer(**inputs)[0]
    assert (with_adapters - expected).abs().max() > 1e-3  # the adapters do act: the comparison below can fail
    odd = _transformer_inputs(n=3, seed=1)  # the Fill step runs one row per image: odd batches too
    with bfs_adapters_off(transformer):
        off = transformer(**inputs)[0]
        off_odd = transformer(**odd)[0]
    assert torch.equal(off, expected) and torch.equal(off_odd, plain(**odd)[0])
    assert torch.equal(transformer(**inputs)[0], with_adapters)  # everything is back after the block
    with pytest.raises(RuntimeError, match="boom"):
        with bfs_adapters_off(transformer):
            raise RuntimeError("boom")
    assert torch.equal(transformer(**inputs)[0], with_adapters)  # ... also after an error inside it


def test_fill_step_equals_a_separate_flux_fill_transformer(pipe, plain):
    image, mask = _scene()
    embeds, pooled = torch.randn(1, 6, 32), torch.randn(1, 32)
    kwargs = dict(size=(64, 64), seed=2, steps=3, guidance=30.0)
    own, own_latent, _ = pipe.fill(image, mask, embeds, pooled, **kwargs)
    separate = FillThenExtractPipeline(pipe.model, pipe.codec, pipe.rgba_decoder, pipe.scheduler_config, plain)
    other, other_latent, _ = separate.fill(image, mask, embeds, pooled, **kwargs)
    assert torch.equal(own_latent, other_latent) and torch.equal(own, other)
    assert own_latent.std() > 0.05  # a real sample, not zeros


@pytest.mark.parametrize("dilation", [0, 3])
def test_background_is_the_input_outside_the_grown_mask_and_the_fill_inside(pipe, dilation, monkeypatch):
    box = (30, 20, 50, 45)
    image, mask = _scene(70, 100, box)
    embeds, pooled = torch.randn(1, 6, 32), torch.randn(1, 32)
    seen = {}
    fill, extract = pipe.fill, pipe.bfs.extract

    def spy_fill(image, region, *args, **kwargs):
        seen["fill_region"] = region.clone()
        out = fill(image, region, *args, **kwargs)
        seen["filled"] = out[0].clone()
        return out

    def spy_extract(composite, background, mask, *args, **kwargs):
        seen.update(composite=composite.clone(), background=background.clone(), region=mask.clone())
        return extract(composite, background, mask, *args, **kwargs)

    monkeypatch.setattr(pipe, "fill", spy_fill)
    monkeypatch.setattr(pipe.bfs, "extract", spy_extract)
    steps_seen = []
    result = pipe.decompose(
        image,
        mask,
        embeds,
        pooled,
        dilation=dilation,
        steps=2,
        short_side=0,
        callback=lambda i, total, _: steps_seen.append((i, total)),
    )
    grown = _grown_by_hand(70, 100, box, dilation)
    assert torch.equal(seen["fill_region"], grown)  # the dilation radius is honoured, exactly
    outside = grown.expand_as(image) == 0
    assert torch.equal(result.background[outside], image[outside])  # untouched, bit for bit
    inside = ~outside
    assert torch.equal(result.background[inside], seen["filled"][inside])  # the Fill's pixels, pasted as they are
    assert (result.background[inside] - image[inside]).abs().mean() > 0.02  # and the Fill did change them
    # Extraction sees the image as the composite, the Fill estimate as the background, the grown box as the region.
    assert torch.equal(seen["composite"], image) and torch.equal(seen["background"], result.background)
    assert torch.equal(seen["region"], grown)  # a grown box is its own bounding box
    assert steps_seen == [(i, 4) for i in range(4)]  # Fill then extraction, counted as one run
    assert result.foreground.shape == (1, 4, 70, 100) and 0 <= result.foreground.min() <= result.foreground.max() <= 1
    assert result.transformer_calls == 4


def test_extraction_region_is_the_bounding_box_of_the_grown_mask(pipe, monkeypatch):
    image, _ = _scene()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:12, 10:12] = 1  # an L of two blobs: its box is larger than the grown mask
    mask[..., 30:34, 40:44] = 1
    seen = {}
    extract = pipe.bfs.extract

    def spy_extract(composite, background, region, *args, **kwargs):
        seen["region"] = region.clone()
        return extract(composite, background, region, *args, **kwargs)

    monkeypatch.setattr(pipe.bfs, "extract", spy_extract)
    pipe.decompose(image, mask, torch.randn(1, 6, 32), torch.randn(1, 32), dilation=2, steps=1, short_side=0)
    assert torch.equal(seen["region"], _grown_by_hand(64, 64, (8, 8, 46, 36), 0))


def test_bad_inputs_name_the_input(pipe, bfs):
    image, mask = _scene()
    embeds, pooled = torch.randn(1, 6, 32), torch.randn(1, 32)
    cases = [
        (dict(image=image * 255), r"`image` values must be in \[0, 1\]"),
        (dict(image=image[:, :1]), r"`image` must be \[N, 3, H, W\]"),
        (dict(mask=mask[..., :50]), "`mask` must be"),
        (dict(mask=torch.zeros_like(mask)), "`mask` is empty"),
        (dict(dilation=-1), "`dilation` must be a whole number"),
        (dict(dilation=1.5), "`dilation` must be a whole number"),
        (dict(fill_prompt_embeds=embeds), "Pass both `fill_prompt_embeds` and `fill_pooled`"),
        (dict(prompt_embeds=torch.randn(2, 6, 32), pooled=torch.randn(2, 32)), "`prompt_embeds` has batch 2"),
        (dict(fill_prompt_embeds=torch.randn(1, 6, 8), fill_pooled=pooled), "Text conditioning must be"),
    ]
    for override, message in cases:
        args = {**dict(image=image, mask=mask, prompt_embeds=embeds, pooled=pooled, steps=1, short_side=0), **override}
        with pytest.raises(ValueError, match=message):  # UserInputError, or the model's own conditioning check
            pipe.decompose(**args)
    with pytest.raises(UserInputError, match="needs a BFS model"):
        FillThenExtractPipeline(bfs.model.transformer, bfs.codec, pipe.rgba_decoder, bfs.scheduler_config)
    with pytest.raises(UserInputError, match="`rgba_decoder` is required"):
        FillThenExtractPipeline(bfs.model, bfs.codec, None, bfs.scheduler_config)
    with pytest.raises(UserInputError, match="must be plain FLUX.1-Fill-dev"):
        FillThenExtractPipeline(bfs.model, bfs.codec, pipe.rgba_decoder, bfs.scheduler_config, bfs.model.transformer)


def test_a_bfs_file_that_replaced_base_weights_needs_a_separate_fill(tiny, plain, pipe, tmp_path):
    fresh = load_flux_fill_transformer(tiny["diffusers"], torch_dtype=torch.float32)
    model = DualBranchFlux(fresh, DualBranchConfig.preset("release"))
    randomize_bfs_parameters(fresh, seed=3)
    path = tmp_path / "overrides.safetensors"
    save_bfs_weights(model, path, {"proj_out.bias": torch.randn(64)})
    bfs = load_pipeline(str(tiny["diffusers"]), str(path), dtype=torch.float32)
    image, mask = _scene()
    args = (image, mask, torch.randn(1, 6, 32), torch.randn(1, 32))
    own = FillThenExtractPipeline(bfs.model, bfs.codec, pipe.rgba_decoder, bfs.scheduler_config)
    with pytest.raises(UserInputError, match=r"replaced 1 FLUX.1-Fill-dev weights \(e.g. proj_out.bias\)"):
        own.decompose(*args, steps=1, short_side=0)
    separate = FillThenExtractPipeline(bfs.model, bfs.codec, pipe.rgba_decoder, bfs.scheduler_config, plain)
    result = separate.decompose(*args, steps=1, short_side=0)
    outside = _grown_by_hand(64, 64, (20, 24, 36, 40), 8).expand_as(image) == 0
    assert torch.equal(result.background[outside], image[outside])


# ---------------------------------------------------------------------------------------------------------------------
# Headless: python -m bfs_core decompose --method fill_then_extract


REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bfs_core", "decompose", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _cli_scene(tmp_path) -> tuple[Path, Path]:
    image, mask = _scene(80, 96, (30, 20, 50, 45))
    Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "image.png")
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path / "image.png", tmp_path / "mask.png"


def _cli_args(tiny, image, mask, out, **over) -> list[str]:
    args = {
        "method": "fill_then_extract",
        "base": tiny["diffusers"],
        "bfs": tiny["bfs_official_pt"],
        "rgba-vae": tiny["rgba_bfs_release_folder"],
        "image": image,
        "mask": mask,
        "prompt": "a red cube",
        "steps": "2",
        "dtype": "fp32",
        "device": "cpu",
        "out": out,
        **over,
    }
    return [x for k, v in args.items() if v is not None for x in (f"--{k}", str(v))]


def test_cli_fill_then_extract_end_to_end(tiny, tmp_path):
    image, mask = _cli_scene(tmp_path)
    done = _run_cli(*_cli_args(tiny, image, mask, tmp_path / "out", dilation="3", **{"layered-format": "psd"}))
    assert done.returncode == 0, done.stderr[-3000:]
    written = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    source = np.array(Image.open(image))
    background = np.array(Image.open(written["background"]))
    grown = _grown_by_hand(80, 96, (30, 20, 50, 45), 3)[0, 0].bool().numpy()
    assert (background[~grown] == source[~grown]).all()  # the image's own pixels outside the grown mask
    assert np.abs(background[grown].astype(int) - source[grown]).mean() > 5  # filled inside it
    foreground = Image.open(written["foreground"])
    assert foreground.mode == "RGBA" and foreground.size == (96, 80)
    assert Path(written["layered"]).suffix == ".psd" and Path(written["layered"]).stat().st_size > 0


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(bfs=None), "--method fill_then_extract needs --bfs"),
        (dict(weights="{decomposition}"), "--weights belong(s) to --method outpaint_and_remove"),
        (dict(edge="{image}"), "--edge belong(s) to --method outpaint_and_remove"),
        (dict(method="outpaint_and_remove", weights="{decomposition}"), "--bfs belong(s) to --method fill_then"),
        (dict(dilation="-2"), "`--dilation` must be a whole number of pixels >= 0"),
    ],
)
def test_cli_method_inputs_are_checked_before_loading(tiny, tmp_path, over, message, capsys, monkeypatch):
    from bfs_core.__main__ import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("bfs_core.pipelines.loading.load_pipeline", no_loading)
    image, mask = _cli_scene(tmp_path)
    fill = {"{decomposition}": str(tiny["decomposition"]), "{image}": str(image)}
    over = {k: fill.get(v, v) for k, v in over.items()}
    assert main(["decompose", *_cli_args(tiny, image, mask, tmp_path / "out", **over)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
