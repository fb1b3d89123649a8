"""The built-in model ``pdserve-tiny``: a small random-weight Llama with a real BPE tokenizer.

It exists so that everything (engine, workers, router, tests, ``make serve``) runs without
downloading anything. Its weights are random, so its text is gibberish; its shapes are real
(GQA: 8 query heads over 4 KV heads).

On first use the folder is materialized into ``$PDSERVE_CACHE_DIR`` (default
``~/.cache/pdserve``) as ``pdserve-tiny-v<version>-<tokenizer hash>/``: ``config.json``,
``generation_config.json``, ``model.safetensors`` (weights from a fixed seed) and the
tokenizer files committed under ``engine/assets/pdserve-tiny/``. It is written into a
temporary folder and renamed into place, so concurrent first uses are safe: one rename wins,
the others find the folder complete and discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig

from engine.attention.torch_backend import TorchAttentionBackend
from engine.models.registry import get_model_class

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "pdserve-tiny"
TINY_MODEL_LABEL = "pdserve-tiny (random weights: a test model, its text is gibberish)"
TINY_VERSION = 1
TINY_SEED = 0
TINY_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / TINY_MODEL_NAME
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_BOS, _EOS, _EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def cache_root() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


def _tokenizer_digest() -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        digest.update((TINY_ASSETS_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def tiny_model_dir() -> Path:
    """Where the materialized model lives (it may not exist yet)."""
    return cache_root() / f"{TINY_MODEL_NAME}-v{TINY_VERSION}-{_tokenizer_digest()}"


def tiny_hf_config() -> dict[str, Any]:
    """The Hugging Face ``config.json`` of pdserve-tiny."""
    tokenizer = Tokenizer.from_file(str(TINY_ASSETS_DIR / "tokenizer.json"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "pdserve_description": TINY_MODEL_LABEL,
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.token_to_id(_BOS),
        "eos_token_id": tokenizer.token_to_id(_EOS),
        "torch_dtype": "float32",
    }


def _generation_config() -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(TINY_ASSETS_DIR / "tokenizer.json"))
    return {
        "bos_token_id": tokenizer.token_to_id(_BOS),
        "eos_token_id": [tokenizer.token_to_id(_EOS), tokenizer.token_to_id(_EOT)],
    }


def tiny_weights(
    hf_weight_shapes: dict[str, tuple[int, ...]], seed: int = TINY_SEED
) -> dict[str, torch.Tensor]:
    """Random weights by Hugging Face name, from ``seed`` (float32, CPU).

    Scaled so the random network is not flat: unit-RMS embeddings, projections with std
    ``1/sqrt(fan_in)``, norms at 1, and an output head giving logits of std about 3.
    """
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(hf_weight_shapes):
        shape = hf_weight_shapes[name]
        if len(shape) == 1:
            weights[name] = torch.ones(shape)
            continue
        std = 1.0 if "embed_tokens" in name else shape[1] ** -0.5
        if name == "lm_head.weight":
            std = 3.0 * shape[1] ** -0.5
        weights[name] = torch.randn(shape, generator=generator) * std
    return weights


def _write_model(folder: Path) -> None:
    config = tiny_hf_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps(_generation_config(), indent=2, sort_keys=True) + "\n"
    )
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY_ASSETS_DIR / name, folder / name)
    with torch.device("meta"):
        model = get_model_class(config["architectures"])(
            LlamaConfig.from_dict(config), TorchAttentionBackend()
        )
    save_file(
        tiny_weights(model.hf_weight_shapes()), folder / "model.safetensors", {"format": "pt"}
    )


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp_folder)`` beside ``final``, then rename it to ``final``: a cache folder is
    whole or absent. A lost race (another process renamed first) keeps the winner's."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def materialize_tiny_model() -> Path:
    """The model folder, created on first use (atomically; see the module docstring)."""
    final = tiny_model_dir()
    if not final.is_dir():
        write_atomically(final, _write_model)
        logger.info("materialized %s into %s", TINY_MODEL_LABEL, final)
    return final
