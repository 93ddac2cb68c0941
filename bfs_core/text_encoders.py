"""FLUX text encoders (CLIP-L pooled + T5 sequence), loaded offline from a diffusers-layout folder.

Folder layout (as in black-forest-labs/FLUX.1-Fill-dev): ``text_encoder/`` (CLIPTextModel), ``tokenizer/``,
``text_encoder_2/`` (T5EncoderModel), ``tokenizer_2/``. Everything is read with ``local_files_only=True``.
"""

import json
import logging
import os
import pathlib
import string
import tempfile

import torch
import transformers
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .atomic import atomic_dir
from .errors import UserInputError, reading_folder


logger = logging.getLogger(__name__)

_SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
_CLIP_MAX_LENGTH = 77  # CLIP-L position embeddings; FluxPipeline uses tokenizer.model_max_length (77)
_T5_MAX_LENGTH = 512  # FluxPipeline.check_inputs: max_sequence_length <= 512
_TINY_WORDS = (
    "a the of and in on with to is are an at by for from background foreground object layer photo "
    "red green blue white black yellow cat dog bird tree house car person table cup flower sky grass "
    "wooden small large bright dark shadow standing sitting on top near"
).split()
_TINY_CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;()"
# transformers 5 builds CLIP/T5 tokenizers from in-memory vocabularies; 4.x reads CLIP's from files and has no T5
# tokenizer without a SentencePiece model but the `tokenizers`-backed T5TokenizerFast. 4.56 renamed from_pretrained's
# `torch_dtype` to `dtype` (4.50-4.55 ignore `dtype`, 5.x warns on `torch_dtype`).
_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])
_DTYPE_KWARG = "dtype" if _TRANSFORMERS >= (4, 56) else "torch_dtype"


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


def _check_folder(root: pathlib.Path, input_name: str = "root") -> None:
    if not root.is_dir():
        raise UserInputError(
            f"`{input_name}` must be an existing folder but got {str(root)!r}. Pass the FLUX.1-Fill-dev folder."
        )
    missing = [name for name in _SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise UserInputError(
            f"`{input_name}` must hold the diffusers text-encoder subfolders {list(_SUBFOLDERS)}, but {str(root)!r} "
            f"lacks {missing}. Pass the FLUX.1-Fill-dev (or FLUX.1-dev) diffusers folder; nothing is downloaded."
        )


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    # Follows diffusers.pipelines.flux.pipeline_flux.FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds.
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_overflowing_tokens=False,
        return_length=False,
        return_tensors="pt",
    ).input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        logger.warning("Prompts were truncated to %d %s tokens", max_length, name)
    return ids


class FluxTextEncoders:
    """The two FLUX text encoders and their tokenizers.

    Args:
        tokenizer: the CLIP tokenizer (`CLIPTokenizer`).
        text_encoder: `CLIPTextModel`; its `pooler_output` (the first EOS token) is the pooled prompt embedding.
        tokenizer_2: the T5 tokenizer (`T5TokenizerFast` / `T5Tokenizer`).
        text_encoder_2: `T5EncoderModel`; its `last_hidden_state` is the prompt sequence embedding.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: CLIPTextModel,
        tokenizer_2: PreTrainedTokenizerBase,
        text_encoder_2: T5EncoderModel,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        name: str = "text_encoders",
    ) -> "FluxTextEncoders":
        """Load from a diffusers-layout folder, strictly from local files; `name` is the input, named in errors."""
        root = pathlib.Path(root)
        _check_folder(root, name)
        with reading_folder(root / "tokenizer", name, "the CLIP tokenizer folder"):
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        with reading_folder(root / "tokenizer_2", name, "the T5 tokenizer folder"):
            tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        with reading_folder(root / "text_encoder", name, "the CLIP-L text encoder folder"):
            text_encoder = CLIPTextModel.from_pretrained(
                root / "text_encoder", **{_DTYPE_KWARG: torch_dtype}, local_files_only=True
            )
        with reading_folder(root / "text_encoder_2", name, "the T5-XXL text encoder folder"):
            text_encoder_2 = T5EncoderModel.from_pretrained(
                root / "text_encoder_2", **{_DTYPE_KWARG: torch_dtype}, local_files_only=True
            )
        text_encoder.to(device).eval()
        text_encoder_2.to(device).eval()
        logger.info(
            "Loaded FLUX text encoders from %s: CLIP %s (%.1f M params, pooled dim %d), T5 %s (%.1f M params, "
            "dim %d), as %s on %s",
            root,
            type(tokenizer).__name__,
            sum(p.numel() for p in text_encoder.parameters()) / 1e6,
            text_encoder.config.hidden_size,
            type(tokenizer_2).__name__,
            sum(p.numel() for p in text_encoder_2.parameters()) / 1e6,
            text_encoder_2.config.d_model,
            torch_dtype,
            device,
        )
        return cls(tokenizer, text_encoder, tokenizer_2, text_encoder_2)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts as FluxPipeline.encode_prompt does.

        Returns:
            prompt_embeds [B, max_sequence_length, T5 dim] (T5 `last_hidden_state`, padded/truncated, no attention
            mask, as in FluxPipeline) and pooled [B, CLIP dim] (CLIP `pooler_output` over 77 padded tokens), both in
            the text encoders' dtype.
        """
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a non-empty list of str but got {prompts!r}. Wrap one prompt in [].")
        if not 1 <= max_sequence_length <= _T5_MAX_LENGTH:
            raise ValueError(
                f"`max_sequence_length` must be in [1, {_T5_MAX_LENGTH}] but got {max_sequence_length}. "
                "FLUX was trained with 512 T5 tokens."
            )
        clip_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        clip_ids = _tokenize(self.tokenizer, prompts, clip_length, "CLIP")
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = _tokenize(self.tokenizer_2, prompts, max_sequence_length, "T5")
        prompt_embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return prompt_embeds.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)


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
