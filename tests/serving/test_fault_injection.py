"""Corrupted KV in flight, end to end: never decoded, the cluster stays whole.

1P1D over Ray + gRPC started with ``--kv-fault-corrupt-rate 1.0 --kv-fault-corrupt-first 1``
(the flags reach the prefill worker through ``ClusterConfig.kv_transfer``): the first
``CORRUPTED`` remote transfers land altered bytes. The decode worker must refuse each (the
checksum over the bytes it received differs from the source's: detected 100%), and the router
prefills the request again (here on the decode worker: the prefill worker failed it), so the
client gets exactly the clean run's answer and never text decoded from corrupt KV. Later
transfers are clean and exact, and no block leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.conftest import MODEL, Offline, Server, complete, serve, words

pytestmark = pytest.mark.timeout(600)

CORRUPTED = 3  # the prefill worker's first transfers that are corrupted in flight


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    argv = ["--num-prefill", "1", "--num-decode", "1", "--transport", "grpc"]
    faults = ["--kv-fault-corrupt-rate", "1.0", "--kv-fault-corrupt-first", str(CORRUPTED)]
    with serve([*argv, "--no-enable-local-prefill", *faults]) as running:
        yield running


def test_a_corrupted_transfer_is_never_decoded(
    server: Server, offline: Offline, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.backend.cluster.config.kv_transfer.fault_corrupt_rate == 1.0
    prompts = [words(60 + i, 120) for i in range(CORRUPTED + 1)]
    before = server.metric("pdserve_request_migrations_total", reason="kv_failed")
    with caplog.at_level(logging.INFO):
        for i, prompt in enumerate(prompts):  # streamed, not streamed, raw HTTP
            ids = offline.completion_ids(prompt)
            expected = offline.greedy(ids, 8)
            if i < 2:
                complete(server.client(), prompt, 8, stream=i == 0).check(expected, len(ids))
                continue
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
            answer = httpx.post(
                f"{server.url}/v1/completions", json=body | {"ignore_eos": True}, timeout=120
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == expected.text
    # The decode worker saw the altered bytes: its checksum differed from the source's, and
    # every corrupted transfer (and only those) made the router prefill again.
    assert "checksum" in caplog.text, caplog.text[-2000:]
    after = server.metric("pdserve_request_migrations_total", reason="kv_failed")
    assert after - before == CORRUPTED
    for stats in server.wait_idle(timeout_s=30).values():
        assert (stats.num_reserved, stats.num_pinned_blocks) == (0, 0)
