"""End to end: the offline LLM's greedy tokens equal Hugging Face transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.helpers import make_hf_checkpoint

FAMILIES = ("llama", "qwen2", "mistral")
MAX_TOKENS = 12


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    lengths = (5, 17, 9, 30)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare against ignore_eos
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def _ours(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    vocab_size = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    prompts = _prompts(vocab_size)
    return path, prompts, _hf_greedy(path, prompts, MAX_TOKENS)


def _llm(path: Path, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", "cpu")
    return LLM(model=str(path), skip_tokenizer_init=True, **kwargs)


def test_greedy_matches_hf(checkpoint) -> None:
    path, prompts, expected = checkpoint
    assert _ours(_llm(path), prompts) == expected


def test_greedy_matches_hf_with_torch_linears(checkpoint) -> None:
    """The unpacked projections (``F.linear``), as on GPUs and in half precision."""
    path, prompts, expected = checkpoint
    llm = _llm(path, linear_backend="torch")
    assert llm.engine.runner.linear_backend == "torch"
    assert _ours(llm, prompts) == expected


def test_greedy_matches_hf_with_chunked_prefill(checkpoint) -> None:
    path, prompts, expected = checkpoint
    llm = _llm(path, max_num_batched_tokens=8)  # smaller than the longest prompt (30)
    assert _ours(llm, prompts) == expected


def test_greedy_matches_hf_under_preemption(checkpoint) -> None:
    path, prompts, expected = checkpoint
    # 4 prompts need 5+8+6+11 = 30 blocks of 4 at the end; 14 blocks force preemption.
    llm = _llm(path, num_gpu_blocks_override=14)
    assert _ours(llm, prompts) == expected
    assert llm.engine.stats().num_preemptions > 0


def test_greedy_matches_hf_with_prefix_cache_hits(checkpoint) -> None:
    path, prompts, _ = checkpoint
    shared = prompts[3][:24]  # six full blocks of 4
    with_prefix = [shared + p[:5] for p in prompts[:3]]
    expected = _hf_greedy(path, with_prefix, MAX_TOKENS)
    llm = _llm(path, enable_prefix_caching=True)
    assert _ours(llm, [shared + [7]], max_tokens=1)  # warms the cache with the prefix
    hits_before = llm.engine.stats().prefix_cache_hits
    assert _ours(llm, with_prefix) == expected
    assert llm.engine.stats().prefix_cache_hits - hits_before >= 3 * len(shared)


def test_seeded_sampling_is_reproducible(checkpoint) -> None:
    path, prompts, _ = checkpoint
    llm = _llm(path)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params)[0].outputs[0].token_ids
    # Same seed, different batch companions: same tokens.
    batch = [{"prompt_token_ids": p} for p in prompts]
    again = llm.generate(batch, [params] + [SamplingParams(temperature=1.0, max_tokens=8)] * 3)
    assert again[0].outputs[0].token_ids == first
