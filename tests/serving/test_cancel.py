"""Clients that go away mid-request: every worker's free block count returns to its baseline.

1P1D over gRPC on Ray. Requests are cancelled at every stage at once: streams that are
decoding (prefilled remotely, or locally on the decode worker), streams whose long prompt
is still being prefilled (the decode worker holds a reservation for the incoming KV), and a
non-streamed request whose client gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.serving.conftest import (
    GREEDY,
    MODEL,
    Offline,
    Server,
    complete,
    serve,
    words,
)

MAX_MODEL_LEN = 2048
NUM_CHUNKS_READ = 3


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    with serve(["--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]) as running:
        yield running


def _max_tokens(offline: Offline, prompt: str) -> int:
    """As many tokens as the context allows: the request would run for a long time."""
    return MAX_MODEL_LEN - len(offline.completion_ids(prompt)) - 1


def test_cancelled_requests_return_every_block(server: Server, offline: Offline) -> None:
    # A first request warms both workers up; then both are idle, every block free.
    complete(server.client(), words(1, 40), 4, False)
    baseline = server.wait_idle()
    decoding = [words(10 + i, 40) for i in range(4)] + [words(20 + i, 8) for i in range(2)]
    prefilling = [words(30 + i, 320) for i in range(2)]  # ~1000 tokens each
    not_streamed = words(40, 320)
    num_requests = len(decoding) + len(prefilling) + 1
    decisions = server.decisions()
    cancelled = server.metric("pdserve_sequences_finished_total", finish_reason="cancelled")

    async def open_stream(client: openai.AsyncOpenAI, prompt: str) -> Any:
        return await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=_max_tokens(offline, prompt),
            stream=True,
            **GREEDY,
        )

    async def scenario() -> None:
        async with server.async_client() as client:
            streams = [await open_stream(client, p) for p in decoding + prefilling]
            waiting = asyncio.create_task(
                client.completions.create(
                    model=MODEL,
                    prompt=not_streamed,
                    max_tokens=_max_tokens(offline, not_streamed),
                    **GREEDY,
                )
            )
            for stream in streams[: len(decoding)]:
                chunks = stream.__aiter__()
                for _ in range(NUM_CHUNKS_READ):
                    await chunks.__anext__()
            # Every request is in flight: running, queued, or reserved for incoming KV.
            deadline = time.monotonic() + 60
            while True:
                decode = (await asyncio.to_thread(server.worker_stats))["decode-0"]
                held = decode.num_running + decode.num_waiting + decode.num_reserved
                if held == num_requests:
                    break
                assert time.monotonic() < deadline, f"decode worker holds {held} requests"
                await asyncio.sleep(0.02)
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(*(stream.close() for stream in streams))
            with pytest.raises(asyncio.CancelledError):
                await waiting

    asyncio.run(scenario())
    after = server.wait_idle(timeout_s=30)
    assert {w: s.num_free_blocks for w, s in after.items()} == {
        w: s.num_free_blocks for w, s in baseline.items()
    }
    # The router saw every request cancelled, and every path was taken.
    assert (
        server.metric("pdserve_sequences_finished_total", finish_reason="cancelled") - cancelled
        == num_requests
    )
    delta = {k: v - decisions[k] for k, v in server.decisions().items()}
    assert delta == {"local": 2, "remote": num_requests - 2}
    # The workers still serve correctly.
    prompt = words(50, 40)
    ids = offline.completion_ids(prompt)
    complete(server.client(), prompt, 8, True).check(offline.greedy(ids, 8), len(ids))
