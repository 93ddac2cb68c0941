"""BFSPipeline end to end on the tiny model set, and the processing-size rule."""

import pytest
import torch

from bfs_core.pipeline import BFSPipeline, load_pipeline, processing_size
from bfs_core.tiny import write_tiny_set


@pytest.mark.parametrize(
    "size, expected",
    [
        ((640, 480), (640, 512)),  # short side < 512: no scaling, round each side up to 64
        ((1024, 768), (704, 512)),  # 1024·512/768 = 682.67 -> 682 -> 704
        ((768, 1024), (512, 704)),
        ((512, 512), (512, 512)),
        ((100, 50), (128, 64)),
        ((2000, 600), (1728, 512)),  # 2000·512/600 = 1706.67 -> 1706 -> 1728
    ],
)
def test_processing_size_follows_the_release_rule(size, expected):
    assert processing_size(*size) == expected


def test_processing_size_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of 64"):
        processing_size(100, 100, short_side=500)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return write_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tiny_set) -> BFSPipeline:
    return load_pipeline(str(tiny_set["diffusers"]), str(tiny_set["bfs_official_pt"]), dtype=torch.float32)


def _scene():
    gen = torch.Generator().manual_seed(0)
    background = torch.rand(1, 3, 70, 100, generator=gen)
    mask = torch.zeros(1, 1, 70, 100)
    mask[..., 20:50, 30:70] = 1
    return background, mask


def test_generate_is_seeded_and_maps_back_to_the_input_size(pipe):
    background, mask = _scene()
    embeds, pooled = pipe.encode_prompt(["a red cube"])
    steps = []
    a = pipe.generate(background, mask, embeds, pooled, seed=3, steps=3, callback=lambda i, n, _: steps.append(i))
    b = pipe.generate(background, mask, embeds, pooled, seed=3, steps=3)
    c = pipe.generate(background, mask, embeds, pooled, seed=4, steps=3)
    assert steps == [0, 1, 2]
    assert a.processing_size == (128, 128) and a.original_size == (100, 70)
    assert a.fg_latent.shape == (1, 16, 16, 16) and a.composite.shape == (1, 3, 70, 100)
    assert torch.equal(a.fg_latent, b.fg_latent) and not torch.equal(a.fg_latent, c.fg_latent)
    assert 0 <= a.composite.min() and a.composite.max() <= 1 and a.composite.std() > 0.01


def test_extract_keeps_the_composite_latent_and_denoises_the_foreground(pipe):
    background, mask = _scene()
    composite = background.clone()
    composite[..., 20:50, 30:70] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    embeds, pooled = pipe.encode_prompt(["a red cube"])
    result = pipe.extract(composite, background, mask, embeds, pooled, seed=0, steps=2)
    expected = pipe.encode_images(
        torch.nn.functional.interpolate(composite, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    )
    assert torch.allclose(result.comp_latent, expected, atol=1e-5)
    assert result.fg_latent.abs().mean() > 0.01


def test_pipeline_input_errors_name_the_input(pipe):
    background, mask = _scene()
    embeds, pooled = pipe.encode_prompt(["x"])
    with pytest.raises(ValueError, match="`mask`"):
        pipe.generate(background, mask[..., :50], embeds, pooled, steps=1)
    with pytest.raises(ValueError, match=r"`background` values must be in \[0, 1\]"):
        pipe.generate(background * 255, mask, embeds, pooled, steps=1)
    with pytest.raises(ValueError, match="Text conditioning must be"):
        pipe.generate(background, mask, torch.zeros(1, 8, 4096), pooled, steps=1)
    with pytest.raises(ValueError, match="same shape"):
        pipe.extract(background[..., :60, :], background, mask, embeds, pooled, steps=1)
