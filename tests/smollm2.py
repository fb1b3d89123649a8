"""SmolLM2-135M-Instruct (the default model) and its reference: transformers reading the same
GGUF file. Loaded once per test process (``functools.cache``), shared by the engine and the
serving tests, and run with one torch thread (the machine's cores are shared with workers).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.gguf_cache import SMOLLM2_MODEL_NAME, builtin_gguf_file

MODEL = SMOLLM2_MODEL_NAME
MAX_TOKENS = 32
# Real chat prompts of different lengths (the chat template adds SmolLM2's system prompt
# when there is none).
CHATS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "Write a short poem about the sea."},),
    ({"role": "user", "content": "Explain in two sentences why the sky is blue."},),
    (
        {"role": "system", "content": "You are a concise travel assistant."},
        {
            "role": "user",
            "content": "I am planning a trip to Japan in the spring. Which three cities "
            "should I visit, and what is one thing worth seeing in each of them?",
        },
    ),
)
# Questions the model answers correctly (checked by hand first), and a word of the answer.
FACTS = (
    ("What is the capital of France?", "Paris"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the largest ocean on Earth?", "Pacific"),
)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Reference:
    tokenizer: Any
    model: Any
    prompts: list[list[int]]  # CHATS through the chat template
    greedy: list[list[int]]  # MAX_TOKENS greedy tokens of each, end-of-sequence ignored

    def first_step_logits(self, prompt: list[int]) -> torch.Tensor:  # [len, vocab] float32
        with torch_threads(1), torch.inference_mode():
            return self.model(torch.tensor([prompt])).logits[0].float()


@functools.cache
def reference() -> Reference:
    path = builtin_gguf_file(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # compared with ignore_eos
    prompts = [
        tokenizer.apply_chat_template(
            list(chat), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for chat in CHATS
    ]
    greedy = []
    with torch_threads(1), torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            greedy.append(out[0, len(prompt) :].tolist())
    return Reference(tokenizer, model, prompts, greedy)
