"""The offline API on the built-in model: stop strings and tokens, n, logprobs, token prompts."""

from __future__ import annotations

import math

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="pdserve-tiny", device="cpu", kv_cache_size_gib=0.05)


def _greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def test_stop_string_truncates_text_and_finishes(llm: LLM) -> None:
    full = llm.generate(PROMPT, _greedy())[0].outputs[0]
    assert len(full.text) > 12
    stop = full.text[8:12]  # a stop string that first completes inside the output
    first = full.text.find(stop)
    out = llm.generate(PROMPT, _greedy(stop=[stop]))[0].outputs[0]
    assert out.text == full.text[:first]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(PROMPT, _greedy(stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == full.text[: first + len(stop)]


def test_stop_token_id_finishes_with_the_token(llm: LLM) -> None:
    full = llm.generate(PROMPT, _greedy())[0].outputs[0]
    stop_token = full.token_ids[3]
    first = full.token_ids.index(stop_token)
    out = llm.generate(PROMPT, _greedy(stop_token_ids=[stop_token]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_n_samples_differ_and_reproduce(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    first = [o.token_ids for o in llm.generate(PROMPT, params)[0].outputs]
    again = [o.token_ids for o in llm.generate(PROMPT, params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 3


def test_logprobs_of_greedy_tokens_are_the_top_ones(llm: LLM) -> None:
    out = llm.generate(PROMPT, _greedy(max_tokens=5, logprobs=3))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == token_id
        assert len(entry.top_logprobs) == 3
        assert math.isclose(entry.logprob, max(entry.top_logprobs.values()), rel_tol=1e-6)
        assert sum(math.exp(v) for v in entry.top_logprobs.values()) <= 1.0 + 1e-6


def test_text_and_token_prompts_agree(llm: LLM) -> None:
    token_ids = llm.tokenizer.encode(PROMPT)
    by_text = llm.generate(PROMPT, _greedy(8))[0]
    by_ids = llm.generate({"prompt_token_ids": token_ids}, _greedy(8))[0]
    assert by_text.prompt_token_ids == token_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_ids.outputs[0].token_ids)


def test_skip_tokenizer_init_takes_token_ids_only() -> None:
    llm = LLM(model="pdserve-tiny", skip_tokenizer_init=True, kv_cache_size_gib=0.05)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, _greedy(4))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", _greedy(4))
