"""Loading a checkpoint's tokenizer, and finding its end-of-sequence token ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.tiny import TINY_ASSETS_DIR, TINY_MODEL_NAME

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def tokenizer_path(name_or_path: str | Path) -> Path:
    """``pdserve-tiny`` -> its committed tokenizer files (no weights needed); else the path."""
    if str(name_or_path) == TINY_MODEL_NAME:
        return TINY_ASSETS_DIR
    return Path(name_or_path).expanduser()


def load_tokenizer(
    name_or_path: str | Path, skip_tokenizer_init: bool = False
) -> PreTrainedTokenizerBase | None:
    """The Hugging Face tokenizer, or None when skipped or when the folder has none.

    A folder without tokenizer files is accepted (a ``config.json``-only checkpoint run with
    dummy weights is fed token ids); the caller then cannot take text.
    """
    if skip_tokenizer_init:
        return None
    path = tokenizer_path(name_or_path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: only token ids can be used", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def get_eos_token_ids(
    hf_config: Any = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_path: str | Path | None = None,
) -> list[int]:
    """End-of-sequence ids, the primary one first, without duplicates.

    Order: the tokenizer's ``eos_token_id``, then ``generation_config.json``'s
    ``eos_token_id`` (an int or a list, e.g. Llama 3 Instruct's ``<|eot_id|>``), then the
    model config's. ``generation_config.json`` is looked up in ``model_path``, by default the
    folder ``hf_config`` was loaded from. Use the first as ``Request.eos_token_id``; the
    others are extra stop tokens.
    """
    candidates: list[int] = []
    if tokenizer is not None:
        candidates += _as_list(tokenizer.eos_token_id)
    if model_path is None and hf_config is not None:
        model_path = getattr(hf_config, "_name_or_path", None) or None
    if model_path is not None:
        generation_config = Path(model_path) / "generation_config.json"
        if generation_config.is_file():
            generation = json.loads(generation_config.read_text())
            candidates += _as_list(generation.get("eos_token_id"))
    if hf_config is not None:
        candidates += _as_list(getattr(hf_config, "eos_token_id", None))
    return list(dict.fromkeys(candidates))


def get_eos_token_id(
    hf_config: Any = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> int | None:
    """The primary end-of-sequence id (see ``get_eos_token_ids``), or None if there is none."""
    ids = get_eos_token_ids(hf_config, tokenizer)
    return ids[0] if ids else None
