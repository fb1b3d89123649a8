"""The built-in pdserve-tiny model: materialization, determinism, tokenizer, committed assets."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig
from engine.kv_cache import allocate_kv_caches
from engine.loader import load_model, resolve_model_path
from engine.tiny import (
    TINY_ASSETS_DIR,
    TINY_MODEL_LABEL,
    TINY_MODEL_NAME,
    TOKENIZER_FILES,
    materialize_tiny_model,
    tiny_hf_config,
)
from engine.tokenizer import get_eos_token_id, get_eos_token_ids, load_tokenizer
from tests.helpers import make_attention_metadata

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_materializes_once_into_the_cache_dir(cache_dir):
    path = resolve_model_path(TINY_MODEL_NAME)
    assert path.parent == cache_dir
    expected = {"config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES}
    assert {p.name for p in path.iterdir()} == expected
    config = json.loads((path / "config.json").read_text())
    assert config["pdserve_description"] == TINY_MODEL_LABEL
    assert "random weights" in TINY_MODEL_LABEL
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(TINY_MODEL_NAME) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_weights_are_deterministic(tmp_path, monkeypatch):
    files = []
    for name in ("a", "b"):
        monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / name))
        files.append((materialize_tiny_model() / "model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_concurrent_first_use_is_safe(cache_dir):
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(materialize_tiny_model())
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in cache_dir.iterdir()] == [results[0].name]  # no temp folders left


def test_loads_and_matches_hugging_face(cache_dir):
    model, hf_config = load_model(ModelConfig(model=TINY_MODEL_NAME), TorchAttentionBackend(), CPU)
    assert hf_config.architectures == ["LlamaForCausalLM"]
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY_MODEL_NAME)).eval()
    ids = torch.arange(3, 23)
    positions, metadata = make_attention_metadata([0], [20], [[2, 0, 1, 3, 4]], 4)
    args = model.args
    kv = allocate_kv_caches(
        args.num_layers, 5, 4, args.num_kv_heads, args.head_dim, torch.float32, CPU
    )
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, positions, kv, metadata))
        reference = hf_model(ids[None]).logits[0]
    assert ((logits - reference).abs().max() / reference.abs().max()).item() <= 1e-4
    assert logits.std() > 1.0  # the random network is not flat


def test_tokenizer_round_trips_and_applies_the_chat_template():
    tokenizer = load_tokenizer(TINY_MODEL_NAME)
    assert tokenizer is not None
    assert len(tokenizer) == tiny_hf_config()["vocab_size"] == 2048
    text = "The scheduler sends 42 tokens, quickly! def f(x):\n    return x  # ünïcode ✓"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert prompt_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in prompt_ids


def test_eos_token_ids(cache_dir):
    tokenizer = load_tokenizer(TINY_MODEL_NAME)
    _, hf_config = load_model(ModelConfig(model=TINY_MODEL_NAME), TorchAttentionBackend(), CPU)
    eos, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert get_eos_token_ids(hf_config, tokenizer) == [eos, eot]
    assert get_eos_token_id(hf_config, tokenizer) == eos
    assert get_eos_token_id(None, None) is None


def test_load_tokenizer_skips_and_tolerates_missing_files(tmp_path):
    assert load_tokenizer(TINY_MODEL_NAME, skip_tokenizer_init=True) is None
    assert load_tokenizer(tmp_path) is None


def test_committed_tokenizer_equals_a_fresh_build(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (TINY_ASSETS_DIR / name).read_bytes(), name
