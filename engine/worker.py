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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.scheduler_output import SchedulerOutput


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot for the router's policy and metrics. Set by the worker."""

    worker_id: str
    role: str  # "prefill" | "decode"
    num_waiting: int
    num_running: int
    num_reserved: int  # decode: requests whose KV is still arriving
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int
    block_size: int
    uptime_s: float


@dataclass(frozen=True)
class WorkerInfo:
    """Static facts the router needs from a worker, fetched once at start."""

    worker_id: str
    role: str
    model: str
    model_path: str
    max_model_len: int
    block_size: int
    vocab_size: int
    pid: int  # the worker's process
    node_id: str | None  # the Ray node it runs on; None outside Ray


def _ray_node_id() -> str | None:
    ray = sys.modules.get("ray")  # the engine does not import Ray; a Ray actor already has
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


@dataclass(frozen=True)
class StreamError:
    """A request's stream failed on the worker; sent in place of its next delta."""

    request_id: str
    kind: str  # the exception's class name
    message: str


class EngineWorker:
    role = "engine"

    def __init__(self, worker_id: str, engine_config: EngineConfig) -> None:
        self.worker_id = worker_id
        self.engine = LLMEngine(engine_config)
        self.block_size = engine_config.cache.block_size
        self._started = time.monotonic()
        # Roles start the loop at the end of their own __init__, once their hooks can run.
        self.loop = AsyncEngine(self.engine, on_layer=self._on_layer, on_step=self._on_step)
        # The remote output channel (``start_stream`` / ``outputs``). An asyncio.Queue binds
        # to the event loop that first awaits it, so creating it here is safe.
        self._outbox: asyncio.Queue[RequestDelta | StreamError] = asyncio.Queue()
        self._pumps: set[asyncio.Task] = set()

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
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            block_size=self.block_size,
            uptime_s=time.monotonic() - self._started,
        )

    async def check_health(self) -> bool:
        """True when the loop thread is alive and answers; raises its error when it died."""
        if self.loop.error is not None:
            raise RuntimeError(f"engine loop died: {self.loop.error!r}")
        await asyncio.wait_for(self.run(lambda e: None), timeout=30)
        return True

    async def abort(self, request_id: str) -> None:
        await self.loop.abort(request_id)

    # -- one output channel for remote callers -------------------------------------------
    #
    # In process, callers iterate a request's async generator (``decode``,
    # ``generate_local``) directly. Across processes one message per request per token is
    # expensive (a Ray streaming item costs ~1 ms of CPU), so a remote caller starts the
    # generator here with ``start_stream`` and reads every request's deltas, batched per
    # wake-up, from one long-lived ``outputs`` stream. One reader per worker.

    async def start_stream(self, method: str, request_id: str, *args: Any) -> None:
        """Run ``method(request_id, *args)`` (an async generator of deltas) in the background;
        its deltas, or a ``StreamError``, go out through ``outputs``."""
        outbox = self._outbox
        stream = getattr(self, method)(request_id, *args)

        async def pump() -> None:
            try:
                async for delta in stream:
                    outbox.put_nowait(delta)
            except Exception as error:
                outbox.put_nowait(StreamError(request_id, type(error).__name__, str(error)))

        task = asyncio.create_task(pump())
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

    async def outputs(self) -> AsyncIterator[list[RequestDelta | StreamError]]:
        """Every started stream's deltas, in order, as lists of what was ready together."""
        outbox = self._outbox
        while True:
            batch = [await outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            yield batch

    def shutdown(self) -> None:
        self.loop.shutdown()
