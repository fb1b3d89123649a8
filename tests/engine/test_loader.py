"""The weight loader: safetensors (single file and sharded), dummy weights, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig
from engine.kv_cache import allocate_kv_caches
from engine.loader import load_model, resolve_model_path, safetensors_files
from tests.helpers import assign_block_tables, make_attention_metadata, make_hf_checkpoint

CPU = torch.device("cpu")


def _load(path: Path, **kwargs):
    model, _ = load_model(ModelConfig(model=str(path), **kwargs), TorchAttentionBackend(), CPU)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _prefill_logits(model, lengths=(6, 3)) -> torch.Tensor:
    args = model.args
    tables = assign_block_tables(list(lengths), 4, 16)
    positions, metadata = make_attention_metadata([0] * len(lengths), list(lengths), tables, 4)
    kv = allocate_kv_caches(
        args.num_layers, 16, 4, args.num_kv_heads, args.head_dim, torch.float32, CPU
    )
    ids = torch.arange(sum(lengths)) % args.vocab_size
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, kv, metadata))


def test_single_file_and_sharded_load_the_same_weights(tmp_path):
    single = make_hf_checkpoint(tmp_path / "single", "llama_bias")
    sharded = make_hf_checkpoint(tmp_path / "sharded", "llama_bias", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(sharded)) > 1
    assert safetensors_files(single) == [single / "model.safetensors"]
    a, b = _state(_load(single)), _state(_load(sharded))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_fused_parameters_hold_the_hf_tensors(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama_bias")
    tensors = load_file(path / "model.safetensors")
    model = _load(path)
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    expected_qkv = torch.cat([tensors[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv"])
    assert torch.equal(attn.qkv_proj.bias, expected_qkv)
    gate_up = torch.cat([tensors[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(attn.o_proj.bias, tensors["model.layers.1.self_attn.o_proj.bias"])


def test_dummy_weights_need_only_config_json_and_are_deterministic(tmp_path):
    source = make_hf_checkpoint(tmp_path / "src", "llama")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(source / "config.json", config_only / "config.json")
    a = _load(config_only, load_format="dummy", seed=3)
    b = _load(config_only, load_format="dummy", seed=3)
    c = _load(config_only, load_format="dummy", seed=4)
    state_a, state_b, state_c = _state(a), _state(b), _state(c)
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert not torch.equal(state_a["embed_tokens.weight"], state_c["embed_tokens.weight"])
    assert torch.equal(state_a["norm.weight"], torch.ones_like(state_a["norm.weight"]))
    std = state_a["layers.0.mlp.down_proj.weight"].std().item()
    assert 0.015 < std < 0.025
    logits = _prefill_logits(a)
    assert logits.shape == (9, a.args.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, _prefill_logits(b))


def test_dummy_weights_in_bfloat16_are_created_in_bfloat16(tmp_path):
    path = make_hf_checkpoint(tmp_path, "qwen2")
    model = _load(path, load_format="dummy", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device == CPU for p in model.parameters())


def test_tied_embeddings_have_no_separate_head(tmp_path):
    path = make_hf_checkpoint(tmp_path, "qwen2")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = _load(path)
    assert model.lm_head is None
    hidden = torch.randn(2, model.args.hidden_size)
    assert torch.equal(model.compute_logits(hidden), hidden @ model.embed_tokens.weight.T)


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})


def test_missing_unexpected_and_misshapen_weights_are_errors(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing 1 weights: " + re.escape(name)):
        _load(path)
    _rewrite_weights(
        path, lambda t: t.update({name: torch.zeros(32, 64), "extra.w": torch.ones(1)})
    )
    with pytest.raises(ValueError, match=r"unexpected weight 'extra\.w'"):
        _load(path)
    _rewrite_weights(path, lambda t: (t.pop("extra.w"), t.update({name: torch.zeros(1, 64)})))
    with pytest.raises(ValueError, match=r"has shape \(1, 64\), expected \(32, 64\)"):
        _load(path)


def test_rotary_buffers_in_old_checkpoints_are_skipped(tmp_path):
    path = make_hf_checkpoint(tmp_path, "mistral")
    reference = _state(_load(path))
    _rewrite_weights(
        path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)})
    )
    state = _state(_load(path))
    assert all(torch.equal(reference[n], state[n]) for n in reference)


def test_resolve_model_path_rejects_folders_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert resolve_model_path(str(tmp_path)) == tmp_path
