"""The same greedy outputs from every shape of cluster: 2P2D over gRPC (Ray), 1P1D with the
in-process ``local`` transport, 1P1D over NIXL (Ray), and ``--colocated`` (decode workers
that prefill for themselves, Ray). Each equals the offline engine token for token, for chat
and completions, streamed and not, and ``/metrics`` shows the prefill path that was taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving.conftest import Offline, Server, chat, complete, serve, words

MAX_TOKENS = 10
LONG_WORDS = 40  # ~130 tokens: more than the local-prefill threshold

TOPOLOGIES = {
    "2p2d": ["--num-prefill", "2", "--num-decode", "2", "--transport", "grpc"],
    "local": ["--num-prefill", "1", "--num-decode", "1", "--transport", "local"],
    # Real NIXL over UCX between the two actor processes (one-sided WRITEs, cache to cache).
    "1p1d-nixl": ["--num-prefill", "1", "--num-decode", "1", "--transport", "nixl"],
    "colocated": ["--colocated", "--num-decode", "1"],
}


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def topology(request: pytest.FixtureRequest) -> Iterator[tuple[str, Server]]:
    name = request.param
    if name != "local":
        request.getfixturevalue("local_ray")
    with serve(TOPOLOGIES[name]) as running:
        yield name, running


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_greedy_output_equals_offline(
    topology: tuple[str, Server], offline: Offline, endpoint: str, stream: bool
) -> None:
    name, server = topology
    content = words(500 + 2 * ["completions", "chat"].index(endpoint) + int(stream), LONG_WORDS)
    is_chat = endpoint == "chat"
    ids = offline.chat_ids(content) if is_chat else offline.completion_ids(content)
    decisions = server.decisions()
    answer = (chat if is_chat else complete)(server.client(), content, MAX_TOKENS, stream)
    answer.check(offline.greedy(ids, MAX_TOKENS), len(ids))
    path = "local" if name == "colocated" else "remote"
    delta = {k: v - decisions[k] for k, v in server.decisions().items()}
    assert delta == {"local": 0, "remote": 0, path: 1}


def test_workers_are_where_the_topology_says(topology: tuple[str, Server]) -> None:
    name, server = topology
    infos = server.worker_infos
    expected = {"2p2d": (2, 2), "local": (1, 1), "1p1d-nixl": (1, 1), "colocated": (0, 1)}[name]
    roles = [i.role for i in infos.values()]
    assert (roles.count("prefill"), roles.count("decode")) == expected
    pids = {i.pid for i in infos.values()}
    if name == "local":
        assert pids == {os.getpid()}  # in-process workers
    else:
        assert os.getpid() not in pids and len(pids) == len(infos)  # one actor process each


def test_concurrent_requests_use_every_worker(
    topology: tuple[str, Server], offline: Offline
) -> None:
    _, server = topology
    prompts = [words(900 + i, LONG_WORDS) for i in range(8)]
    prompt_ids = [offline.completion_ids(p) for p in prompts]
    expected = offline.greedy_many(prompt_ids, MAX_TOKENS)
    before = server.worker_stats()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(server.client(), p, MAX_TOKENS, True), prompts))
    for answer, ids, want in zip(answers, prompt_ids, expected):
        answer.check(want, len(ids))
    after = server.wait_idle()
    # Every worker looked up (and then computed or received) some of these prompts.
    served = {w: after[w].prefix_cache_queries - s.prefix_cache_queries for w, s in before.items()}
    assert all(n > 0 for n in served.values()), served


def test_kv_transfer_breakdown_reaches_metrics(
    topology: tuple[str, Server], offline: Offline
) -> None:
    """Each remote prefill's transfer shows up per phase (queue wait ... verify); colocated
    workers transfer nothing, and report nothing."""
    name, server = topology
    phase = "pdserve_kv_transfer_phase_seconds_count"
    before = {p: server.metric(phase, phase=p) for p in ("queue_wait", "last_byte", "verify")}
    complete(server.client(), words(950, LONG_WORDS), MAX_TOKENS, False)
    if name == "colocated":
        server.wait_idle()
        assert {p: server.metric(phase, phase=p) for p in before} == before
        return
    deadline = time.monotonic() + 30
    while server.metric(phase, phase="verify") < before["verify"] + 1:
        assert time.monotonic() < deadline, "the transfer's breakdown never reached /metrics"
        time.sleep(0.05)
    for p, count in before.items():
        assert server.metric(phase, phase=p) == count + 1
    assert server.metric("pdserve_kv_transfer_phase_seconds_sum", phase="verify") > 0
