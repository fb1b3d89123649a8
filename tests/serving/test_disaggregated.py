"""One prefill and one decode worker (Ray actors), KV over gRPC, the real ``openai`` client.

Greedy outputs must equal the offline engine's token for token, on the remote-prefill path
(long prompts) and on the conditional local path (short prompts, or a prompt whose prefix
the decode worker already holds); ``/metrics`` shows which path each request took. Then 32
concurrent streams, and the ordering of the first token against the KV acknowledgement.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from router.backends.cluster import BackendConfig
from tests.serving.conftest import (
    GREEDY,
    MODEL,
    Offline,
    Server,
    chat,
    complete,
    completion_answer,
    serve,
    words,
)

THRESHOLD = BackendConfig.local_prefill_threshold  # the server runs with the default
MAX_TOKENS = 12
LONG_WORDS = 40  # ~130 tokens: more than THRESHOLD, so prefilled remotely
SHORT_WORDS = 8  # ~25 tokens (~30 with the chat template): prefilled on the decode worker


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    with serve(["--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]) as running:
        yield running


def _seed(endpoint: str, stream: bool) -> int:
    return 2 * ["completions", "chat"].index(endpoint) + int(stream)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


def _wait_for_transfers(server: Server, count: float, timeout_s: float = 30.0) -> None:
    """Until the router has observed ``count`` acknowledged KV transfers in all."""
    deadline = time.monotonic() + timeout_s
    while server.metric("pdserve_kv_transfer_bytes_count") < count:
        assert time.monotonic() < deadline, "the KV transfer was never acknowledged"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_remote_prefill_equals_offline(
    server: Server, offline: Offline, endpoint: str, stream: bool
) -> None:
    content = words(_seed(endpoint, stream), LONG_WORDS)
    is_chat = endpoint == "chat"
    ids = offline.chat_ids(content) if is_chat else offline.completion_ids(content)
    assert len(ids) > THRESHOLD
    decisions = server.decisions()
    transfers = server.metric("pdserve_kv_transfer_bytes_count")
    answer = (chat if is_chat else complete)(server.client(), content, MAX_TOKENS, stream)
    answer.check(offline.greedy(ids, MAX_TOKENS), len(ids))
    assert _delta(server.decisions(), decisions) == {"local": 0, "remote": 1}
    _wait_for_transfers(server, transfers + 1)


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_short_prompt_is_prefilled_locally_and_equals_offline(
    server: Server, offline: Offline, endpoint: str, stream: bool
) -> None:
    content = words(100 + _seed(endpoint, stream), SHORT_WORDS)
    is_chat = endpoint == "chat"
    ids = offline.chat_ids(content) if is_chat else offline.completion_ids(content)
    assert len(ids) <= THRESHOLD
    decisions = server.decisions()
    answer = (chat if is_chat else complete)(server.client(), content, MAX_TOKENS, stream)
    answer.check(offline.greedy(ids, MAX_TOKENS), len(ids))
    assert _delta(server.decisions(), decisions) == {"local": 1, "remote": 0}


def test_prompt_with_a_prefix_cached_on_decode_is_prefilled_locally(
    server: Server, offline: Offline
) -> None:
    first = words(777, LONG_WORDS)
    second = first + " " + words(778, SHORT_WORDS)
    first_ids, second_ids = offline.completion_ids(first), offline.completion_ids(second)
    assert len(second_ids) > THRESHOLD and second_ids[: len(first_ids) - 1] == first_ids[:-1]
    client = server.client()
    decisions = server.decisions()
    complete(client, first, MAX_TOKENS, False).check(
        offline.greedy(first_ids, MAX_TOKENS), len(first_ids)
    )
    assert _delta(server.decisions(), decisions) == {"local": 0, "remote": 1}
    # The decode worker now holds the first prompt's KV: only the new tail is left to compute.
    decisions = server.decisions()
    complete(client, second, MAX_TOKENS, True).check(
        offline.greedy(second_ids, MAX_TOKENS), len(second_ids)
    )
    assert _delta(server.decisions(), decisions) == {"local": 1, "remote": 0}


def test_32_concurrent_streams_complete_correctly(server: Server, offline: Offline) -> None:
    prompts = [words(2000 + i, LONG_WORDS) for i in range(32)]
    prompt_ids = [offline.completion_ids(p) for p in prompts]
    expected = offline.greedy_many(prompt_ids, MAX_TOKENS)
    client = server.async_client()
    decisions = server.decisions()

    async def one(prompt: str) -> list[Any]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        return [chunk async for chunk in stream]

    async def all_of_them() -> list[list[Any]]:
        async with client:
            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(all_of_them())
    for chunks, ids, want in zip(results, prompt_ids, expected):
        completion_answer(chunks).check(want, len(ids))
    assert _delta(server.decisions(), decisions) == {"local": 0, "remote": 32}
    server.wait_idle()


def test_first_token_arrives_before_the_kv_transfer_is_acknowledged(
    server: Server, offline: Offline
) -> None:
    """The decode worker's process is stopped (SIGSTOP) once it has reserved the blocks, so
    nothing can acknowledge the KV until it is resumed; the first token must still reach
    the client, while the prefill worker's transfer is provably outstanding."""
    decode, prefill = server.backend.cluster.decode[0], server.backend.cluster.prefill[0]
    decode_pid = server.worker_infos[decode.worker_id].pid
    assert decode_pid != os.getpid()  # a Ray actor in its own process
    # ~1800 tokens: 15 prefill steps of 128 tokens, each sending 4 layers.
    prompt_ids = offline.completion_ids(words(31337, 700))[:1800]
    expected = offline.greedy(prompt_ids, MAX_TOKENS)
    server.wait_idle()
    transfers = server.metric("pdserve_kv_transfer_bytes_count")

    first_chunk: queue.Queue[Any] = queue.Queue()
    resumed = threading.Event()
    chunks: list[Any] = []

    def client_side() -> None:
        try:
            stream = server.client().completions.create(
                model=MODEL,
                prompt=prompt_ids,
                max_tokens=MAX_TOKENS,
                logprobs=0,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            for chunk in stream:
                if not chunks:
                    first_chunk.put(chunk)
                    resumed.wait(60)
                chunks.append(chunk)
        except BaseException as error:
            first_chunk.put(error)
            raise

    reader = threading.Thread(target=client_side, daemon=True)
    reader.start()
    stopped = False
    try:
        deadline = time.monotonic() + 60
        while server.run(lambda: decode.stats()).num_reserved == 0:
            assert time.monotonic() < deadline, "the decode worker never reserved blocks"
            time.sleep(0.01)
        os.kill(decode_pid, signal.SIGSTOP)
        stopped = True
        first = first_chunk.get(timeout=30)
        assert not isinstance(first, BaseException), first
        # The client holds the first token...
        assert first.choices and first.choices[0].logprobs.tokens == expected.token_texts[:1]
        # ...while the prefill worker's transfer is still unacknowledged.
        request_id = f"{first.id}-0"
        with pytest.raises(TimeoutError):
            server.run(lambda: prefill.wait_transfer(request_id, 0.0))
    finally:
        if stopped:
            os.kill(decode_pid, signal.SIGCONT)
        resumed.set()
    reader.join(60)
    assert not reader.is_alive()
    completion_answer(chunks).check(expected, len(prompt_ids))
    _wait_for_transfers(server, transfers + 1)
    server.wait_idle()


def test_workers_start_under_the_glibc_malloc_tunables(server: Server) -> None:
    """Each Ray worker's process starts with ``engine.malloc``'s tunables (glibc reads them
    only then), unless the environment the cluster was started from sets its own."""
    import ray

    from engine.malloc import GLIBC_TUNABLES

    expected = os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES)
    for worker in server.backend.cluster.prefill + server.backend.cluster.decode:
        seen = ray.get(
            worker.target.__ray_call__.remote(lambda _: os.environ.get("GLIBC_TUNABLES")),
            timeout=30,
        )
        assert seen == expected, worker.worker_id
