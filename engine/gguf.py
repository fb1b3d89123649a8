"""Reading a GGUF checkpoint (llama.cpp's format) as a Hugging Face Llama-family checkpoint.

A ``.gguf`` file holds metadata (architecture hyper-parameters, the tokenizer, the chat
template) and tensors, most of them quantized in blocks. This module turns it into what the
rest of the engine already loads:

- ``hf_config_from_gguf``: the ``config.json`` dict (``{arch}.*`` metadata keys);
- ``iterate_gguf_weights``: every tensor by its Hugging Face name, dequantized to float32 by
  the ``gguf`` library's own reference (``gguf.quants.dequantize``), in Hugging Face's
  ``[out_features, in_features]`` order, with the Q/K row permutation that llama.cpp's
  converter applies for its rotary embedding undone.

Only the reading is here; ``engine/gguf_cache.py`` writes the result (config, tokenizer,
dequantized safetensors) into the cache folder once, so later starts skip all of this.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from engine.models.registry import UnsupportedModelError


class GGUFError(ValueError):
    """A ``.gguf`` file pdserve cannot read: malformed, or a key or tensor it needs is missing."""


class UnsupportedGGUFArchitectureError(UnsupportedModelError, GGUFError):
    """The file's ``general.architecture`` has no mapping onto pdserve's models."""


class UnsupportedGGUFQuantizationError(GGUFError):
    """A tensor is stored in a quantization type pdserve does not dequantize."""


class UnsupportedGGUFFeatureError(GGUFError):
    """The file asks for something the model does not implement (e.g. a RoPE variant)."""


SUPPORTED_QUANT_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)

# general.architecture -> (Hugging Face class, whether llama.cpp permuted the Q/K rows).
# llama.cpp permutes q/k only for its "llama" converter (rotate-half RoPE -> interleaved).
_ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("LlamaForCausalLM", True)}
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_ARCHITECTURES))

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_MISSING: Any = object()


def open_gguf(path: Path) -> GGUFReader:
    """A memory-mapped reader of ``path`` (tensors are read only when touched)."""
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as error:
        raise GGUFError(f"{path} is not a readable GGUF file: {error}") from error


def metadata(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata ``key`` (str, int, float, bool or list), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def architecture(reader: GGUFReader) -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedGGUFArchitectureError(
            f"unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    return arch


def check_quant_types(reader: GGUFReader) -> None:
    """Every tensor's type is one we dequantize (checked before any work starts)."""
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedGGUFQuantizationError(
                f"tensor {tensor.name!r} is stored as {qtype.name}, which pdserve does not "
                f"dequantize; supported: {', '.join(t.name for t in SUPPORTED_QUANT_TYPES)}"
            )


def hf_config_from_gguf(reader: GGUFReader) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of the checkpoint, from the ``{arch}.*`` metadata."""
    arch = architecture(reader)
    names = {tensor.name for tensor in reader.tensors}

    def key(name: str, default: Any = _MISSING) -> Any:
        return metadata(reader, f"{arch}.{name}", default)

    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden_size // num_heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedGGUFFeatureError(
            f"partial rotary embedding ({arch}.rope.dimension_count={rope_dim}, "
            f"head_dim={head_dim}) is not supported"
        )
    if "rope_freqs.weight" in names:
        raise UnsupportedGGUFFeatureError(
            "per-frequency RoPE factors (tensor 'rope_freqs.weight', Llama 3.1+) are not "
            "supported from GGUF; load the Hugging Face checkpoint instead"
        )
    rope_scaling = key("rope.scaling.type", "none")
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch][0]],
        "model_type": arch,
        "vocab_size": int(key("vocab_size", 0) or len(metadata(reader, "tokenizer.ggml.tokens"))),
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float32",
    }
    if rope_scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(key("rope.scaling.factor")),
        }
    elif rope_scaling not in ("none", ""):
        raise UnsupportedGGUFFeatureError(
            f"RoPE scaling {rope_scaling!r} ({arch}.rope.scaling.type) is not supported "
            "from GGUF; supported: none, linear"
        )
    for token in ("bos", "eos", "pad"):
        token_id = metadata(reader, f"tokenizer.ggml.{token}_token_id", None)
        if token_id is not None:
            config[f"{token}_token_id"] = int(token_id)
    return config


def eos_token_ids(reader: GGUFReader) -> list[int]:
    """End-of-sequence ids from the tokenizer metadata: eos, then end-of-turn if distinct."""
    ids = [metadata(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no place in the Llama-family model")


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:  # float32, Hugging Face shape
    """One tensor in float32 by ``gguf.quants.dequantize``, shaped ``[rows, cols]`` like HF.

    GGUF lists dimensions fastest-first (``[cols, rows]``); the reader's arrays are already
    row-major, so reversing the listed shape gives Hugging Face's.
    """
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in SUPPORTED_QUANT_TYPES:
        raise UnsupportedGGUFQuantizationError(
            f"tensor {tensor.name!r} is stored as {qtype.name}, which pdserve does not dequantize"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    weight = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32).reshape(shape)
    return weight if weight.flags.writeable else weight.copy()  # F32: a view of the mmap


def unpermute_qk(
    weight: np.ndarray,  # [num_heads * head_dim, ...] rows in llama.cpp's interleaved order
    num_heads: int,
) -> np.ndarray:  # [num_heads * head_dim, ...] rows in Hugging Face's rotate-half order
    """Undo llama.cpp's ``permute``: per head, rows ``(half, pair)`` back to ``(pair, half)``.

    llama.cpp rotates adjacent pairs, Hugging Face the two halves of each head, so its
    converter reorders each head's rows ``reshape(2, d/2).T``; this is the inverse.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def iterate_gguf_weights(
    reader: GGUFReader, hf_config: dict[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Every (Hugging Face name, float32 array) of the checkpoint, one tensor at a time."""
    check_quant_types(reader)
    permuted = _ARCHITECTURES[architecture(reader)][1]
    heads = {
        "self_attn.q_proj": hf_config["num_attention_heads"],
        "self_attn.k_proj": hf_config["num_key_value_heads"],
    }
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = dequantize_tensor(tensor)
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]  # e.g. "self_attn.q_proj"
        if permuted and name.startswith("model.layers.") and module in heads:
            weight = unpermute_qk(weight, heads[module])
        yield name, weight
