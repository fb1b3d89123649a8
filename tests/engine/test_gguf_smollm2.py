"""The default model, SmolLM2-135M-Instruct from its Q4_1 GGUF file, against transformers
reading the same file: same tokenizer and chat template, first-step logits within 1e-4
relative, and the same greedy tokens on a batch of real chat prompts (fp32)."""

from __future__ import annotations

import pytest
import torch

from engine.config import DEFAULT_MODEL
from engine.kv_cache import allocate_kv_caches
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.helpers import make_attention_metadata
from tests.smollm2 import CHATS, MAX_TOKENS, MODEL, reference

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        model=MODEL,
        device="cpu",
        dtype="float32",
        num_threads=1,
        max_model_len=1024,
        kv_cache_size_gib=0.1,
    )


def test_smollm2_is_the_default_model() -> None:
    assert DEFAULT_MODEL == MODEL == "smollm2-135m-instruct"


def test_tokenizer_and_chat_template_match_transformers(llm: LLM) -> None:
    ref = reference()
    ours = [
        llm.tokenizer.apply_chat_template(
            list(chat), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for chat in CHATS
    ]
    assert ours == ref.prompts
    assert len({len(p) for p in ours}) == len(ours)  # different lengths
    assert llm.tokenizer.decode(ours[0]).startswith("<|im_start|>system\n")
    assert llm.engine.eos_token_id == llm.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_first_step_logits_match_transformers(llm: LLM) -> None:
    ref = reference()
    model = llm.engine.runner.model
    args = model.args
    for prompt in ref.prompts:
        n = len(prompt)
        num_blocks = -(-n // 16)
        positions, metadata = make_attention_metadata([0], [n], [list(range(num_blocks))], 16)
        kv = allocate_kv_caches(
            args.num_layers, num_blocks, 16, args.num_kv_heads, args.head_dim, torch.float32, CPU
        )
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(prompt), positions, kv, metadata))
        expected = ref.first_step_logits(prompt)
        error = ((logits - expected).abs().max() / expected.abs().max()).item()
        assert error <= 1e-4, f"relative error {error:.2e} on a {n}-token prompt"


def test_greedy_tokens_match_transformers(llm: LLM) -> None:
    ref = reference()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ref.prompts], params)
    ours = [o.outputs[0].token_ids for o in outputs]
    assert all(len(tokens) == MAX_TOKENS for tokens in ours)
    assert ours == ref.greedy
