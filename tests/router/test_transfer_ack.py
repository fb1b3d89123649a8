"""A remote prefill's KV transfer is counted in the router's metrics even when P's
acknowledgment reaches the router after D's last token (a short request on a busy
machine), and the router waits for it only a bounded time."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.outputs import RequestDelta
from engine.request import FinishReason
from engine.wire import PrefillResult, Reservation, TransferStats
from router.backends import cluster as cluster_module
from tests.router.test_local_prefill import _backend, _request
from tests.router.test_stats_refresh import Client


class Prefill(Client):
    """Prefills at once; acknowledges the KV transfer ``ack_after_s`` later (None: never)."""

    def __init__(self, ack_after_s: float | None) -> None:
        super().__init__("prefill-0", "prefill")
        self.ack_after_s = ack_after_s

    async def prefill(self, request_id, prompt_token_ids, sampling_params, target, skip, resumed):
        return PrefillResult(request_id, 7, None, len(prompt_token_ids), 0)

    async def wait_transfer(self, request_id, timeout_s):
        if self.ack_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.ack_after_s)
        return TransferStats(request_id, 4096, 0.01)


class Decode(Client):
    """Decodes one token after the first, at once."""

    def __init__(self) -> None:
        super().__init__("decode-0", "decode")

    async def reserve(self, request_id, prompt_token_ids, sampling_params, resumed):
        return Reservation(None, 0)

    async def decode(self, request_id, first_token_id):
        yield RequestDelta(request_id, [8], None, FinishReason.LENGTH, 0, 0)


def _run(ack_after_s: float | None) -> tuple[list[list[int]], float, float]:
    """The tokens of one remote request, the seconds its stream took, and the count of KV
    transfers in the router's metrics afterwards."""

    async def run() -> tuple[list[list[int]], float, float]:
        backend, _ = _backend(threshold=0)  # every prompt to a prefill worker
        prefill, decode = Prefill(ack_after_s), Decode()
        backend.cluster.prefill, backend.cluster.decode = [prefill], [decode]
        workers = {w.worker_id: w for w in (prefill, decode)}
        backend.cluster.worker = workers.__getitem__
        await backend.refresh_stats()
        start = time.monotonic()
        tokens = [delta.new_token_ids async for delta in backend.generate(_request("a", 40))]
        elapsed = time.monotonic() - start
        count = backend.metrics.registry.get_sample_value("pdserve_kv_transfer_bytes_count")
        return tokens, elapsed, count

    return asyncio.run(run())


def test_an_acknowledgment_after_the_last_token_is_still_counted():
    tokens, elapsed, count = _run(ack_after_s=0.05)
    assert tokens == [[7], [8]]
    assert count == 1
    assert elapsed < cluster_module.TRANSFER_ACK_GRACE_S


def test_the_router_waits_for_a_missing_acknowledgment_a_bounded_time(monkeypatch):
    monkeypatch.setattr(cluster_module, "TRANSFER_ACK_GRACE_S", 0.1)
    tokens, elapsed, count = _run(ack_after_s=None)
    assert tokens == [[7], [8]]
    assert count == 0
    assert elapsed == pytest.approx(0.1, abs=0.5)
