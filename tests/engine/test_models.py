"""Our Llama-family model + the torch attention backend against Hugging Face transformers.

Error measure: ``max|ours - hf| / max|hf|`` over every compared logit (all positions of all
sequences of the step), in float32; the bound is 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig
from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.kv_cache import allocate_kv_caches
from engine.loader import load_model
from engine.models.layers import PackedLinear, RMSNorm
from engine.models.registry import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    get_model_class,
)
from engine.models.rope import RotaryEmbedding, rope_config_from_hf
from tests.helpers import (
    FAMILIES,
    assign_block_tables,
    make_attention_metadata,
    make_hf_checkpoint,
    tiny_hf_config,
)

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 48
MAX_REL_ERR = 1e-4
EXPECTED_ROPE = {"llama": "llama3", "llama_bias": "linear"}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    return request.param, path, hf_model, model


def _prompts(lengths: list[int], vocab_size: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:  # [len, vocab]
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def _kv_caches(model, dtype: torch.dtype = torch.float32, device=CPU) -> list[torch.Tensor]:
    args = model.args
    return allocate_kv_caches(
        args.num_layers, NUM_BLOCKS, BLOCK_SIZE, args.num_kv_heads, args.head_dim, dtype, device
    )


def _step(model, kv_caches, seqs: list[tuple[list[int], int, int]], tables, callback=None):
    """Run one step; ``seqs``: (all tokens, num_computed, num_new). Logits of every row."""
    device = kv_caches[0].device
    input_ids = [t for tokens, start, new in seqs for t in tokens[start : start + new]]
    positions, metadata = make_attention_metadata(
        [s[1] for s in seqs], [s[2] for s in seqs], tables, BLOCK_SIZE, device
    )
    with torch.inference_mode():
        hidden = model(
            torch.tensor(input_ids, device=device), positions, kv_caches, metadata, callback
        )
        return model.compute_logits(hidden).cpu()


def test_rope_variant_is_exercised(family):
    name, _, _, model = family
    assert model.args.rope.rope_type == EXPECTED_ROPE.get(name, "default")


def test_batched_prefill_matches_hf(family):
    _, _, hf_model, model = family
    prompts = _prompts([5, 11, 17])
    tables = assign_block_tables([len(p) for p in prompts], BLOCK_SIZE, NUM_BLOCKS)
    logits = _step(model, _kv_caches(model), [(p, 0, len(p)) for p in prompts], tables)
    assert logits.dtype == torch.float32
    assert logits.shape == (33, model.args.vocab_size)
    reference = torch.cat([_hf_logits(hf_model, p) for p in prompts])
    assert rel_err(logits, reference) <= MAX_REL_ERR


def test_chunked_prefill_and_decodes_match_hf(family):
    _, _, hf_model, model = family
    _check_chunked_prefill_and_decodes(hf_model, model)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_projections_prepacked_for_onednn_match_hf(family):
    _, path, hf_model, _ = family
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    model.pack_for_cpu()
    _check_chunked_prefill_and_decodes(hf_model, model)


@pytest.mark.skipif(not cpu_ops_available(), reason="the CPU ops do not build here")
def test_cpu_layer_ops_match_hf(family):
    """The norms, residual adds and rotary embedding as C++ ops, with the projections
    prepacked and every projection short of a prefill (step 3: three rows) through the
    panels, as the model runner sets a float32 CPU model up."""
    _, path, hf_model, _ = family
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    model.pack_for_cpu()
    model.use_cpu_layer_ops()
    assert all(m.cpu_op for m in model.modules() if isinstance(m, RMSNorm))
    panels = [m.panels is not None for m in model.modules() if isinstance(m, PackedLinear)]
    assert panels and all(panels) == cpu_layer_ops.panel_linear_pays()
    _check_chunked_prefill_and_decodes(hf_model, model)


@pytest.mark.parametrize("setup", ["torch", "cpu-ops"])
def test_only_the_sampled_rows_leave_the_last_layer(family, setup):
    """``output_rows``: the last token of each prompt (or none, for a chunk that samples
    nothing) goes through the last layer's o-projection and MLP; every row's K/V are still
    written, so the decode step after it matches HF."""
    _, path, hf_model, model = family
    if setup == "cpu-ops":
        if not cpu_ops_available():
            pytest.skip("the CPU ops do not build here")
        model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
        model.pack_for_cpu()
        model.use_cpu_layer_ops()
    prompts = _prompts([5, 11, 17])
    lengths = [len(p) for p in prompts]
    tables = assign_block_tables([n + 1 for n in lengths], BLOCK_SIZE, NUM_BLOCKS)
    kv_caches = _kv_caches(model)
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions, metadata = make_attention_metadata([0, 0, 0], lengths, tables, BLOCK_SIZE, CPU)
    last_rows = torch.tensor([4, 15, 32])
    with torch.inference_mode():
        none = model(input_ids, positions, _kv_caches(model), metadata, output_rows=last_rows[:0])
        hidden = model(input_ids, positions, kv_caches, metadata, output_rows=last_rows)
        logits = model.compute_logits(hidden)
    assert none.shape == (0, model.args.hidden_size)
    assert logits.shape == (3, model.args.vocab_size)
    references = [_hf_logits(hf_model, p) for p in prompts]
    assert rel_err(logits, torch.stack([r[-1] for r in references])) <= MAX_REL_ERR
    # One decode step each on the pruned prefill's cache.
    nxt = [int(r[-1].argmax()) for r in references]
    decoded = _step(model, kv_caches, [(p + [t], len(p), 1) for p, t in zip(prompts, nxt)], tables)
    reference = torch.stack([_hf_logits(hf_model, p + [t])[-1] for p, t in zip(prompts, nxt)])
    assert rel_err(decoded, reference) <= MAX_REL_ERR


def _check_chunked_prefill_and_decodes(hf_model, model) -> None:
    """Step 1: A whole, B's first chunk. Step 2: A decodes, B's second chunk, C whole.
    Step 3: A, B and C decode. Every row is compared with HF on the full sequence."""
    a, b, c = _prompts([6, 13, 9])
    extra = _prompts([3, 2, 1])
    a_full, b_full, c_full = a + extra[0], b + extra[1], c + extra[2]
    tables = assign_block_tables([len(a_full), len(b_full), len(c_full)], BLOCK_SIZE, NUM_BLOCKS)
    kv_caches = _kv_caches(model)
    ref_a, ref_b, ref_c = (_hf_logits(hf_model, s) for s in (a_full, b_full, c_full))

    step1 = _step(model, kv_caches, [(a_full, 0, 6), (b_full, 0, 7)], tables[:2])
    assert rel_err(step1, torch.cat([ref_a[:6], ref_b[:7]])) <= MAX_REL_ERR

    step2 = _step(model, kv_caches, [(a_full, 6, 1), (b_full, 7, 6), (c_full, 0, 9)], tables)
    assert rel_err(step2, torch.cat([ref_a[6:7], ref_b[7:13], ref_c[:9]])) <= MAX_REL_ERR

    step3 = _step(model, kv_caches, [(a_full, 7, 1), (b_full, 13, 1), (c_full, 9, 1)], tables)
    assert rel_err(step3, torch.stack([ref_a[7], ref_b[13], ref_c[9]])) <= MAX_REL_ERR


def test_layer_callback_fires_after_each_layer_wrote_its_kv(family):
    _, _, _, model = family
    prompt = _prompts([9])[0]
    tables = assign_block_tables([9], BLOCK_SIZE, NUM_BLOCKS)
    kv_caches = _kv_caches(model)
    slots = torch.tensor(
        [tables[0][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(9)]
    )
    seen: list[tuple[int, bool, bool]] = []

    def callback(layer: int) -> None:
        written = kv_caches[layer].flatten(1, 2)[:, slots].abs().sum(dim=(-1, -2)) > 0
        later = [kv_caches[i].abs().sum().item() == 0 for i in range(layer + 1, len(kv_caches))]
        seen.append((layer, bool(written.all()), all(later)))

    _step(model, kv_caches, [(prompt, 0, 9)], tables, callback)
    assert seen == [(i, True, True) for i in range(model.args.num_layers)]


@pytest.mark.gpu
def test_cuda_matches_hf(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cuda = torch.device("cuda")
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), cuda)
    prompts = _prompts([5, 11])
    tables = assign_block_tables([5, 12], BLOCK_SIZE, NUM_BLOCKS)
    kv_caches = _kv_caches(model, device=cuda)
    logits = _step(model, kv_caches, [(p, 0, len(p)) for p in prompts], tables)
    reference = torch.cat([_hf_logits(hf_model, p) for p in prompts])
    assert rel_err(logits, reference) <= MAX_REL_ERR
    b_full = prompts[1] + [7]
    decode = _step(model, kv_caches, [(b_full, 11, 1)], tables[1:])
    assert rel_err(decode, _hf_logits(hf_model, b_full)[11:]) <= MAX_REL_ERR


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_run_and_stay_close(tmp_path, dtype):
    path = make_hf_checkpoint(tmp_path, "llama")
    prompts = _prompts([5, 12])
    tables = assign_block_tables([5, 12], BLOCK_SIZE, NUM_BLOCKS)
    seqs = [(p, 0, len(p)) for p in prompts]
    model32, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    reference = _step(model32, _kv_caches(model32), seqs, tables)
    model, _ = load_model(ModelConfig(model=str(path), dtype=dtype), TorchAttentionBackend(), CPU)
    torch_dtype = getattr(torch, dtype)
    assert all(p.dtype == torch_dtype for p in model.parameters())
    logits = _step(model, _kv_caches(model, torch_dtype), seqs, tables)
    assert torch.isfinite(logits).all()
    assert rel_err(logits, reference) <= 0.05


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    with pytest.raises(UnsupportedModelError) as excinfo:
        get_model_class(["GPT2LMHeadModel"])
    message = str(excinfo.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)

    path = make_hf_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"FancyNewForCausalLM.*LlamaForCausalLM"):
        load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)


def test_supported_architectures():
    assert set(SUPPORTED_ARCHITECTURES) >= {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
    }


def test_sliding_window_needs_max_model_len_within_the_window(tmp_path: Path):
    path = make_hf_checkpoint(tmp_path, "mistral", sliding_window=64)
    with pytest.raises(NotImplementedError, match=r"sliding-window.*max_model_len <= 64"):
        load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    model, _ = load_model(
        ModelConfig(model=str(path), max_model_len=64), TorchAttentionBackend(), CPU
    )
    assert model.args.num_layers == 2


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=lambda p: p["rope_type"],
)
def test_rope_frequencies_equal_hugging_face(rope_parameters):
    """Per position: Hugging Face's inverse frequencies (for ``dynamic``, those it would use
    for a sequence ending at that position)."""
    config = tiny_hf_config("llama", head_dim=32, rope_parameters=dict(rope_parameters))
    rotary = RotaryEmbedding(rope_config_from_hf(config, 32))
    positions = torch.tensor([0, 5, 255, 256, 300, 1000])  # max_position_embeddings = 256
    cos, sin = rotary.cos_sin(positions, torch.float32)
    init = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]]
    for row, pos in enumerate(positions.tolist()):
        inv_freq, _ = init(config, CPU, seq_len=pos + 1)
        angles = pos * torch.cat([inv_freq, inv_freq])
        torch.testing.assert_close(cos[row], angles.cos(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin[row], angles.sin(), rtol=1e-6, atol=1e-6)


def test_unsupported_rope_type_is_named():
    config = tiny_hf_config("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="'yarn'"):
        rope_config_from_hf(config, 16)
