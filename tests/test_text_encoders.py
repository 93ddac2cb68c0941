"""FLUX text encoders: tiny offline write -> load -> encode, following FluxPipeline's prompt encoding."""

import pytest
import torch

from bfs_core.text_encoders import FluxTextEncoders
from bfs_core.tiny import write_tiny_text_encoders


PROMPTS = ["a red cat on a wooden table", "A blue car near the house."]


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_text_encoders(tmp_path_factory.mktemp("tiny_te"), seed=0)


@pytest.fixture(scope="module")
def encoders(root):
    return FluxTextEncoders.from_pretrained(root, torch_dtype=torch.float32)


def test_layout_and_tokenizer_classes(root, encoders):
    assert all((root / name).is_dir() for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    # The real classes, loaded through AutoTokenizer, as for the real FLUX folders.
    assert type(encoders.tokenizer).__name__ in ("CLIPTokenizer", "CLIPTokenizerFast")  # 5.x, 4.x
    assert type(encoders.tokenizer_2).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert encoders.tokenizer.model_max_length == 77


def test_clip_pools_at_the_eos_token(encoders):
    ids = encoders.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = encoders.text_encoder.config.eos_token_id
    assert eos == encoders.tokenizer.eos_token_id != 2
    first_eos = int((ids[0] == eos).nonzero()[0])
    with torch.no_grad():
        out = encoders.text_encoder(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, first_eos])


def test_encode_shapes_and_determinism(root, encoders, tmp_path):
    prompt_embeds, pooled = encoders.encode(PROMPTS)
    assert prompt_embeds.shape == (2, 512, 32) and pooled.shape == (2, 32)
    assert prompt_embeds.dtype == pooled.dtype == torch.float32
    assert prompt_embeds.std() > 0.1 and pooled.std() > 0.1
    again_embeds, again_pooled = encoders.encode(PROMPTS)
    assert torch.equal(prompt_embeds, again_embeds) and torch.equal(pooled, again_pooled)
    # The same seed writes the same weights.
    other = FluxTextEncoders.from_pretrained(write_tiny_text_encoders(tmp_path, seed=0), torch_dtype=torch.float32)
    other_embeds, other_pooled = other.encode(PROMPTS)
    assert torch.equal(prompt_embeds, other_embeds) and torch.equal(pooled, other_pooled)


def test_different_prompts_differ_and_batch_rows_are_independent(encoders):
    prompt_embeds, pooled = encoders.encode(PROMPTS)
    assert not torch.allclose(prompt_embeds[0], prompt_embeds[1])
    assert not torch.allclose(pooled[0], pooled[1])
    single_embeds, single_pooled = encoders.encode(PROMPTS[1:])
    torch.testing.assert_close(single_embeds[0], prompt_embeds[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_pooled[0], pooled[1], atol=1e-5, rtol=1e-5)


def test_max_sequence_length_and_bf16(root):
    encoders = FluxTextEncoders.from_pretrained(root)  # default bf16
    prompt_embeds, pooled = encoders.encode(PROMPTS[:1], max_sequence_length=256)
    assert prompt_embeds.shape == (1, 256, 32) and prompt_embeds.dtype == torch.bfloat16
    assert pooled.dtype == torch.bfloat16


def test_input_errors(encoders, tmp_path):
    with pytest.raises(ValueError, match="non-empty list of str"):
        encoders.encode("a cat")
    with pytest.raises(ValueError, match=r"max_sequence_length.*\[1, 512\]"):
        encoders.encode(PROMPTS, max_sequence_length=600)
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ValueError, match="lacks.*tokenizer_2"):
        FluxTextEncoders.from_pretrained(tmp_path)


def test_loading_leaves_the_callers_rng_alone(root):
    """transformers 4.50-4.55 draw random initial weights while loading; DDP training relies on every process's RNG
    staying alike while only one of them loads the encoders (tests/test_training_ddp.py, stage 1)."""
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    FluxTextEncoders.from_pretrained(root, torch_dtype=torch.float32)
    assert torch.equal(torch.rand(4), expected)
