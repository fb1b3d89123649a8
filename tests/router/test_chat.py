"""Prompts to token ids with the built-in pdserve-tiny tokenizer and its chat template."""

from __future__ import annotations

import pytest

from engine.tokenizer import load_tokenizer
from router.chat import encode_completion_prompts, render_chat_prompt
from router.protocol import APIError, ChatMessage


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("pdserve-tiny")


def test_chat_template_is_rendered_once_with_one_bos(tokenizer) -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(
            role="user",
            content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        ),
    ]
    ids = render_chat_prompt(tokenizer, messages)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without = render_chat_prompt(tokenizer, messages, add_generation_prompt=False)
    assert ids[: len(without)] == without and len(ids) > len(without)


def test_chat_without_a_template_is_a_400(tokenizer) -> None:
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(APIError, match="no chat template"):
            render_chat_prompt(tokenizer, [ChatMessage(role="user", content="x")])
    finally:
        tokenizer.chat_template = saved


def test_completion_prompts(tokenizer) -> None:
    hello = tokenizer.encode("hello")
    assert hello[0] == tokenizer.bos_token_id
    assert encode_completion_prompts(tokenizer, "hello") == [hello]
    assert encode_completion_prompts(tokenizer, ["hello", "hello"]) == [hello, hello]
    assert encode_completion_prompts(tokenizer, [5, 6]) == [[5, 6]]
    assert encode_completion_prompts(tokenizer, [[5], [6, 7]]) == [[5], [6, 7]]
    for bad in ([], [[]], [[1, -2]]):
        with pytest.raises(APIError):
            encode_completion_prompts(tokenizer, bad)
