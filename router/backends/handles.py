"""One way to call a worker, whether it lives in this process or is a Ray actor.

``InProcessHandle`` awaits the worker's methods directly (tests, ``--transport local``);
``RayHandle`` calls the actor's methods remotely, streams through Ray's streaming
generators, and turns a dead actor into ``WorkerDiedError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


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

    async def call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}") from error

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        import ray

        refs = getattr(self.actor, method).options(num_returns="streaming").remote(*args)
        try:
            async for ref in refs:
                yield await ref
        except ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.role} worker {self.worker_id} died: {error}") from error

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor)
