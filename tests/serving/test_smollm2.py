"""The default model through the whole 1P1D cluster: router (uvicorn on 127.0.0.1), a prefill
and a decode worker as Ray actors, KV over gRPC, the ``openai`` client.

Every request is prefilled remotely (``--no-enable-local-prefill``), so each answer's KV
crossed gRPC. Greedy answers equal transformers' tokens on the same GGUF file (compared as
text: the router returns text), and real questions get right answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.serving.conftest import Server, serve
from tests.smollm2 import CHATS, FACTS, MAX_TOKENS, MODEL, reference


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    argv = ["--model", MODEL, "--max-model-len", "1024", "--no-enable-local-prefill"]
    with serve([*argv, "--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]) as s:
        yield s


def test_models_lists_smollm2(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == [MODEL]


async def _answer(client: openai.AsyncOpenAI, chat: tuple, stream: bool) -> tuple[str, Any]:
    """(text, usage) of one greedy chat completion, streamed or not."""
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": list(chat),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    if not stream:
        response = await client.chat.completions.create(**kwargs)
        return response.choices[0].message.content, response.usage
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def test_greedy_chat_matches_transformers(server: Server) -> None:
    """All chats at once (batched on the workers), alternately streamed and not."""
    ref = reference()
    decisions = server.decisions()

    async def ask_all() -> list[tuple[str, Any]]:
        client = server.async_client()
        return await asyncio.gather(
            *(_answer(client, chat, stream=i % 2 == 1) for i, chat in enumerate(CHATS))
        )

    answers = asyncio.run(ask_all())
    for (text, usage), prompt, expected in zip(answers, ref.prompts, ref.greedy, strict=True):
        assert usage.prompt_tokens == len(prompt)
        assert usage.completion_tokens == MAX_TOKENS
        assert text == ref.tokenizer.decode(expected, skip_special_tokens=True)
    after = server.decisions()
    assert after["remote"] - decisions["remote"] == len(CHATS)
    assert after["local"] == decisions["local"]


def test_real_answers(server: Server) -> None:
    client = server.client()
    for question, answer in FACTS:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0.0,
        )
        text = response.choices[0].message.content
        assert answer in text, (question, text)
