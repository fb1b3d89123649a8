"""Prompts to token ids: chat templates for chat completions, plain encoding for completions.

Tokenization happens in the router; workers see token ids only. A chat template renders the
conversation to text (it writes the BOS itself), which is then encoded without adding special
tokens, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from router.protocol import APIError, ChatMessage


def render_chat_prompt(
    tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of ``messages`` rendered by the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError("this model has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as error:  # a template's own raise_exception(), or a bad role order
        raise APIError(f"the chat template failed: {error}", param="messages") from error
    return tokenizer.encode(text, add_special_tokens=False)


def encode_completion_prompts(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """One token-id list per prompt: text is encoded with special tokens (BOS), ids pass."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError("prompt must not be empty", param="prompt")
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not ids for ids in encoded):
        raise APIError("prompt must contain at least one token", param="prompt")
    if any(min(ids) < 0 for ids in encoded):
        raise APIError("token ids in prompt must not be negative", param="prompt")
    return encoded
