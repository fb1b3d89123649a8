"""The serving backend over a cluster of prefill (P) and decode (D) workers.

One request, end to end (``generate``):

1. The pairing policy picks D, and P or local prefill, from the latest worker stats.
2. Local: D prefills and decodes; its deltas are passed through.
3. Remote: D reserves blocks (``NoCapacityError``: retry with backoff until the admission
   timeout, then 429); P prefills, streams the KV into them layer by layer and returns the
   first token, which is yielded at once; D waits for the KV and streams the rest.
4. Client gone, stop string or error: ``abort`` reaches both workers, and D's lease frees
   the reservation even if this router dies first.

A background task refreshes every worker's stats (policy input, gauges) and replaces workers
that fail their health check (the cluster manager does the replacing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.outputs import RequestDelta
from engine.wire import (
    KVTransferFailedError,
    NoCapacityError,
    Reservation,
    WorkerInfo,
    WorkerStats,
)
from router.backend import (
    AdmissionError,
    BackendUnavailableError,
    GenerateRequest,
    InvalidRequestError,
)
from router.backends.clients import WorkerClient, WorkerDiedError
from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.planner_loop import PlannerLoop
from router.policy import (
    DecodeWorkerSnapshot,
    PairingDecision,
    PairingPolicy,
    PolicyConfig,
    PrefillWorkerSnapshot,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendConfig:
    """Dispatch settings (CLI flags of the same names)."""

    enable_local_prefill: bool = True
    local_prefill_threshold: int = 64  # uncached prompt tokens at most this: prefill on D
    affinity_max_queue_gap: int = 4  # queued requests a prefix-affinity choice may exceed by
    admission_timeout_s: float = 30.0  # how long a request waits for KV room on D
    stats_interval_s: float = 0.25
    health_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("admission_timeout_s", "stats_interval_s", "health_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )


@dataclass
class _InFlight:
    decode: WorkerClient
    prefill: WorkerClient | None
    prefilling: bool = True  # False once P returned the first token: P's queue is free of it


class ClusterBackend:
    def __init__(
        self,
        cluster: Cluster,
        config: BackendConfig | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config or BackendConfig()
        self.metrics = metrics or RouterMetrics()
        self.policy: PairingPolicy | None = None
        self.info: WorkerInfo | None = None
        self.model_name = cluster.config.engine.model.model
        self.max_model_len = 0
        self._stats: dict[str, WorkerStats] = {}
        self._inflight: dict[str, _InFlight] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self.planner: PlannerLoop | None = None  # --planner: started with the backend

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.cluster.start()
        self.info = await self.cluster.decode[0].info()
        self.max_model_len = self.info.max_model_len
        self.policy = PairingPolicy(
            PolicyConfig(
                block_size=self.info.block_size,
                enable_local_prefill=self.config.enable_local_prefill,
                local_prefill_threshold=self.config.local_prefill_threshold,
                affinity_max_queue_gap=self.config.affinity_max_queue_gap,
            )
        )
        await self.refresh_stats()
        self._tasks = [
            asyncio.create_task(self._every(self.config.stats_interval_s, self.refresh_stats)),
            asyncio.create_task(self._every(self.config.health_interval_s, self._check_workers)),
        ]
        if self.planner is not None:
            self._tasks.append(asyncio.create_task(self.planner.run()))

    async def shutdown(self) -> None:
        for task in self._tasks + list(self._background):
            task.cancel()
        for task in self._tasks + list(self._background):
            with contextlib.suppress(BaseException):
                await task
        await self.cluster.shutdown()

    async def _every(self, interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:
                logger.exception("background %s failed", fn.__name__)

    # -- requests ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        request_id = request.request_id
        decision = self._choose(request)
        decode = self.cluster.worker(decision.decode_id)
        prefill = None if decision.is_local else self.cluster.worker(decision.prefill_id)
        self.metrics.observe_prefill_decision(
            "local" if prefill is None else "remote", decision.reason.value
        )
        self._inflight[request_id] = _InFlight(decode, prefill)
        finished = False
        try:
            if prefill is None:
                stream = decode.generate(
                    request_id, request.prompt_token_ids, request.sampling_params
                )
            else:
                stream = self._remote(request, decode, prefill)
            async for delta in stream:
                finished = delta.finished
                yield delta
        except (WorkerDiedError, KVTransferFailedError, ValueError) as error:
            raise _as_backend_error(error) from error
        finally:
            self._inflight.pop(request_id, None)
            if not finished:  # the one abort owner: this request's scope
                # Shielded and held: the caller may be cancelled while the abort is on its way.
                await asyncio.shield(self._spawn(self._abort_on(request_id, decode, prefill)))

    async def _remote(
        self, request: GenerateRequest, decode: WorkerClient, prefill: WorkerClient
    ) -> AsyncIterator[RequestDelta]:
        request_id = request.request_id
        reservation = await self._reserve(request, decode)
        result = await prefill.prefill(
            request_id,
            request.prompt_token_ids,
            request.sampling_params,
            reservation.target,
            reservation.num_skip_blocks,
        )
        inflight = self._inflight.get(request_id)
        if inflight is not None:
            inflight.prefilling = False
        self._spawn(self._observe_transfer(prefill, request_id))
        yield RequestDelta(
            request_id=request_id,
            new_token_ids=[result.first_token_id],
            new_logprobs=[result.first_logprobs] if result.first_logprobs else None,
            finish_reason=None,
            num_prompt_tokens=result.num_prompt_tokens,
            num_cached_tokens=result.num_cached_tokens,
        )
        async for delta in decode.decode(request_id, result.first_token_id):
            # Cached tokens are the prefill worker's: the prompt tokens it did not recompute.
            yield dataclasses.replace(delta, num_cached_tokens=result.num_cached_tokens)

    async def _reserve(self, request: GenerateRequest, decode: WorkerClient) -> Reservation:
        deadline = time.monotonic() + self.config.admission_timeout_s
        delay = 0.01
        while True:
            try:
                return await decode.reserve(
                    request.request_id, request.prompt_token_ids, request.sampling_params
                )
            except NoCapacityError as error:
                if time.monotonic() + delay > deadline:
                    raise AdmissionError(
                        f"no KV cache room for {len(request.prompt_token_ids)} prompt tokens "
                        f"within {self.config.admission_timeout_s}s: {error}"
                    ) from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _observe_transfer(self, prefill: WorkerClient, request_id: str) -> None:
        try:
            stats = await prefill.wait_transfer(request_id, None)
        except Exception as error:
            logger.debug("transfer of %s not observed: %s", request_id, error)
            return
        if stats.num_bytes:
            self.metrics.observe_kv_transfer(stats.num_bytes, stats.seconds, stats.breakdown)
            if stats.breakdown is not None:
                b = stats.breakdown
                logger.debug(
                    "KV transfer of %s: %d bytes in %.1f ms (queue wait %.1f, first byte %.1f, "
                    "last byte %.1f, acknowledged %.1f, verify %.1f ms)",
                    request_id,
                    stats.num_bytes,
                    stats.seconds * 1e3,
                    b.queue_wait_s * 1e3,
                    b.first_byte_s * 1e3,
                    b.last_byte_s * 1e3,
                    b.acknowledged_s * 1e3,
                    b.verify_s * 1e3,
                )

    async def abort(self, request_id: str) -> None:
        inflight = self._inflight.get(request_id)
        if inflight is not None:
            await self._abort_on(request_id, inflight.decode, inflight.prefill)

    async def _abort_on(
        self, request_id: str, decode: WorkerClient, prefill: WorkerClient | None
    ) -> None:
        for worker in (prefill, decode):
            if worker is None:
                continue
            try:
                await worker.abort(request_id)
            except Exception as error:
                logger.warning("abort of %s on %s failed: %s", request_id, worker.worker_id, error)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- policy input, health ----------------------------------------------------------

    def _choose(self, request: GenerateRequest) -> PairingDecision:
        if self.policy is None:
            raise BackendUnavailableError("the backend has not started")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; this model's maximum "
                f"context length is {self.max_model_len}"
            )
        decode_workers = [
            self._decode_snapshot(w.worker_id)
            for w in self.cluster.decode
            if w.worker_id in self._stats
        ]
        if not decode_workers:
            raise BackendUnavailableError("no healthy decode workers")
        prefill_workers = [
            PrefillWorkerSnapshot(w.worker_id, self._queued(w.worker_id))
            for w in self.cluster.prefill
            if w.worker_id in self._stats
        ]
        return self.policy.choose(request.prompt_token_ids, decode_workers, prefill_workers)

    def _decode_snapshot(self, worker_id: str) -> DecodeWorkerSnapshot:
        stats = self._stats[worker_id]
        # Requests sent since the last stats refresh are not in ``stats`` yet: without them, a
        # burst of requests would all go to the same worker. Count them as waiting.
        in_flight = sum(1 for f in self._inflight.values() if f.decode.worker_id == worker_id)
        return DecodeWorkerSnapshot(
            worker_id=stats.worker_id,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            num_running=stats.num_running,
            num_waiting=max(stats.num_waiting + stats.num_reserved, in_flight - stats.num_running),
        )

    def _queued(self, worker_id: str) -> int:
        stats = self._stats[worker_id]
        in_flight = sum(
            1
            for f in self._inflight.values()
            if f.prefilling and f.prefill is not None and f.prefill.worker_id == worker_id
        )
        return max(stats.num_waiting + stats.num_running, in_flight)

    async def refresh_stats(self) -> None:
        workers = self.cluster.prefill + self.cluster.decode
        results = await asyncio.gather(*(w.stats() for w in workers), return_exceptions=True)
        for worker, stats in zip(workers, results):
            if isinstance(stats, BaseException):
                self._stats.pop(worker.worker_id, None)
                continue
            self._stats[worker.worker_id] = stats
            self.metrics.observe_worker(
                stats.role,
                stats.worker_id,
                stats.num_waiting,
                stats.num_running,
                stats.num_total_blocks - stats.num_free_blocks,
                stats.num_free_blocks,
            )

    async def _check_workers(self) -> None:
        for worker_id in await self.cluster.replace_unhealthy():
            self._stats.pop(worker_id, None)
            if self.policy is not None:
                self.policy.index.remove_worker(worker_id)

    async def check_health(self) -> dict[str, Any]:
        healthy = await self.cluster.health()
        if not any(healthy[w.worker_id] for w in self.cluster.decode):
            raise BackendUnavailableError("no healthy decode workers")
        return {
            "workers": healthy,
            "num_prefill": len(self.cluster.prefill),
            "num_decode": len(self.cluster.decode),
            "num_draining_prefill": sum(w.role == "prefill" for w in self.cluster.draining),
            "num_draining_decode": sum(w.role == "decode" for w in self.cluster.draining),
            "transport": self.cluster.config.kv_transfer.transport,
        }

    def worker_stats(self) -> dict[str, WorkerStats]:
        return dict(self._stats)

    # -- the planner's view and verbs (router.planner_loop) -----------------------------

    def num_in_flight(self, worker_id: str) -> int:
        """Requests in flight whose decode or prefill worker is ``worker_id``."""
        return sum(
            1
            for f in self._inflight.values()
            if f.decode.worker_id == worker_id
            or (f.prefill is not None and f.prefill.worker_id == worker_id)
        )

    def planner_load(self, role: str) -> tuple[float, float | None]:
        """The serving workers of ``role``: their queue (prefill: prompts waiting or running,
        as the pairing policy counts them; decode: requests waiting for a batch slot) and
        (decode) free KV blocks over their total; None without stats."""
        workers = [w.worker_id for w in self.cluster.workers(role) if w.worker_id in self._stats]
        if role == "prefill":
            return float(sum(self._queued(w) for w in workers)), None
        stats = [self._stats[w] for w in workers]
        total = sum(s.num_total_blocks for s in stats)
        kv_free = sum(s.num_free_blocks for s in stats) / total if total else None
        return float(sum(s.num_waiting for s in stats)), kv_free

    def forget_worker(self, worker_id: str) -> None:
        """A retired worker: out of the stats, the prefix-affinity index and the gauges."""
        stats = self._stats.pop(worker_id, None)
        if self.policy is not None:
            self.policy.index.remove_worker(worker_id)
        if stats is not None:
            self.metrics.remove_worker(stats.role, worker_id)


def _as_backend_error(error: Exception) -> Exception:
    # A dead worker, or KV that did not land in time (e.g. the reservation's lease ran out
    # while the prompt waited in a long prefill queue): 503 with Retry-After, not a 500.
    if isinstance(error, (WorkerDiedError, KVTransferFailedError)):
        return BackendUnavailableError(str(error))
    return InvalidRequestError(str(error))
