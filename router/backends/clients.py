"""Typed clients for the workers: one method per verb, whether the worker is in this process
or a Ray actor. This is the one file that names worker methods.

A client holds a *target*: the worker object itself (``InProcessClient``: tests,
``--transport local``) or its Ray actor handle (``RayClient``). Each verb names the worker
method it calls and ``_call`` sends it the target's way: a method call in process; for a
Ray actor, the request verbs over the worker channel (``engine/channel.py``) and the
control verbs as Ray calls. A dead actor, a lost channel or a dead engine loop is
``WorkerDiedError``.

Streams (``generate``, ``decode``) are demultiplexed: the verb starts the request on the
worker and returns; the worker's outputs (each engine step's deltas of all its requests, as
one list) reach ``_deliver``, which hands each delta to its request's queue. The stream
merges the deltas already queued when it is read, so a slow reader gets fewer, larger
updates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from engine.channel import CHANNEL_VERBS, ChannelClient, ChannelClosedError
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from engine.wire import (
    EngineDeadError,
    PrefillResult,
    Reservation,
    StreamError,
    TransferStats,
    WorkerInfo,
    WorkerStats,
)

if TYPE_CHECKING:
    from kv_transfer.base import ReceiverInfo, TransferTarget

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """The worker process is gone, or its engine loop died; its requests are lost and it
    must be replaced."""


class WorkerClient:
    """The verbs every worker answers, plus the decode and prefill roles' (the router picks
    the client of the right role)."""

    def __init__(self, target: Any, worker_id: str, role: str) -> None:
        self.target = target  # the worker, or its Ray actor handle
        self.worker_id = worker_id
        self.role = role
        self._queues: dict[str, asyncio.Queue[RequestDelta | BaseException]] = {}
        # The worker's latest stats sent unasked, and when they came (``time.monotonic``).
        self.pushed_stats: tuple[float, WorkerStats] | None = None
        self.connection_lost = False  # its channel closed: the worker (or the path) is gone
        # Called with this client when it has stored newly pushed stats (the backend's).
        self.on_pushed: Callable[[WorkerClient], None] | None = None

    # -- every worker ------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        return await self._call("info")

    async def stats(self) -> WorkerStats:
        return await self._call("stats")

    async def check_health(self) -> bool:
        return await self._call("check_health")

    async def abort(self, request_id: str) -> None:
        await self._call("abort", request_id)

    # -- KV pairing, before any request (NIXL: agent metadata; layouts checked) ---------

    async def kv_receiver_info(self) -> ReceiverInfo:
        """Decode workers: where and how their KV receiver takes writes."""
        return await self._call("kv_receiver_info")

    async def connect_kv(self, receiver: ReceiverInfo) -> None:
        """Prefill workers: handshake with a decode worker's receiver."""
        await self._call("connect_kv", receiver)

    # -- decode workers ----------------------------------------------------------------

    # ``output_token_ids``: a request resumed after its worker died continues after the
    # tokens it already generated (None: a new request).

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> Reservation:
        return await self._call(
            "reserve", request_id, prompt_token_ids, sampling_params, output_token_ids
        )

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Prefill and decode on this worker."""
        start = ("generate", request_id, prompt_token_ids, sampling_params, output_token_ids)
        return self._stream(request_id, *start)

    def decode(self, request_id: str, first_token_id: int) -> AsyncIterator[RequestDelta]:
        """Decode a reserved request once its KV has landed, after ``first_token_id``."""
        return self._stream(request_id, "decode", request_id, first_token_id)

    # -- prefill workers ---------------------------------------------------------------

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        target: TransferTarget | None,
        num_skip_blocks: int,
        output_token_ids: list[int] | None = None,
    ) -> PrefillResult:
        return await self._call(
            "prefill",
            request_id,
            prompt_token_ids,
            sampling_params,
            target,
            num_skip_blocks,
            output_token_ids,
        )

    async def wait_transfer(self, request_id: str, timeout_s: float | None) -> TransferStats:
        return await self._call("wait_transfer", request_id, timeout_s)

    # -- how calls and outputs travel (per target kind) ----------------------------------

    async def _call(self, verb: str, *args: Any) -> Any:
        try:
            return await self._call_target(verb, *args)
        except EngineDeadError as error:  # across Ray too: its task errors keep the class
            raise self._as_died(error) from error

    def _as_died(self, error: Exception) -> Exception:
        """A dead engine loop is a dead worker to the router."""
        return self._died(error) if isinstance(error, EngineDeadError) else error

    def _died(self, error: BaseException) -> WorkerDiedError:
        return WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}")

    async def _call_target(self, verb: str, *args: Any) -> Any:
        raise NotImplementedError

    async def _start_outputs(self) -> None:
        """Make sure this worker's outputs reach ``_deliver`` before a stream starts."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop reading outputs; a stream still open on this worker ends with
        ``WorkerDiedError`` (its request can resume elsewhere), never waits forever."""
        self._fail_streams(WorkerDiedError(f"{self.role} worker {self.worker_id} was shut down"))

    # -- streams -----------------------------------------------------------------------

    async def _stream(self, request_id: str, verb: str, *args: Any) -> AsyncIterator[RequestDelta]:
        queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            await self._start_outputs()
            await self._call(verb, *args)
            while True:
                item = await queue.get()
                while isinstance(item, RequestDelta) and not item.finished and not queue.empty():
                    queued = queue.get_nowait()
                    if not isinstance(queued, RequestDelta):
                        queue.put_nowait(queued)  # an error: raised after this delta
                        break
                    item = item.merge(queued)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(request_id, None)

    def _deliver(self, batch: list[RequestDelta | StreamError]) -> None:
        """One outputs batch of the worker to its requests' queues."""
        queues = self._queues
        for item in batch:
            queue = queues.get(item.request_id)
            if queue is None:  # the reader went away (aborted)
                continue
            if isinstance(item, StreamError):
                queue.put_nowait(self._as_died(item.to_exception()))
            else:
                queue.put_nowait(item)

    def _fail_streams(self, error: WorkerDiedError) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)


class InProcessClient(WorkerClient):
    """A worker in this process (tests, ``--transport local``): calls are method calls, and
    one reader task consumes the worker's ``outputs``."""

    def __init__(self, worker: Any) -> None:
        super().__init__(worker, worker.worker_id, worker.role)
        self._reader: asyncio.Task | None = None

    async def _call_target(self, verb: str, *args: Any) -> Any:
        result = getattr(self.target, verb)(*args)
        if isinstance(result, Awaitable):
            result = await result
        return result

    async def _start_outputs(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        try:
            async for batch in self.target.outputs():
                self._deliver(batch)
        except Exception as error:
            logger.exception("reading the outputs of %s failed", self.worker_id)
            self._fail_streams(WorkerDiedError(f"lost the outputs of {self.worker_id}: {error}"))

    def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        super().shutdown()
        self.target.shutdown()


class RayClient(WorkerClient):
    """A worker that is a Ray actor. Ray carries the control verbs; the request verbs
    (``engine.channel.CHANNEL_VERBS``) and the outputs go over the worker channel, opened
    at the first of them (a Ray call costs ~0.6 ms of CPU, a channel frame a few us)."""

    def __init__(self, target: Any, worker_id: str, role: str) -> None:
        super().__init__(target, worker_id, role)
        self._channel: ChannelClient | None = None
        self._opening: asyncio.Future[ChannelClient] | None = None

    async def _call_target(self, verb: str, *args: Any) -> Any:
        if verb in CHANNEL_VERBS:
            channel = await self._open_channel()
            try:
                return await channel.call(verb, *args)
            except ChannelClosedError as error:
                raise self._died(error) from error
        import ray

        try:
            return await getattr(self.target, verb).remote(*args)
        except ray.exceptions.RayActorError as error:
            raise self._died(error) from error

    async def _start_outputs(self) -> None:
        await self._open_channel()

    async def _open_channel(self) -> ChannelClient:
        if self._channel is not None:
            return self._channel
        if self._opening is None:  # one opening, whoever asks first; the others wait for it
            self._opening = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._opening)
        except WorkerDiedError:
            raise
        except Exception as error:
            self._opening = None  # not opened (e.g. refused): the next call tries again
            raise self._died(error) from error

    async def _connect(self) -> ChannelClient:
        import ray

        router_node_id = ray.get_runtime_context().get_node_id()
        try:
            address = await self.target.open_channel.remote(router_node_id)
        except ray.exceptions.RayActorError as error:
            raise self._died(error) from error
        self._channel = await ChannelClient.connect(
            address, self._deliver, self._lost, self._pushed
        )
        return self._channel

    def _pushed(self, stats: WorkerStats) -> None:
        self.pushed_stats = (time.monotonic(), stats)
        if self.on_pushed is not None:
            self.on_pushed(self)

    def _lost(self, error: ChannelClosedError) -> None:
        self.pushed_stats = None
        self.connection_lost = True
        self._fail_streams(self._died(error))

    def shutdown(self) -> None:
        import ray

        if self._channel is not None:
            self._channel.close()
        super().shutdown()
        ray.kill(self.target)
