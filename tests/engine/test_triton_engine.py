"""The engine's greedy output with the Triton attention backend equals the torch backend's.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set in conftest), so the model is
tiny and fp32 (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.helpers import make_hf_checkpoint


def test_triton_backend_greedy_equals_torch_backend(tmp_path) -> None:
    path = make_hf_checkpoint(tmp_path, "llama")
    gen = torch.Generator().manual_seed(5)
    # A shared prefix (prefix-cache hit), a chunked prompt and short ones: decodes and
    # prefill chunks with cached prefixes share steps.
    shared = torch.randint(3, 100, (16,), generator=gen).tolist()
    prompts = [
        shared + torch.randint(3, 100, (5,), generator=gen).tolist(),
        torch.randint(3, 100, (23,), generator=gen).tolist(),
        shared + torch.randint(3, 100, (2,), generator=gen).tolist(),
        torch.randint(3, 100, (3,), generator=gen).tolist(),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            model=str(path),
            skip_tokenizer_init=True,
            device="cpu",
            dtype="float32",
            block_size=8,
            max_num_batched_tokens=16,
            attention_backend=backend,
        )
        assert llm.engine.runner.attention_backend.name == backend
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        outputs[backend] = [r.outputs[0].token_ids for r in results]
    assert outputs["triton"] == outputs["torch"]
    assert all(len(tokens) == 6 for tokens in outputs["torch"])
