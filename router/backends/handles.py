"""One way to call a worker, whether it lives in this process or is a Ray actor.

``InProcessHandle`` awaits the worker's methods directly (tests, ``--transport local``);
``RayHandle`` calls the actor's methods remotely and turns a dead actor into
``WorkerDiedError``. Its streams are multiplexed: ``stream`` starts the worker-side generator
with ``start_stream`` and one reader task per handle consumes the worker's ``outputs`` (every
request's deltas, batched) and hands each delta to its request's queue, so a step of N
running requests costs one Ray message, not N.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from engine.worker import StreamError

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """The worker process is gone; its requests are lost and it must be replaced."""


class WorkerHandle:
    worker_id: str
    role: str

    async def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class InProcessHandle(WorkerHandle):
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.worker_id = worker.worker_id
        self.role = worker.role

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.worker, method)(*args)
        if hasattr(result, "__await__"):
            result = await result
        return result

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        return getattr(self.worker, method)(*args)

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayHandle(WorkerHandle):
    def __init__(self, actor: Any, worker_id: str, role: str) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.role = role
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its deltas
        self._reader: asyncio.Task | None = None

    async def call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}") from error

    async def stream(self, method: str, request_id: str, *args: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_outputs())
            await self.call("start_stream", method, request_id, *args)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, StreamError):
                    raise _rebuild(item)
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(request_id, None)

    async def _read_outputs(self) -> None:
        import ray

        try:
            async for ref in self.actor.outputs.options(num_returns="streaming").remote():
                for item in await ref:
                    queue = self._queues.get(item.request_id)
                    if queue is not None:  # else the reader went away (aborted)
                        queue.put_nowait(item)
        except ray.exceptions.RayActorError as error:
            died = WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}")
            for queue in self._queues.values():
                queue.put_nowait(died)
        except Exception as error:
            logger.exception("reading the outputs of %s failed", self.worker_id)
            for queue in self._queues.values():
                queue.put_nowait(WorkerDiedError(f"lost the outputs of {self.worker_id}: {error}"))

    def shutdown(self) -> None:
        import ray

        if self._reader is not None:
            self._reader.cancel()
        ray.kill(self.actor)


def _rebuild(error: StreamError) -> Exception:
    """The worker-side exception, as far as the backend maps it: bad input stays a
    ValueError (HTTP 400); anything else is a RuntimeError carrying the worker's message."""
    message = f"{error.kind}: {error.message}"
    return ValueError(error.message) if error.kind == "ValueError" else RuntimeError(message)
