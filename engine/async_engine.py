"""Drive an ``LLMEngine`` from asyncio: the step loop runs on its own thread.

The engine is not thread-safe, so only the loop thread touches it. Async callers submit work
with ``call(fn)`` (``fn(engine)`` runs on the loop thread between two steps) and receive each
request's ``RequestDelta`` stream through an ``asyncio.Queue`` fed with
``call_soon_threadsafe``. Lifecycle: ``start()`` -> (``generate``/``call``/``abort``)* ->
``shutdown()``; a request's queue is dropped when its last delta is delivered or it is
aborted. An exception inside a step fails every open stream (never swallowed) and stops the
loop; ``error`` then holds it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        on_layer: Callable[[SchedulerOutput, int], None] | None = None,
        on_step: Callable[[LLMEngine], None] | None = None,
    ) -> None:
        self.engine = engine
        self._on_layer = on_layer
        self._on_step = on_step  # runs on the loop thread after every iteration (housekeeping)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- calls from async code ---------------------------------------------------------

    def call(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(engine)`` on the loop thread; await it with ``asyncio.wrap_future``."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """Register a delta queue for ``request_id`` (before the request can produce tokens)."""
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        return stream

    def has_stream(self, request_id: str) -> bool:
        return request_id in self._streams

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[RequestDelta]:
        """Add a request and yield its deltas; closing the generator early aborts it."""
        stream = self.open_stream(request_id)
        try:
            await asyncio.wrap_future(
                self.call(
                    lambda e: e.add_request(request_id, prompt_token_ids, sampling_params, priority)
                )
            )
            async for delta in self.stream_deltas(request_id, stream):
                yield delta
        finally:
            if self.has_stream(request_id):
                await self.abort(request_id)

    async def stream_deltas(
        self, request_id: str, stream: asyncio.Queue
    ) -> AsyncIterator[RequestDelta]:
        """Yield the request's deltas; those already queued are merged into one, so a reader
        slower than the engine (a Ray stream, a busy router) gets fewer, larger messages."""
        while True:
            item = await stream.get()
            while isinstance(item, RequestDelta) and not item.finished and not stream.empty():
                queued = stream.get_nowait()
                if not isinstance(queued, RequestDelta):
                    stream.put_nowait(queued)  # an error: raised after this delta
                    break
                item = item.merge(queued)
            if isinstance(item, BaseException):
                self._streams.pop(request_id, None)
                raise EngineDeadError(f"the engine loop died: {item!r}") from item
            yield item
            if item.finished:
                self._streams.pop(request_id, None)
                return

    async def abort(self, request_id: str) -> bool:
        """Abort a request; a reader still waiting on its stream gets a final ABORT delta."""
        self.close_stream(request_id)
        if not self.is_running:
            return False
        return await asyncio.wrap_future(self.call(lambda e: e.abort_request(request_id)))

    def close_stream(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """End a request's stream with a final token-less delta (from any thread): for a
        request the engine dropped by itself, or one being aborted."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            loop, stream = entry
            final = RequestDelta(request_id, [], None, reason, 0, num_cached_tokens=0)
            loop.call_soon_threadsafe(stream.put_nowait, final)

    # -- the loop thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_schedulable_requests()
                if not self._drain_commands(block=idle):
                    self._close_streams(EngineDeadError("the engine was shut down"))
                    return
                if self.engine.has_schedulable_requests():
                    for delta in self.engine.step(self._on_layer):
                        self._deliver(delta)
                if self._on_step is not None:
                    self._on_step(self.engine)
        except BaseException as error:  # reported to every open stream, then re-raised
            logger.exception("engine loop failed")
            self.error = error
            self._close_streams(error)
            self._fail_pending_commands(error)
            raise

    def _close_streams(self, error: BaseException) -> None:
        """Every open stream raises ``error`` to its reader: nobody waits forever."""
        for request_id in list(self._streams):
            self._deliver_error(request_id, error)

    def _drain_commands(self, block: bool) -> bool:
        """Run queued commands; when idle, wait briefly for one. False means stop."""
        try:
            item = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as error:
                    future.set_exception(error)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _fail_pending_commands(self, error: BaseException) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(EngineDeadError(f"the engine loop died: {error!r}"))

    def _deliver(self, delta: RequestDelta) -> None:
        entry = self._streams.get(delta.request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, delta)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, error)
