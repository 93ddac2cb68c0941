"""Tiny random CLIP + T5 text encoders with offline-built tokenizers: the real tokenizer classes, tiny vocabularies."""

from __future__ import annotations

import json
import pathlib
import string
import tempfile

import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ..atomic import atomic_dir
from ..text_encoders import _CLIP_MAX_LENGTH, _T5_MAX_LENGTH, _TRANSFORMERS


_TINY_WORDS = (
    "a the of and in on with to is are an at by for from background foreground object layer photo "
    "red green blue white black yellow cat dog bird tree house car person table cup flower sky grass "
    "wooden small large bright dark shadow standing sitting on top near"
).split()
_TINY_CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;()"


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real CLIPTokenizer (byte-level BPE, lower-casing, `</w>` word ends) over a tiny vocabulary.

    Built in-process: every character alone and as a word end, plus merges that spell each word of `_TINY_WORDS`.
    The special tokens come last, so `<|endoftext|>` has the highest id as in the real CLIP-L vocabulary.
    """
    vocab: dict[str, int] = {}
    for token in [*_TINY_CHARS, *(c + "</w>" for c in _TINY_CHARS)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in _TINY_WORDS:
        # Merge left to right: "c" + "a" -> "ca", "ca" + "t</w>" -> "cat</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if _TRANSFORMERS >= (5, 0):
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)
    with tempfile.TemporaryDirectory() as folder:  # transformers 4.x: the same vocabulary, through its two files
        vocab_file, merges_file = pathlib.Path(folder, "vocab.json"), pathlib.Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=_CLIP_MAX_LENGTH)


def _tiny_t5_tokenizer() -> T5Tokenizer:
    """A real T5 (Unigram, `▁` word starts) tokenizer over a tiny vocabulary: words, then single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in _TINY_WORDS]
    vocab += [(c, -3.0) for c in _TINY_CHARS + string.ascii_uppercase]
    if _TRANSFORMERS >= (5, 0):
        return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)
    # transformers 4.x: the Unigram model transformers 5's T5Tokenizer builds, wrapped in T5TokenizerFast.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "▁", "prepend_scheme": "always", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return transformers.T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def write_tiny_text_encoders(
    root: pathlib.Path, *, t5_dim: int = 32, clip_dim: int = 32, seed: int = 0
) -> pathlib.Path:
    """Write tiny random CLIP + T5 encoders with offline-built tokenizers in the diffusers layout under `root`.

    The tokenizers are the real classes (CLIPTokenizer, T5Tokenizer) over tiny vocabularies, so the folder loads
    through the same `AutoTokenizer` path as the real FLUX folders. Returns `root`.
    """
    for name, dim in (("t5_dim", t5_dim), ("clip_dim", clip_dim)):
        if dim < 8 or dim % 4 != 0:
            raise ValueError(f"`{name}` must be a multiple of 4 and at least 8 but got {dim}.")
    root = pathlib.Path(root)
    clip_tokenizer, t5_tokenizer = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=clip_dim,
        intermediate_size=2 * clip_dim,
        projection_dim=clip_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=clip_tokenizer.bos_token_id,
        # Not 2, so CLIPTextTransformer pools at the first `eos_token_id` (transformers>=4.31 path) rather than at
        # argmax(input_ids); both agree here because <|endoftext|> is also the highest id.
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=t5_dim,
        d_kv=t5_dim // 4,
        d_ff=2 * t5_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL in FLUX
        tie_word_embeddings=False,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        clip = CLIPTextModel(clip_config).eval()
        t5 = T5EncoderModel(t5_config).eval()
    parts = {"text_encoder": clip, "text_encoder_2": t5, "tokenizer": clip_tokenizer, "tokenizer_2": t5_tokenizer}
    for folder, part in parts.items():
        with atomic_dir(root / folder) as tmp:
            part.save_pretrained(tmp)
    return root
