"""Drive an ``LLMEngine`` from asyncio: the step loop runs on its own thread.

The engine is not thread-safe, so only the loop thread touches it. Async callers submit work
with ``call(fn)`` (``fn(engine)`` runs on the loop thread between two steps).

Outputs leave the loop thread once per engine step: the step's deltas, as one list, are
handed to the event loop with one ``call_soon_threadsafe`` and dispatched there by request
id to the request's *route*:

- the **outbox** (``route(request_id)``): deltas of every such request are appended to one
  list per step and put on ``outbox`` as is; a worker's ``outputs`` stream sends those lists
  to its remote reader (one message per wake-up, not one per request per token);
- a **sink** (``route(request_id, sink)``): an in-process reader's callback (``generate``,
  the prefill worker's first-token future).

A route is dropped when its final delta passes, when ``close_stream`` ends it (abort, or a
request the engine dropped by itself: a final token-less delta), or when ``fail`` sends it
an error (``StreamError`` on the outbox). Lifecycle: ``start()`` -> (``route``/``call``/
``abort``)* -> ``shutdown()``. An exception inside a step fails every open route (never
swallowed) and stops the loop; ``error`` then holds it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.scheduler_output import SchedulerOutput
from engine.wire import EngineDeadError, StreamError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()
Sink = Callable[[RequestDelta | BaseException], None]
OutboxItem = RequestDelta | StreamError


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
        # Event loop only: request id -> its sink, or None for the outbox.
        self._routes: dict[str, Sink | None] = {}
        self._event_loop: asyncio.AbstractEventLoop | None = None  # bound by the first route
        self._outbox: asyncio.Queue[list[OutboxItem]] | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.step_started_at: float | None = None  # time.monotonic() of the step running now
        self._stopped = False  # set by shutdown: no command is taken any more

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; a command sent after this (or left queued) fails with
        ``EngineDeadError`` instead of waiting forever, as a dead worker's would."""
        self._stopped = True
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.is_running:
            self._fail_pending_commands(RuntimeError("shut down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- calls from async code ---------------------------------------------------------

    def call(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(engine)`` on the loop thread; await it with ``asyncio.wrap_future``."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        if self._stopped:
            raise EngineDeadError("the engine loop was shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    @property
    def outbox(self) -> asyncio.Queue[list[OutboxItem]]:
        """Lists of outbox-routed deltas (and ``StreamError``s), one per engine step."""
        self._bind()
        assert self._outbox is not None
        return self._outbox

    def route(self, request_id: str, sink: Sink | None = None) -> None:
        """Send ``request_id``'s deltas to ``sink``, or to the outbox when None. Register the
        route before the request can produce tokens (before adding it to the engine)."""
        self._bind()
        self._routes[request_id] = sink

    def has_route(self, request_id: str) -> bool:
        return request_id in self._routes

    def drop_route(self, request_id: str) -> None:
        self._routes.pop(request_id, None)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Add a request and yield its deltas (in-process readers); closing early aborts it.
        ``output_token_ids``: a resumed request's tokens so far (``LLMEngine.add_request``)."""
        deltas: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self.route(request_id, deltas.put_nowait)
        try:
            await asyncio.wrap_future(
                self.call(
                    lambda e: e.add_request(
                        request_id, prompt_token_ids, sampling_params, priority, output_token_ids
                    )
                )
            )
            while True:
                item = await deltas.get()
                if isinstance(item, EngineDeadError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop died: {item!r}") from item
                yield item
                if item.finished:
                    return
        finally:
            if self.has_route(request_id):
                await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request; a reader still waiting on it gets a final ABORT delta."""
        self.close_stream(request_id)
        if not self.is_running:
            return False
        return await asyncio.wrap_future(self.call(lambda e: e.abort_request(request_id)))

    def close_stream(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """End a request's route with a final token-less delta (from any thread): for a
        request the engine dropped by itself, or one being aborted."""
        self.deliver(RequestDelta(request_id, [], None, reason, 0, num_cached_tokens=0))

    def deliver(self, delta: RequestDelta) -> None:
        """Send a delta made outside a step to its route (from any thread)."""
        self._to_event_loop(self._dispatch, [delta])

    def fail(self, request_id: str, error: BaseException) -> None:
        """End a request's route with ``error`` (from any thread)."""
        self._to_event_loop(self._fail_routes, [request_id], error)

    # -- the event loop side -----------------------------------------------------------

    def _bind(self) -> None:
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
            self._outbox = asyncio.Queue()

    def _to_event_loop(self, fn: Callable, *args: object) -> None:
        loop = self._event_loop
        if loop is None:
            return  # nobody ever routed a request: nobody to tell
        if _on_loop(loop):
            fn(*args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        """One engine step's deltas to their routes: sinks called, outbox gets one list."""
        routes = self._routes
        batch: list[OutboxItem] = []
        for delta in deltas:
            if delta.request_id not in routes:
                continue  # aborted, or not routed (a request the caller does not read)
            sink = routes.pop(delta.request_id) if delta.finished else routes[delta.request_id]
            if sink is None:
                batch.append(delta)
            else:
                sink(delta)
        if batch:
            self.outbox.put_nowait(batch)

    def _fail_routes(self, request_ids: list[str] | None, error: BaseException) -> None:
        """``request_ids`` None: every route (the engine died)."""
        ids = list(self._routes) if request_ids is None else request_ids
        batch: list[OutboxItem] = []
        for request_id in ids:
            if request_id not in self._routes:
                continue
            sink = self._routes.pop(request_id)
            if sink is None:
                batch.append(StreamError.of(request_id, error))
            else:
                sink(error)
        if batch:
            self.outbox.put_nowait(batch)

    # -- the loop thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_schedulable_requests()
                if not self._drain_commands(block=idle):
                    self._to_event_loop(
                        self._fail_routes, None, EngineDeadError("the engine was shut down")
                    )
                    return
                if self.engine.has_schedulable_requests():
                    self.step_started_at = time.monotonic()
                    deltas = self.engine.step(self._on_layer)
                    self.step_started_at = None
                    if deltas:
                        self._to_event_loop(self._dispatch, deltas)
                if self._on_step is not None:
                    self._on_step(self.engine)
        except BaseException as error:  # reported to every open route, then re-raised
            logger.exception("engine loop failed")
            self.error = error
            # Every reader, in-process or across Ray, learns the worker is dead (the router
            # migrates its requests and replaces it), whatever killed the loop.
            dead = EngineDeadError(f"the engine loop died: {error!r}")
            dead.__cause__ = error
            self._to_event_loop(self._fail_routes, None, dead)
            self._fail_pending_commands(error)
            raise

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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
