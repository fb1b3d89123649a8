"""Corrupted KV in flight, end to end: never decoded, the cluster stays whole.

1P1D over Ray + gRPC started with ``--kv-fault-corrupt-rate 1.0 --kv-fault-corrupt-first 1``
(the flags reach the prefill worker through ``ClusterConfig.kv_transfer``): the first remote
transfer lands altered bytes. The decode worker must refuse it (the checksum over the bytes
it received differs from the source's), so the request either fails cleanly (503, today) or
is prefilled again (with failover) and equals the clean run; it never returns text decoded
from corrupt KV. Later transfers are clean and exact, and no block leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.conftest import MODEL, Offline, Server, complete, serve, words

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    argv = ["--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]
    faults = ["--kv-fault-corrupt-rate", "1.0", "--kv-fault-corrupt-first", "1"]
    with serve([*argv, "--no-enable-local-prefill", *faults]) as running:
        yield running


def test_a_corrupted_transfer_is_never_decoded(
    server: Server, offline: Offline, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.backend.cluster.config.kv_transfer.fault_corrupt_rate == 1.0
    prompt = words(60, 120)
    ids = offline.completion_ids(prompt)
    expected = offline.greedy(ids, 8)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    with caplog.at_level(logging.INFO):
        first = httpx.post(
            f"{server.url}/v1/completions", json=body | {"ignore_eos": True}, timeout=120
        )
    if first.status_code == 200:  # prefilled again after the refused transfer
        assert first.json()["choices"][0]["text"] == expected.text
    else:
        assert first.status_code == 503, first.text
        assert "error" in first.json()
    # The decode worker saw the altered bytes: its checksum differed from the source's.
    assert "checksum" in caplog.text, caplog.text[-2000:]
    # Only the first transfer was corrupted: the next ones land clean and exact.
    for stream in (False, True):
        complete(server.client(), prompt, 8, stream).check(expected, len(ids))
    for stats in server.wait_idle(timeout_s=30).values():
        assert (stats.num_reserved, stats.num_pinned_blocks) == (0, 0)
