"""``--prefill-max-num-batched-tokens``: the prefill workers' own step budget. With 16 tokens
a step, each ~130-token prompt is prefilled over ~9 steps of the prefill worker (its KV
streamed layer by layer, chunk after chunk, over gRPC), several prompts sharing each step;
the outputs must still equal the offline engine's token for token. The decode worker keeps
the engine's budget (``tests/router/test_cluster_config.py`` checks which worker gets what).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.serving.conftest import GREEDY, MODEL, Offline, Server, completion_answer, serve, words

MAX_TOKENS = 8
LONG_WORDS = 40  # ~130 tokens: prefilled remotely (more than the local-prefill threshold)


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    with serve(
        ["--num-prefill", "1", "--num-decode", "1", "--prefill-max-num-batched-tokens", "16"]
    ) as running:
        yield running


def test_chunked_remote_prefills_equal_offline(server: Server, offline: Offline) -> None:
    prompts = [words(3000 + i, LONG_WORDS) for i in range(6)]
    prompt_ids = [offline.completion_ids(p) for p in prompts]
    assert min(len(ids) for ids in prompt_ids) > 16 * 4  # every prompt takes several steps
    expected = offline.greedy_many(prompt_ids, MAX_TOKENS)
    client = server.async_client()
    before = server.decisions()

    async def one(prompt: str) -> list[Any]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, logprobs=0, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )  # fmt: skip
        return [chunk async for chunk in stream]

    async def all_of_them() -> list[list[Any]]:
        async with client:
            return await asyncio.gather(*(one(p) for p in prompts))

    for chunks, ids, want in zip(asyncio.run(all_of_them()), prompt_ids, expected):
        completion_answer(chunks).check(want, len(ids))
    after = server.decisions()
    assert after["remote"] - before["remote"] == len(prompts)
    server.wait_idle()
