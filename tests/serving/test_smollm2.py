"""The default model through the whole 1P1D cluster: router (uvicorn on 127.0.0.1), a prefill
and a decode worker as Ray actors, KV over gRPC, the ``openai`` client.

Every request is prefilled remotely (``--no-enable-local-prefill``), so each answer's KV
crossed gRPC. Greedy answers equal transformers' tokens on the same GGUF file (compared as
text: the router returns text), and real questions get right answers.
"""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_greedy_chat_matches_transformers(server: Server, stream: bool) -> None:
    ref = reference()
    client = server.client()
    decisions = server.decisions()
    for chat, prompt, expected in zip(CHATS, ref.prompts, ref.greedy, strict=True):
        kwargs = {
            "model": MODEL,
            "messages": list(chat),
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "extra_body": {"ignore_eos": True},
        }
        if stream:
            chunks = list(
                client.chat.completions.create(
                    **kwargs, stream=True, stream_options={"include_usage": True}
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            response = client.chat.completions.create(**kwargs)
            text, usage = response.choices[0].message.content, response.usage
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
