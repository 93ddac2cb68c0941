"""FLUX text encoders (CLIP-L pooled + T5 sequence), loaded offline from a diffusers-layout folder.

Folder layout (as in black-forest-labs/FLUX.1-Fill-dev): ``text_encoder/`` (CLIPTextModel), ``tokenizer/``,
``text_encoder_2/`` (T5EncoderModel), ``tokenizer_2/``. Everything is read with ``local_files_only=True``.
"""

import json
import logging
import os
import pathlib

import torch
import transformers
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from .errors import UserInputError, reading_folder


logger = logging.getLogger(__name__)

_SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
_CLIP_MAX_LENGTH = 77  # CLIP-L position embeddings; FluxPipeline uses tokenizer.model_max_length (77)
_T5_MAX_LENGTH = 512  # FluxPipeline.check_inputs: max_sequence_length <= 512
# The pack supports transformers 4.50+ and 5.x. 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (4.50-4.55
# refuse `dtype`, 5.x warns on `torch_dtype`); bfs_core/tiny/text_encoders.py builds its tokenizers per major version.
_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])
_DTYPE_KWARG = "dtype" if _TRANSFORMERS >= (4, 56) else "torch_dtype"


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


def _tokenizer_kwargs(folder: pathlib.Path) -> dict:
    """`AutoTokenizer.from_pretrained` arguments; on transformers 4.x, a folder written by 5.x (the committed toy
    model's) stores `extra_special_tokens` as a list where 4.x expects a name -> token dict: it is read as none (the
    tokens themselves are in tokenizer.json either way)."""
    kwargs = {"local_files_only": True}
    config = folder / "tokenizer_config.json"
    if _TRANSFORMERS < (5, 0) and config.is_file():
        if isinstance(json.loads(config.read_text(encoding="utf-8")).get("extra_special_tokens"), list):
            kwargs["extra_special_tokens"] = {}
    return kwargs


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
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **_tokenizer_kwargs(root / "tokenizer"))
        with reading_folder(root / "tokenizer_2", name, "the T5 tokenizer folder"):
            tokenizer_2 = AutoTokenizer.from_pretrained(
                root / "tokenizer_2", **_tokenizer_kwargs(root / "tokenizer_2")
            )
        # transformers 4.50-4.55 initialise the weights randomly before reading them: loading must leave the
        # caller's RNG as it was (DDP training draws the same noise on every process, and only one loads these).
        with torch.random.fork_rng(devices=[]):
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
