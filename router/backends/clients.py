"""Typed clients for the workers: one method per verb, whether the worker is in this process
or a Ray actor. This is the one file that calls worker methods.

A client holds a *target*: the worker object itself (``InProcessClient``: tests,
``--transport local``) or its Ray actor handle (``RayClient``, which turns a dead actor
into ``WorkerDiedError``). Each verb names the worker method it calls, as an attribute of
the target, and ``_call`` awaits it the target's way.

Streams (``generate``, ``decode``) are demultiplexed: the verb starts the request on the
worker and returns; one reader task per client consumes the worker's ``outputs`` (each
engine step's deltas of all its requests, as one list) and hands each delta to its
request's queue. The stream merges the deltas already queued when it is read, so a slow
reader gets fewer, larger updates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

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
        self._reader: asyncio.Task | None = None

    # -- every worker ------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        return await self._call(self.target.info)

    async def stats(self) -> WorkerStats:
        return await self._call(self.target.stats)

    async def check_health(self) -> bool:
        return await self._call(self.target.check_health)

    async def abort(self, request_id: str) -> None:
        await self._call(self.target.abort, request_id)

    # -- KV pairing, before any request (NIXL: agent metadata; layouts checked) ---------

    async def kv_receiver_info(self) -> ReceiverInfo:
        """Decode workers: where and how their KV receiver takes writes."""
        return await self._call(self.target.kv_receiver_info)

    async def connect_kv(self, receiver: ReceiverInfo) -> None:
        """Prefill workers: handshake with a decode worker's receiver."""
        await self._call(self.target.connect_kv, receiver)

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
            self.target.reserve, request_id, prompt_token_ids, sampling_params, output_token_ids
        )

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Prefill and decode on this worker."""
        start = (self.target.generate, request_id, prompt_token_ids, sampling_params)
        return self._stream(request_id, *start, output_token_ids)

    def decode(self, request_id: str, first_token_id: int) -> AsyncIterator[RequestDelta]:
        """Decode a reserved request once its KV has landed, after ``first_token_id``."""
        return self._stream(request_id, self.target.decode, request_id, first_token_id)

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
            self.target.prefill,
            request_id,
            prompt_token_ids,
            sampling_params,
            target,
            num_skip_blocks,
            output_token_ids,
        )

    async def wait_transfer(self, request_id: str, timeout_s: float | None) -> TransferStats:
        return await self._call(self.target.wait_transfer, request_id, timeout_s)

    # -- how calls and outputs travel (per target kind) ----------------------------------

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self._call_target(method, *args)
        except EngineDeadError as error:  # across Ray too: its task errors keep the class
            raise self._as_died(error) from error

    def _as_died(self, error: Exception) -> Exception:
        """A dead engine loop is a dead worker to the router."""
        if isinstance(error, EngineDeadError):
            return WorkerDiedError(f"{self.role} worker {self.worker_id}: {error}")
        return error

    async def _call_target(self, method: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _outputs(self) -> AsyncIterator[list[RequestDelta | StreamError]]:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop reading outputs; a stream still open on this worker ends with
        ``WorkerDiedError`` (its request can resume elsewhere), never waits forever."""
        if self._reader is not None:
            self._reader.cancel()
        for queue in self._queues.values():
            queue.put_nowait(WorkerDiedError(f"{self.role} worker {self.worker_id} was shut down"))

    # -- streams -----------------------------------------------------------------------

    async def _stream(
        self, request_id: str, start: Callable[..., Any], *args: Any
    ) -> AsyncIterator[RequestDelta]:
        queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_outputs())
            await self._call(start, *args)
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

    async def _read_outputs(self) -> None:
        queues = self._queues
        try:
            async for batch in self._outputs():
                for item in batch:
                    queue = queues.get(item.request_id)
                    if queue is None:  # the reader went away (aborted)
                        continue
                    if isinstance(item, StreamError):
                        queue.put_nowait(self._as_died(item.to_exception()))
                    else:
                        queue.put_nowait(item)
        except WorkerDiedError as error:
            for queue in queues.values():
                queue.put_nowait(error)
        except Exception as error:
            logger.exception("reading the outputs of %s failed", self.worker_id)
            for queue in queues.values():
                queue.put_nowait(WorkerDiedError(f"lost the outputs of {self.worker_id}: {error}"))


class InProcessClient(WorkerClient):
    def __init__(self, worker: Any) -> None:
        super().__init__(worker, worker.worker_id, worker.role)

    async def _call_target(self, method: Callable[..., Any], *args: Any) -> Any:
        result = method(*args)
        if isinstance(result, Awaitable):
            result = await result
        return result

    def _outputs(self) -> AsyncIterator[list[RequestDelta | StreamError]]:
        return self.target.outputs()

    def shutdown(self) -> None:
        super().shutdown()
        self.target.shutdown()


class RayClient(WorkerClient):
    async def _call_target(self, method: Any, *args: Any) -> Any:
        import ray

        try:
            return await method.remote(*args)
        except ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}") from error

    async def _outputs(self) -> AsyncIterator[list[RequestDelta | StreamError]]:
        import ray

        try:
            async for ref in self.target.outputs.options(num_returns="streaming").remote():
                yield await ref
        except ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}") from error

    def shutdown(self) -> None:
        import ray

        super().shutdown()
        ray.kill(self.target)
