"""Chaos: a worker process SIGKILLed under concurrent streaming load loses no request.

1P1D (and 1P2D) over gRPC on real Ray. While streams are in flight, the prefill worker is
killed mid-transfer, or the decode worker mid-decode (by PID). Every request must complete,
and each stream's tokens must equal what an undisturbed cluster gives for it: greedy ones the
offline engine's output, a seeded one the same request's output before the kill. The router
resumes a failed request on other workers (a replacement when there is only one) after the
tokens it already streamed; the client sees no error, only a pause.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from router.backends.clients import WorkerDiedError
from tests.serving.conftest import (
    GREEDY,
    MODEL,
    Offline,
    Server,
    serve,
    words,
)

LOAD_TIMEOUT_S = 240.0  # every stream of one test, start to end, kill and recovery included
SEEDED: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}


@dataclass
class Stream:
    """One streamed completion as the client saw it."""

    prompt: str
    max_tokens: int
    params: dict[str, Any]
    token_texts: list[str] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None


async def _run(server: Server, stream: Stream) -> Stream:
    client = server.async_client(timeout_s=LOAD_TIMEOUT_S)
    try:
        chunks = await client.completions.create(
            model=MODEL,
            prompt=stream.prompt,
            max_tokens=stream.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=0,
            **stream.params,
        )
        async for chunk in chunks:
            if chunk.usage is not None:
                stream.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                stream.text += choice.text
                if choice.logprobs is not None:
                    stream.token_texts += choice.logprobs.tokens
                if choice.finish_reason is not None:
                    stream.finish_reason = choice.finish_reason
        return stream
    finally:
        await client.close()


def _under_load(server: Server, streams: list[Stream], kill_when, pid: int) -> list[Stream]:
    """Run every stream at once; SIGKILL ``pid`` as soon as ``kill_when(streams)`` holds."""
    return _struck_under_load(server, streams, kill_when, lambda: os.kill(pid, signal.SIGKILL))


def _struck_under_load(server: Server, streams: list[Stream], strike_when, strike) -> list[Stream]:
    """Run every stream at once; call ``strike()`` as soon as ``strike_when(streams)`` holds."""

    async def main() -> list[Stream]:
        tasks = [asyncio.create_task(_run(server, s)) for s in streams]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not strike_when(streams):
            assert time.monotonic() < deadline, "the load never reached the point to kill at"
            assert not all(t.done() for t in tasks), "every stream ended before the kill"
            await asyncio.sleep(0.01)
        strike()
        return await asyncio.wait_for(asyncio.gather(*tasks), LOAD_TIMEOUT_S)

    return asyncio.run(main())


def _check_greedy(offline: Offline, stream: Stream) -> None:
    expected = offline.greedy(offline.completion_ids(stream.prompt), stream.max_tokens)
    assert stream.token_texts == expected.token_texts
    assert stream.text == expected.text
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == stream.max_tokens


def _pid(server: Server, role: str) -> int:
    (pid,) = [info.pid for info in server.worker_infos.values() if info.role == role][:1]
    return pid


def _wait_replaced(server: Server, pid: int) -> None:
    """Until the killed worker's replacement answers, then until every worker is idle."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S

    async def pids() -> set[int]:
        workers = server.backend.cluster.prefill + server.backend.cluster.decode
        return {info.pid for info in await asyncio.gather(*(w.info() for w in workers))}

    while True:
        try:
            if pid not in server.run(pids):
                break
        except WorkerDiedError:
            pass
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.2)
    server.wait_idle(timeout_s=60)


def _migrations(server: Server, reason: str) -> float:
    return server.metric("pdserve_request_migrations_total", reason=reason)


def test_prefill_worker_killed_mid_transfer(local_ray: None, offline: Offline) -> None:
    """Long prompts queue on P; P dies while some stream their KV and others wait. Each is
    re-prefilled (here: on D, the only worker left) and streams what it would have."""
    argv = ["--num-prefill", "1", "--num-decode", "1", "--health-interval-s", "1"]
    argv += ["--local-prefill-threshold", "0"]  # every prompt is prefilled by P
    with serve(argv) as server:
        streams = [Stream(words(500 + i, 360), 12, GREEDY) for i in range(6)]
        streams += [Stream(words(520 + i, 30), 24, GREEDY) for i in range(4)]

        def some_prefilled(streams: list[Stream]) -> bool:
            return any(s.token_texts for s in streams)  # the rest are still being prefilled

        before = _migrations(server, "prefill_died")
        pid = _pid(server, "prefill")
        done = _under_load(server, streams, some_prefilled, pid)
        for stream in done:
            _check_greedy(offline, stream)
        assert _migrations(server, "prefill_died") > before, "no request saw P die"
        _wait_replaced(server, pid)


@pytest.mark.parametrize(
    ("num_decode", "transport"),
    [(1, "grpc"), (2, "grpc"), pytest.param(1, "nixl", marks=pytest.mark.slow)],
    ids=["replacement", "survivor", "replacement-nixl"],
)
def test_decode_worker_killed_mid_decode(
    local_ray: None, offline: Offline, num_decode: int, transport: str
) -> None:
    """D dies while every stream is decoding: each resumes on another decode worker (the
    survivor, or the replacement of the only one, paired anew with P: with NIXL a new agent
    and epoch) after the tokens it already streamed."""
    argv = ["--num-prefill", "1", "--num-decode", str(num_decode), "--health-interval-s", "1"]
    argv += ["--transport", transport]
    with serve(argv) as server:
        long_prompts = [Stream(words(600 + i, 200), 160, GREEDY) for i in range(4)]
        short_prompts = [Stream(words(620 + i, 12), 160, GREEDY) for i in range(4)]
        seeded = Stream(words(640, 60), 160, SEEDED)
        undisturbed = asyncio.run(_run(server, Stream(seeded.prompt, 160, SEEDED)))
        streams = long_prompts + short_prompts + [seeded]

        def all_decoding(streams: list[Stream]) -> bool:
            return all(len(s.token_texts) >= 3 for s in streams)

        before = _migrations(server, "decode_died")
        pid = _pid(server, "decode")
        done = _under_load(server, streams, all_decoding, pid)
        for stream in done[:-1]:
            _check_greedy(offline, stream)
        assert done[-1].token_texts == undisturbed.token_texts
        assert done[-1].text == undisturbed.text
        assert _migrations(server, "decode_died") > before, "no request saw D die"
        _wait_replaced(server, pid)


# The injected fault ends the engine-loop thread with an exception, as it would in production.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_decode_worker_whose_engine_loop_dies_is_a_dead_worker(offline: Offline) -> None:
    """The process lives but its engine loop died (an exception in a step): its streams end
    with ``EngineDeadError``, which the router takes as the worker's death: every request
    resumes on the replacement, exact. Workers in this process (``--transport local``); the
    fault is injected into the decode worker's next engine step."""
    argv = ["--num-prefill", "1", "--num-decode", "1", "--health-interval-s", "1"]
    with serve([*argv, "--transport", "local"]) as server:
        streams = [Stream(words(660 + i, 40), 120, GREEDY) for i in range(4)]
        (client,) = server.backend.cluster.decode
        worker = client.target

        def fail_next_step(*args, **kwargs):
            raise RuntimeError("injected: the decode step failed")

        def all_decoding(streams: list[Stream]) -> bool:
            return all(len(s.token_texts) >= 3 for s in streams)

        before = _migrations(server, "decode_died")
        done = _struck_under_load(
            server, streams, all_decoding, lambda: setattr(worker.engine, "step", fail_next_step)
        )
        assert worker.loop.error is not None, "the injected fault never ran"
        for stream in done:
            _check_greedy(offline, stream)
        assert _migrations(server, "decode_died") >= before + len(streams)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while server.backend.cluster.decode[0].target is worker:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.1)
        server.wait_idle(timeout_s=60)
