"""The router's stats refresh: a busy worker's pushed stats stand in for a poll, an idle
worker is asked once it goes ``IDLE_STATS_INTERVAL_S`` unheard (its heartbeat keeps it
unasked), a worker that fails drops out; fresh stats stand in for the periodic health check
too. The
worker side of the push (``engine.channel``) is tested in ``tests/engine/test_channel.py``;
a real cluster's stats reach the router in ``tests/serving``."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from engine.wire import WorkerStats
from router.backends import cluster as cluster_module
from router.backends.cluster import ClusterBackend, _InFlight
from router.cluster import Cluster


def _stats(worker_id: str, role: str, **busy: int) -> WorkerStats:
    fields = {
        "num_waiting": 0,
        "num_running": 0,
        "num_reserved": 0,
        "num_total_blocks": 100,
        "num_free_blocks": 100,
        "prefix_cache_queries": 0,
        "prefix_cache_hits": 0,
        "num_preemptions": 0,
        "block_size": 16,
        "uptime_s": 1.0,
    }
    return WorkerStats(worker_id=worker_id, role=role, **{**fields, **busy})


class Client:
    """A worker client as the backend sees it: ``stats`` counts the polls."""

    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id, self.role = worker_id, role
        self.pushed_stats: tuple[float, WorkerStats] | None = None
        self.connection_lost = False
        self.current = _stats(worker_id, role)
        self.polls = 0
        self.fail = False

    async def stats(self) -> WorkerStats:
        self.polls += 1
        if self.fail:
            raise ConnectionError("gone")
        return self.current


def _backend() -> tuple[ClusterBackend, Client, Client]:
    prefill, decode = Client("prefill-0", "prefill"), Client("decode-0", "decode")
    model = SimpleNamespace(model="m")
    cluster = SimpleNamespace(
        prefill=[prefill],
        decode=[decode],
        config=SimpleNamespace(engine=SimpleNamespace(model=model)),
    )
    return ClusterBackend(cluster), prefill, decode  # type: ignore[arg-type]


def test_fresh_pushed_stats_stand_in_for_a_poll_and_stale_ones_do_not():
    backend, prefill, decode = _backend()
    asyncio.run(backend.refresh_stats())
    assert (prefill.polls, decode.polls) == (1, 1)
    busy = _stats("decode-0", "decode", num_running=7, num_free_blocks=60)
    decode.pushed_stats = (time.monotonic(), busy)
    asyncio.run(backend.refresh_stats())
    assert decode.polls == 1 and backend.worker_stats()["decode-0"] == busy
    labels = {"role": "decode", "worker_id": "decode-0"}
    gauge = backend.metrics.registry.get_sample_value
    assert gauge("pdserve_worker_num_running_requests", labels) == 7
    decode.pushed_stats = (time.monotonic() - 2 * backend.config.stats_interval_s, busy)
    decode.current = replace(busy, num_running=3)
    asyncio.run(backend.refresh_stats())  # too old: asked (it is not idle)
    assert decode.polls == 2 and backend.worker_stats()["decode-0"].num_running == 3


def test_an_idle_worker_is_asked_every_idle_interval_unless_a_request_is_on_it(monkeypatch):
    backend, prefill, decode = _backend()
    asyncio.run(backend.refresh_stats())
    asyncio.run(backend.refresh_stats())
    assert (prefill.polls, decode.polls) == (1, 1)  # both idle: resting
    asyncio.run(backend.refresh_stats(poll_all=True))
    assert (prefill.polls, decode.polls) == (2, 2)

    backend._inflight["r1"] = _InFlight(decode, prefill, "r1")  # type: ignore[arg-type]
    asyncio.run(backend.refresh_stats())
    assert (prefill.polls, decode.polls) == (3, 3)  # a request on both: asked
    backend._inflight["r1"].prefilling = False  # P returned the first token: P rests again
    asyncio.run(backend.refresh_stats())
    assert (prefill.polls, decode.polls) == (3, 4)
    del backend._inflight["r1"]

    decode.current = _stats("decode-0", "decode", num_reserved=1)  # e.g. a lease running
    asyncio.run(backend.refresh_stats(poll_all=True))
    asyncio.run(backend.refresh_stats())
    asyncio.run(backend.refresh_stats())
    assert decode.polls == 7  # not idle by its own last stats: asked every time
    decode.current = _stats("decode-0", "decode")
    asyncio.run(backend.refresh_stats())
    asyncio.run(backend.refresh_stats())
    assert decode.polls == 8  # idle again: resting

    monkeypatch.setattr(cluster_module, "IDLE_STATS_INTERVAL_S", 0.0)
    asyncio.run(backend.refresh_stats())
    assert (prefill.polls, decode.polls) == (5, 9)


def test_a_worker_that_fails_its_poll_or_dies_drops_out_until_it_answers():
    backend, _, decode = _backend()
    asyncio.run(backend.refresh_stats())
    decode.fail = True
    asyncio.run(backend.refresh_stats(poll_all=True))
    assert "decode-0" not in backend.worker_stats()
    decode.fail = False
    asyncio.run(backend.refresh_stats())  # no stats to rest on: asked at once
    assert "decode-0" in backend.worker_stats()

    decode.pushed_stats = (time.monotonic(), decode.current)
    backend.cluster.worker = lambda worker_id: decode
    backend._worker_died(decode)  # type: ignore[arg-type]
    assert decode.pushed_stats is None and "decode-0" not in backend.worker_stats()


def test_a_refresh_cancelled_before_its_calls_start_leaves_no_call_unawaited():
    """The router stopping mid-refresh: the refresh is cancelled after it has queued its
    calls but before they ran; no worker call is made (and none dropped unawaited)."""
    backend, prefill, decode = _backend()

    async def main() -> None:
        refresh = asyncio.create_task(backend.refresh_stats(poll_all=True))
        await asyncio.sleep(0)  # the refresh runs up to its gather, whose tasks wait
        refresh.cancel()
        await asyncio.gather(refresh, return_exceptions=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert (prefill.polls, decode.polls) == (0, 0)
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_refresh_rests_while_the_cluster_does_and_wakes_for_a_request(monkeypatch):
    monkeypatch.setattr(cluster_module, "IDLE_STATS_INTERVAL_S", 3.0)
    backend, prefill, decode = _backend()
    backend.config = replace(backend.config, stats_interval_s=0.01)

    async def scenario() -> None:
        await backend.refresh_stats()
        now = time.monotonic()
        assert 2.0 < backend._rest_s(now) <= 3.0  # both idle and just asked
        loop = asyncio.create_task(backend._stats_loop())
        try:
            await asyncio.sleep(0.3)  # 30 of its intervals: none while resting
            assert (prefill.polls, decode.polls) == (1, 1)

            joined = Client("decode-1", "decode")
            backend.cluster.decode.append(joined)
            backend.cluster.on_join()  # what Cluster does when a worker joins
            await _until(lambda: joined.polls == 1, timeout_s=2.0)  # asked now, not in 3 s
            assert (prefill.polls, decode.polls) == (1, 1)  # the others still rest
            await asyncio.sleep(0.3)
            assert joined.polls == 1  # then it rests too

            backend._inflight["r1"] = _InFlight(decode, None, "r1")  # type: ignore[arg-type]
            assert backend._rest_s(time.monotonic()) is None
            backend._schedule_stats()  # what generate() does with a new request
            await _until(lambda: decode.polls >= 3)  # every interval while it is on D
            assert prefill.polls == 1  # P has no request: still resting

            del backend._inflight["r1"]  # done; D's last answer showed it idle
            await _until(lambda: backend._rest_s(time.monotonic()) is not None)
            polls = decode.polls
            await asyncio.sleep(0.3)
            assert decode.polls == polls  # resting again

            decode.current = _stats("decode-0", "decode", num_running=1)
            await _until(lambda: decode.polls >= polls + 1)  # its idle poll came due
            assert backend._rest_s(time.monotonic()) is None  # its answer: busy
            await _until(lambda: decode.polls >= polls + 4)  # so, every interval again
        finally:
            loop.cancel()

    asyncio.run(scenario())


def test_fresh_stats_stand_in_for_the_periodic_health_check():
    backend, _, decode = _backend()
    asyncio.run(backend.refresh_stats())  # both polled just now
    assert backend._answered_within(5.0) == {"prefill-0", "decode-0"}
    assert backend._answered_within(0.0) == frozenset()  # asked too long ago

    backend._polled_at["decode-0"] -= 10.0
    assert backend._answered_within(5.0) == {"prefill-0"}
    decode.pushed_stats = (time.monotonic(), decode.current)  # a busy worker's push
    assert backend._answered_within(5.0) == {"prefill-0", "decode-0"}
    decode.connection_lost = True  # its channel closed: whatever it sent before, ask it
    assert backend._answered_within(5.0) == {"prefill-0"}

    decode.connection_lost = False
    backend.cluster.worker = lambda worker_id: decode
    backend._worker_died(decode)  # type: ignore[arg-type]  # a request saw it die
    assert backend._answered_within(5.0) == {"prefill-0"}


def test_the_health_loop_asks_only_the_silent_workers_unless_a_death_was_seen():
    backend, _, decode = _backend()
    backend.config = replace(backend.config, health_interval_s=0.05)
    checked: list[frozenset[str]] = []

    async def replace_unhealthy(known_alive: frozenset[str] = frozenset()) -> list[str]:
        checked.append(known_alive)
        return []

    backend.cluster.replace_unhealthy = replace_unhealthy

    async def scenario() -> None:
        backend._health_check_now.set()  # a request saw a worker die: ask every worker
        loop = asyncio.create_task(backend._health_loop())
        try:
            await _until(lambda: len(checked) == 1)
            assert checked == [frozenset()]
            decode.pushed_stats = (time.monotonic() + 3600, decode.current)  # always fresh
            await _until(lambda: len(checked) >= 2)  # the periodic check, 0.05 s later
            assert checked[-1] == {"decode-0"}  # P never answered: asked; D not
        finally:
            loop.cancel()

    asyncio.run(scenario())


def test_the_cluster_health_check_asks_only_the_workers_not_known_alive():
    asked: list[str] = []

    class Handle:
        def __init__(self, worker_id: str, healthy: bool) -> None:
            self.worker_id, self.healthy = worker_id, healthy

        async def check_health(self) -> bool:
            asked.append(self.worker_id)
            return self.healthy

    cluster = SimpleNamespace(prefill=[Handle("p0", False)], decode=[Handle("d0", True)])
    healthy = asyncio.run(Cluster.health(cluster, known_alive=frozenset({"d0"})))  # type: ignore[arg-type]
    assert healthy == {"p0": False, "d0": True} and asked == ["p0"]
    healthy = asyncio.run(Cluster.health(cluster))  # type: ignore[arg-type]
    assert healthy == {"p0": False, "d0": True} and asked == ["p0", "p0", "d0"]


def _count_refreshes(backend: ClusterBackend) -> tuple[list[float], Any]:
    """Record when ``backend.refresh_stats`` runs; returns the times and the real method."""
    refreshes: list[float] = []
    refresh = backend.refresh_stats

    async def counted_refresh(poll_all: bool = False) -> None:
        refreshes.append(time.monotonic())
        await refresh(poll_all)

    backend.refresh_stats = counted_refresh  # type: ignore[method-assign]
    return refreshes, refresh


def _push(backend: ClusterBackend, worker: Client, **busy: int) -> None:
    """What the channel does with a worker's pushed stats (busy, or an idle heartbeat)."""
    worker.pushed_stats = (time.monotonic(), _stats(worker.worker_id, worker.role, **busy))
    backend._on_pushed(worker)  # type: ignore[arg-type]


def test_a_pushing_worker_is_recorded_at_once_and_never_wakes_the_stats_task():
    backend, _, decode = _backend()
    backend.config = replace(backend.config, stats_interval_s=0.05)
    refreshes, refresh = _count_refreshes(backend)

    async def scenario() -> None:
        await refresh()  # both asked once, as at start
        backend._inflight["r1"] = _InFlight(decode, None, "r1")  # type: ignore[arg-type]
        _push(backend, decode, num_running=1)
        assert backend.worker_stats()["decode-0"].num_running == 1  # recorded at once
        loop = asyncio.create_task(backend._stats_loop())
        try:
            for i in range(20):  # every 20 ms, for 0.4 s: eight of its 50 ms intervals
                _push(backend, decode, num_running=i + 1)
                await asyncio.sleep(0.02)
            assert decode.polls == 1  # never asked while it pushed
            assert backend.worker_stats()["decode-0"].num_running == 20
            assert len(refreshes) <= 1, refreshes  # P rests; D's pushes put it off
            await _until(lambda: decode.polls >= 3)  # it stopped pushing: asked again
            gaps = [b - a for a, b in itertools.pairwise(refreshes)]
            assert all(gap >= 0.04 for gap in gaps), gaps  # never above its cadence
        finally:
            loop.cancel()

    asyncio.run(scenario())


def test_idle_workers_heartbeats_keep_them_resting_unasked_and_the_task_asleep(monkeypatch):
    monkeypatch.setattr(cluster_module, "IDLE_STATS_INTERVAL_S", 0.3)
    backend, prefill, decode = _backend()
    backend.config = replace(backend.config, stats_interval_s=0.01)
    refreshes, refresh = _count_refreshes(backend)

    async def scenario() -> None:
        await refresh()  # both asked once, as at start: idle
        loop = asyncio.create_task(backend._stats_loop())
        try:
            await _until(lambda: backend._stats_resting)
            for _ in range(10):  # 1 s of heartbeats every 0.1 s: three idle intervals
                _push(backend, prefill)
                _push(backend, decode)
                await asyncio.sleep(0.1)
            assert (prefill.polls, decode.polls) == (1, 1)  # never asked
            assert refreshes == []  # each beat put the task's wake-up off
            for _ in range(8):  # D falls silent; P keeps beating
                _push(backend, prefill)
                await asyncio.sleep(0.1)
            assert decode.polls >= 2  # asked once it went an idle interval unheard
            assert prefill.polls == 1
            assert all(b - a >= 0.25 for a, b in itertools.pairwise(refreshes)), refreshes
        finally:
            loop.cancel()

    asyncio.run(scenario())
