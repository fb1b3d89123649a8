"""Shared test helpers: tiny Hugging Face checkpoints and hand-built attention metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.attention.base import AttentionMetadata

# Family -> (model_type, architecture, config overrides). Every family is small (hidden 64,
# 2 layers, vocab 256) and exercises what makes it different.
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # GQA (4 query heads over 2 KV heads) and Llama 3.1 frequency scaling (with medium
    # frequencies inside the smoothing band, for head_dim 16 and theta 500000).
    "llama": (
        "llama",
        "LlamaForCausalLM",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    # Llama with attention_bias (q/k/v/o) and mlp_bias, and linear RoPE scaling.
    "llama_bias": (
        "llama",
        "LlamaForCausalLM",
        {
            "num_key_value_heads": 2,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    # Qwen2: q/k/v bias, tied embeddings, MHA.
    "qwen2": (
        "qwen2",
        "Qwen2ForCausalLM",
        {"num_key_value_heads": 4, "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
    ),
    # Mistral: an explicit head_dim that differs from hidden_size // num_heads; no window.
    "mistral": (
        "mistral",
        "MistralForCausalLM",
        {"num_key_value_heads": 1, "head_dim": 32, "sliding_window": None},
    ),
    # Qwen3 (dense): per-head q/k RMSNorm.
    "qwen3": (
        "qwen3",
        "Qwen3ForCausalLM",
        {"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False},
    ),
}
FAMILIES = tuple(_FAMILIES)


def tiny_hf_config(family: str, **overrides: Any) -> Any:
    """A ``transformers`` config of the family (see ``FAMILIES``), with ``overrides``."""
    model_type, architecture, family_overrides = _FAMILIES[family]
    kwargs: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    kwargs.update(family_overrides)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Hugging Face initializes norms to 1 and biases to 0: randomize them too, so a weight
    # that is loaded into the wrong place (or not at all) changes the logits.
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            param.copy_(noise)
        else:
            param.copy_(noise * param.shape[1] ** -0.5)


def make_hf_checkpoint(
    tmp_path: Path,
    family: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a random tiny checkpoint (config.json + safetensors) with ``save_pretrained``.

    Same ``family``, ``seed`` and ``overrides`` give the same weights. ``max_shard_size``
    (e.g. ``"50KB"``) writes a sharded checkpoint with ``model.safetensors.index.json``.
    """
    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    path = Path(tmp_path) / f"{family}-checkpoint"
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kwargs)
    return path


def make_attention_metadata(
    num_computed: list[int],
    num_new: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [num_tokens] and metadata for one step, as the model runner builds them.

    Sequence ``i`` has ``num_computed[i]`` tokens cached and computes ``num_new[i]`` more;
    decodes (one new token) must come first. ``block_tables[i]`` covers its whole context.
    """
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens = []
    for computed, new, table in zip(num_computed, num_new, block_tables, strict=True):
        for pos in range(computed, computed + new):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        query_start_loc.append(query_start_loc[-1] + new)
        seq_lens.append(computed + new)
    num_decodes = 0
    while num_decodes < len(num_new) and num_new[num_decodes] == 1:
        num_decodes += 1
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    metadata = AttentionMetadata(
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(num_new),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), metadata


def assign_block_tables(
    context_lens: list[int], block_size: int, num_blocks: int, seed: int = 0
) -> list[list[int]]:
    """Non-contiguous block tables (a seeded permutation of the block ids, none shared)."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for length in context_lens:
        needed = -(-length // block_size)
        if needed > len(order):
            raise ValueError(f"{num_blocks} blocks are too few for contexts {context_lens}")
        tables.append(order[:needed])
        order = order[needed:]
    return tables
