"""Soak: thousands of requests, 30% of the clients going away at random points, no leak.

A real 1P1D cluster (Ray actors, KV over gRPC, authenticated by the cluster's secret) behind
the real HTTP server (uvicorn on 127.0.0.1), driven by raw HTTP clients: a mix of streamed and
non-streamed chat and text completions with short generations; prompts short enough to be
prefilled on the decode worker and long enough to be prefilled remotely. 30% of the clients
disconnect: before the response's first byte, after a random number of streamed chunks, or
while a non-streamed answer is being computed. Every other request must succeed.

"Baseline" (what the workers return to): after one warm-up request, each worker idle with
every block free - ref count 0; blocks kept as prefix cache count as free, since any
allocation may evict them (``num_free_blocks == num_total_blocks``) - and nothing running,
waiting, reserved for incoming KV, or pinned for an outgoing transfer. After the load: the
same on both workers, the router's in-flight maps (the backend's requests, each worker
client's delta queues, the requests-in-flight gauge) empty, and the router still answers
with the offline engine's greedy output.

``test_soak_short`` (300 requests) runs by default; ``test_soak`` (2,000) is ``slow``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.serving.conftest import MODEL, Offline, Server, complete, serve, words

logger = logging.getLogger(__name__)

DISCONNECT_RATE = 0.3
CONCURRENCY = 24
MAX_TOKENS = (1, 12)
PROMPT_WORDS = (3, 8, 30, 90, 160)  # the short ones are prefilled on the decode worker


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    argv = ["--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]
    with serve([*argv, "--local-prefill-threshold", "16"]) as running:
        yield running


@dataclass(frozen=True)
class Plan:
    """One request of the soak, and how its client behaves."""

    index: int
    chat: bool
    stream: bool
    num_words: int
    max_tokens: int
    disconnect: str | None  # None | "before_first_byte" | "mid_stream" | "while_waiting"
    after_chunks: int  # mid_stream: SSE events read before closing
    delay_s: float  # before_first_byte / while_waiting: when the client gives up


def _plans(num_requests: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(num_requests):
        stream = rng.random() < 0.6
        disconnect = None
        if rng.random() < DISCONNECT_RATE:
            modes = ("before_first_byte", "mid_stream") if stream else ("while_waiting",)
            disconnect = rng.choice(modes)
        plans.append(
            Plan(
                index=index,
                chat=rng.random() < 0.5,
                stream=stream,
                num_words=rng.choice(PROMPT_WORDS),
                # A client that leaves mid-answer gets a long enough one to leave from.
                max_tokens=rng.randint(6 if disconnect else MAX_TOKENS[0], MAX_TOKENS[1]),
                disconnect=disconnect,
                after_chunks=rng.randint(1, 4),
                delay_s=rng.uniform(0.0, 0.03),
            )
        )
    return plans


def _body(plan: Plan) -> tuple[str, dict]:
    text = words(1000 + plan.index, plan.num_words)
    body: dict = {"model": MODEL, "max_tokens": plan.max_tokens, "stream": plan.stream}
    body.update(temperature=0.0, ignore_eos=True)
    if plan.chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": text}]}
    return "/v1/completions", body | {"prompt": text}


async def _one(client: httpx.AsyncClient, plan: Plan) -> str:
    """The request's outcome: "ok", or how its client went away."""
    path, body = _body(plan)
    if plan.disconnect == "while_waiting":
        request = asyncio.ensure_future(client.post(path, json=body))
        done, _ = await asyncio.wait({request}, timeout=plan.delay_s)
        if not done:
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            return "while_waiting"
        response = request.result()
    elif not plan.stream:
        response = await client.post(path, json=body)
    else:
        return await _streamed(client, plan, path, body)
    assert response.status_code == 200, (plan, response.status_code, response.text)
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "length", (plan, choice)
    return "ok"


async def _streamed(client: httpx.AsyncClient, plan: Plan, path: str, body: dict) -> str:
    request = client.build_request("POST", path, json=body)
    if plan.disconnect == "before_first_byte":
        sending = asyncio.ensure_future(client.send(request, stream=True))
        done, _ = await asyncio.wait({sending}, timeout=plan.delay_s)
        if not done:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            return "before_first_byte"
        await sending.result().aclose()  # headers came first: gone before the first chunk
        return "before_first_chunk"
    response = await client.send(request, stream=True)
    try:
        assert response.status_code == 200, (plan, response.status_code)
        events, finish_reason = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                assert finish_reason == "length", plan
                return "ok"
            events += 1
            if plan.disconnect == "mid_stream" and events >= plan.after_chunks:
                return "mid_stream"
            choices = json.loads(line[len("data: ") :])["choices"]
            if choices and choices[0].get("finish_reason"):
                finish_reason = choices[0]["finish_reason"]
        raise AssertionError(f"stream of {plan} ended without [DONE]")
    finally:
        await response.aclose()  # closing early drops the connection: the server sees it


def _in_flight(server: Server) -> dict[str, int]:
    """The router's per-request state, read on its loop."""

    async def read() -> dict[str, int]:
        cluster = server.backend.cluster
        sizes = {"backend": len(server.backend._inflight)}
        for worker in cluster.prefill + cluster.decode:
            sizes[f"{worker.worker_id} queues"] = len(worker._queues)
        return sizes

    return server.run(read)


def _soak(server: Server, offline: Offline, num_requests: int, budget_s: float) -> None:
    complete(server.client(), words(1, 40), 4, False)  # warm-up: both workers compiled, idle
    baseline = server.wait_idle(timeout_s=60)
    for stats in baseline.values():
        assert stats.num_pinned_blocks == 0 and stats.num_free_blocks == stats.num_total_blocks
    plans = _plans(num_requests, seed=num_requests)

    async def run() -> Counter[str]:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        timeout = httpx.Timeout(120.0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def bounded(plan: Plan) -> str:
                async with gate:
                    return await _one(client, plan)

            outcomes = await asyncio.wait_for(
                asyncio.gather(*(bounded(p) for p in plans)), timeout=budget_s
            )
        return Counter(outcomes)

    start = time.monotonic()
    outcomes = asyncio.run(run())
    elapsed = time.monotonic() - start
    after = server.wait_idle(timeout_s=60)
    in_flight = _in_flight(server)
    leaks = {
        wid: {
            "free": s.num_free_blocks,
            "total": s.num_total_blocks,
            "reserved": s.num_reserved,
            "pinned": s.num_pinned_blocks,
            "running": s.num_running,
            "waiting": s.num_waiting,
        }
        for wid, s in after.items()
    }
    logger.warning(
        "soak: %d requests in %.1f s, outcomes %s, workers after %s, router in flight %s",
        num_requests,
        elapsed,
        dict(outcomes),
        leaks,
        in_flight,
    )
    print(f"\nsoak: {num_requests} requests in {elapsed:.1f} s; outcomes {dict(outcomes)}")
    print(f"soak: workers after: {leaks}; router in flight: {in_flight}")
    assert sum(outcomes.values()) == num_requests
    disconnected = num_requests - outcomes["ok"]
    assert disconnected >= 0.25 * num_requests, outcomes  # the clients did go away
    assert outcomes["mid_stream"] and outcomes["while_waiting"], outcomes
    for wid, stats in after.items():
        assert stats.num_free_blocks == baseline[wid].num_free_blocks == stats.num_total_blocks
        assert (stats.num_reserved, stats.num_pinned_blocks) == (0, 0), wid
        assert (stats.num_running, stats.num_waiting) == (0, 0), wid
    assert set(in_flight.values()) == {0}, in_flight
    assert server.metric("pdserve_requests_in_flight") == 0
    assert server.decisions()["remote"] > 0 and server.decisions()["local"] > 0
    # The router still answers, and right.
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    prompt = words(7, 60)
    ids = offline.completion_ids(prompt)
    complete(server.client(), prompt, 8, True).check(offline.greedy(ids, 8), len(ids))


@pytest.mark.timeout(600)
def test_soak_short(server: Server, offline: Offline) -> None:
    _soak(server, offline, num_requests=300, budget_s=300)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak(server: Server, offline: Offline) -> None:
    _soak(server, offline, num_requests=2000, budget_s=1500)
