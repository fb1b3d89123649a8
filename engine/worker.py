"""What both worker roles share: an engine on its loop thread, its stats, health and abort.

``prefill_worker.PrefillWorker`` and ``decode_worker.DecodeWorker`` extend ``EngineWorker``
with their role. A worker is a plain object (tests run it in-process); a Ray actor is a thin
wrapper around one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from engine.async_engine import AsyncEngine, OutboxItem
from engine.channel import ChannelAddress, ChannelServer
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.scheduler_output import SchedulerOutput
from engine.wire import WorkerInfo, WorkerStats

# A single engine step running longer than this means the loop is stuck: the worker fails
# its health check and the router replaces it. Long prefills on CPU take seconds, not this.
STEP_STALL_S = 600.0

# Aborted request ids remembered, for a call that arrives after its abort (Ray may start an
# async actor's calls out of order): enough for many seconds of aborts at any real rate.
MAX_ABORTED_IDS = 4096


class RequestAbortedError(RuntimeError):
    """A request's abort arrived before this call: the call is refused, nothing is kept."""


def _ray_node_id() -> str | None:
    ray = sys.modules.get("ray")  # the engine does not import Ray; a Ray actor already has
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class EngineWorker:
    role = "engine"

    def __init__(self, worker_id: str, engine_config: EngineConfig) -> None:
        self.worker_id = worker_id
        self.engine = LLMEngine(engine_config)
        self.block_size = engine_config.cache.block_size
        self._started = time.monotonic()
        self._aborted: OrderedDict[str, None] = OrderedDict()  # loop thread only
        self._channel = ChannelServer(self, self.outputs)
        # Roles start the loop at the end of their own __init__, once their hooks can run.
        self.loop = AsyncEngine(self.engine, on_layer=self._on_layer, on_step=self._on_step)

    # Hooks for the roles; both run on the loop thread.
    def _on_layer(self, step: SchedulerOutput, layer: int) -> None:
        pass

    def _on_step(self, engine: LLMEngine) -> None:
        pass

    async def run(self, fn):
        """Run ``fn(engine)`` on the loop thread and await its result."""
        return await asyncio.wrap_future(self.loop.call(fn))

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            model=self.engine.config.model.model,
            model_path=str(self.engine.runner.model_path),
            max_model_len=self.engine.max_model_len,
            block_size=self.block_size,
            vocab_size=self.engine.runner.geometry.vocab_size,
            pid=os.getpid(),
            node_id=_ray_node_id(),
        )

    async def stats(self) -> WorkerStats:
        s = await self.run(lambda e: e.stats())
        return WorkerStats(
            worker_id=self.worker_id,
            role=self.role,
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            num_reserved=s.num_reserved,
            num_total_blocks=s.num_total_blocks,
            num_free_blocks=s.num_free_blocks,
            num_pinned_blocks=s.num_pinned_blocks,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            block_size=self.block_size,
            uptime_s=time.monotonic() - self._started,
        )

    async def check_health(self) -> bool:
        """True while the loop thread lives and no step has run past ``STEP_STALL_S``.

        Answered here, not on the loop thread: a long step (a 4k-token prefill of a big model
        on CPU takes many seconds) is work, not death, and must not get the worker replaced.
        """
        if self.loop.error is not None:
            raise RuntimeError(f"engine loop died: {self.loop.error!r}")
        if not self.loop.is_running:
            raise RuntimeError("engine loop is not running")
        started = self.loop.step_started_at
        if started is not None and time.monotonic() - started > STEP_STALL_S:
            raise RuntimeError(f"engine step running for {time.monotonic() - started:.0f} s")
        return True

    async def abort(self, request_id: str) -> None:
        await self.loop.abort(request_id)

    # Loop thread: a role's abort marks the id; its calls that start a request refuse one.
    def _mark_aborted(self, request_id: str) -> None:
        self._aborted[request_id] = None
        if len(self._aborted) > MAX_ABORTED_IDS:
            self._aborted.popitem(last=False)

    def _refuse_if_aborted(self, request_id: str) -> None:
        if request_id in self._aborted:
            raise RequestAbortedError(f"request {request_id!r} was aborted before this call")

    # -- the outputs, and the channel the router reaches them by -------------------------
    #
    # A request started with ``DecodeWorker.generate`` or ``decode`` sends its deltas to the
    # engine's outbox: each engine step's deltas of all such requests are one list, sent to
    # the reader as is. One reader per worker: the router's client, in process or over the
    # worker channel (``engine/channel.py``), one frame per wake-up, not one per request.

    async def open_channel(self, router_node_id: str | None) -> ChannelAddress:
        """Where the router reaches this worker's verbs and outputs (see ``engine.channel``):
        loopback when the router runs on this node, else this Ray node's address."""
        node_id = _ray_node_id()
        if node_id is None or node_id == router_node_id:
            return await self._channel.open("127.0.0.1")
        import ray.util

        return await self._channel.open(ray.util.get_node_ip_address())

    async def outputs(self) -> AsyncIterator[list[OutboxItem]]:
        """Every outbox-routed request's deltas, in order, as lists of what was ready
        together; a request's deltas queued together are merged into one."""
        outbox = self.loop.outbox
        while True:
            batch = await outbox.get()
            if not outbox.empty():
                while not outbox.empty():
                    batch = batch + outbox.get_nowait()
                batch = _merge(batch)
            yield batch

    def shutdown(self) -> None:
        self._channel.close()
        self.loop.shutdown()


def _merge(batch: list[OutboxItem]) -> list[OutboxItem]:
    """Consecutive unfinished deltas of one request become one; order is kept otherwise."""
    merged: list[OutboxItem] = []
    last: dict[str, int] = {}  # request id -> index in merged of its open delta
    for item in batch:
        index = last.get(item.request_id)
        if isinstance(item, RequestDelta) and index is not None:
            merged[index] = merged[index].merge(item)  # type: ignore[union-attr]
        else:
            merged.append(item)
            index = len(merged) - 1
        if isinstance(item, RequestDelta) and not item.finished:
            last[item.request_id] = index
        else:
            last.pop(item.request_id, None)
    return merged
