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
from engine.request import FinishReason
from engine.wire import (
    KVTransferFailedError,
    NoCapacityError,
    Reservation,
    TransferStats,
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

STATS_TIMEOUT_S = 5.0  # a worker's stats call; past it the worker is not chosen until it answers
# A worker with nothing to do (no request of the router's on it, nothing running, waiting,
# reserved or pinned) cannot change its stats by itself: it is asked only when the router has
# not heard from it for this long, not every ``stats_interval_s``. A worker on a channel
# pushes its stats at least every ``engine.channel.STATS_HEARTBEAT_S`` (2 s), so it is never
# asked while it rests; an in-process one is asked this often.
IDLE_STATS_INTERVAL_S = 3.0
# After D's stream ends, how long the router waits for P's acknowledgment of the request's KV
# transfer before it stops watching (its figures go into the KV transfer metrics).
TRANSFER_ACK_GRACE_S = 1.0


@dataclass(frozen=True)
class BackendConfig:
    """Dispatch settings (CLI flags of the same names)."""

    enable_local_prefill: bool = True
    # Uncached prompt tokens at most this, with D's unfinished local prefills: prefill on D.
    local_prefill_threshold: int = 64
    affinity_max_queue_gap: int = 4  # queued requests a prefix-affinity choice may exceed by
    admission_timeout_s: float = 30.0  # how long a request waits for KV room on D
    max_migrations: int = 3  # times a request resumes elsewhere after a worker failed it
    failover_timeout_s: float = 60.0  # how long a resumed request waits for a usable D
    stats_interval_s: float = 0.25
    health_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "admission_timeout_s",
            "failover_timeout_s",
            "stats_interval_s",
            "health_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )


@dataclass
class _InFlight:
    decode: WorkerClient
    prefill: WorkerClient | None
    worker_request_id: str  # the id of the current attempt on the workers
    prefilling: bool = True  # False once the first token is back: the prefill is done
    local_prefill_tokens: int = 0  # prefilled on D: the prompt tokens it computes


class _AttemptFailed(Exception):
    """One attempt at a request failed in a way another attempt can fix; ``worker`` is the
    client not to use again for it (None: any), ``died`` whether it is gone for everyone."""

    def __init__(self, reason: str, worker: WorkerClient | None, died: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason  # prefill_died | decode_died | kv_failed: a metric label
        self.worker = worker
        self.died = died


async def _until_failed(
    stream: AsyncIterator[RequestDelta], watch: asyncio.Future
) -> AsyncIterator[RequestDelta]:
    """``stream``'s items, until ``watch`` fails (its error is raised). Once ``watch`` has
    succeeded, the rest of the stream passes with no extra task per item."""
    iterator = aiter(stream)
    while not watch.done():
        step = asyncio.ensure_future(anext(iterator))
        try:
            await asyncio.wait((step, watch), return_when=asyncio.FIRST_COMPLETED)
            if not step.done() and watch.exception() is not None:
                watch.result()  # raises; the read is cancelled below
            await asyncio.wait((step,))
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
        try:
            item = step.result()
        except StopAsyncIteration:
            return
        yield item
    watch.result()  # raises if it failed while the last item was being read
    async for item in iterator:
        yield item


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
        self._polled_at: dict[str, float] = {}  # worker id -> when its stats last answered
        self._inflight: dict[str, _InFlight] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._health_check_now = asyncio.Event()  # set: check (and replace) workers now
        # Wakes the stats task: set by its timer when some worker's stats are due, or at
        # once when the cluster may stop resting (a request arrived, a worker joined).
        self._stats_wanted = asyncio.Event()
        self._stats_timer: asyncio.TimerHandle | None = None  # sets _stats_wanted when due
        self._stats_resting = False  # the stats task waits for an idle poll or a request
        self._refreshed_at = -float("inf")  # when refresh_stats last started
        cluster.on_join = self._schedule_stats
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
            asyncio.create_task(self._stats_loop()),
            asyncio.create_task(self._health_loop()),
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

    async def _stats_loop(self) -> None:
        """``refresh_stats`` when some worker's stats are due: while the cluster is busy, a
        worker's ``stats_interval_s`` after it last answered or pushed (at most every
        ``stats_interval_s``); a busy worker's pushes are recorded as they come
        (``_on_pushed``) and put its next refresh off, so a router whose workers keep pushing
        does not wake for their stats at all. While the cluster rests, only when an idle
        worker's poll is due (it went ``IDLE_STATS_INTERVAL_S`` without a heartbeat), or at
        once when a request arrives or a worker joins (``_schedule_stats``): an idle router wakes
        only for its workers' heartbeats, one wake-up each where a poll costs two (each
        wake-up of an idle process costs ~0.1-0.8 ms of CPU on this project's 2-core VMs,
        whose caches are cold by then)."""
        try:
            while True:
                self._stats_wanted.clear()
                self._stats_resting = self._rest_s(time.monotonic()) is not None
                self._schedule_stats()
                await self._stats_wanted.wait()
                self._stats_resting = False
                self._refreshed_at = time.monotonic()
                try:
                    await self.refresh_stats()
                except Exception:
                    logger.exception("refreshing the workers' stats failed")
        finally:
            if self._stats_timer is not None:
                self._stats_timer.cancel()

    def _on_pushed(self, worker: WorkerClient) -> None:
        """A serving worker pushed its stats (busy, or its idle heartbeat): record them now
        and put off the refresh."""
        pushed = worker.pushed_stats
        if pushed is None or not (worker in self.cluster.decode or worker in self.cluster.prefill):
            return  # retired or draining: refresh_stats no longer records it either
        self._record_stats(worker, pushed[1])
        self._schedule_stats()

    def _schedule_stats(self) -> None:
        """(Re)arm the timer that wakes the stats task: when the next worker's stats are due
        (``_stats_due_s``); while the task rests, when an idle worker's poll is due
        (``_rest_s``), or now if the cluster no longer rests (a request arrived, a worker
        joined, a push shows work). Called by the task itself and for every request, join
        and push."""
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        now = time.monotonic()
        if self._stats_resting:
            rest_s = self._rest_s(now)
            delay_s = 0.0 if rest_s is None else rest_s
        else:
            delay_s = self._stats_due_s(now)
        self._stats_timer = asyncio.get_running_loop().call_later(delay_s, self._stats_wanted.set)

    def _stats_due_s(self, now: float) -> float:
        """Seconds until ``refresh_stats`` has a worker to ask, as it decides: a busy
        worker ``stats_interval_s`` after its last answer or push, a resting one
        ``IDLE_STATS_INTERVAL_S`` after them; never sooner than ``stats_interval_s`` after
        the last refresh."""
        interval = self.config.stats_interval_s
        due = now + interval
        for worker in self.cluster.prefill + self.cluster.decode:
            heard_at = self._heard_at(worker)
            if heard_at is not None and self._resting(worker, now):
                due = min(due, heard_at + IDLE_STATS_INTERVAL_S)
                continue
            due = min(due, now if heard_at is None else heard_at + interval)
        return max(0.0, due - now, self._refreshed_at + interval - now)

    def _heard_at(self, worker: WorkerClient) -> float | None:
        """When ``worker``'s stats last came, pushed or polled; None if they never did or its
        channel has closed since."""
        if worker.connection_lost:
            return None
        pushed = worker.pushed_stats
        times = (self._polled_at.get(worker.worker_id), pushed[0] if pushed else None)
        return max((t for t in times if t is not None), default=None)

    def _rest_s(self, now: float) -> float | None:
        """While the cluster rests (no request in flight, every worker ``_resting``), the
        seconds until an idle worker's poll is due (the one heard from longest ago); else
        None."""
        if self._inflight:
            return None
        heard = []
        for worker in self.cluster.prefill + self.cluster.decode:
            heard_at = self._heard_at(worker)
            if heard_at is None or not self._resting(worker, now):
                return None
            heard.append(heard_at)
        return max(0.0, min(heard, default=now) + IDLE_STATS_INTERVAL_S - now)

    # -- requests ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        """The request's deltas; a failed attempt (a worker died, its KV did not land) is
        resumed on other workers after the tokens already yielded, at most
        ``max_migrations`` times, so the caller sees one unbroken stream."""
        request_id = request.request_id
        emitted: list[int] = []  # every token yielded so far, whichever worker made it
        excluded: set[int] = set()  # id()s of the clients that failed this request
        finished = False
        last_failure: _AttemptFailed | None = None
        for attempt in range(self.config.max_migrations + 1):
            # A fresh id per attempt: late KV or deltas of a failed one can match nothing.
            worker_request_id = request_id if attempt == 0 else f"{request_id}~{attempt}"
            decode, prefill, local_tokens = await self._pair(request, emitted, excluded, attempt)
            inflight = _InFlight(
                decode, prefill, worker_request_id, local_prefill_tokens=local_tokens
            )
            self._inflight[request_id] = inflight
            self._schedule_stats()  # the stats refresh stops resting, if it was
            # The attempt's stream is read here, not through a generator layer of its own
            # (each layer is paid again for every token); its failures become
            # ``_AttemptFailed`` naming the worker to avoid.
            stream = self._attempt(request, worker_request_id, emitted, decode, prefill)
            retry = worker_request_id != request_id
            try:
                try:
                    async for delta in stream:
                        if retry:  # its deltas carry the attempt's id: the request's, outside
                            delta = dataclasses.replace(delta, request_id=request_id)
                        emitted.extend(delta.new_token_ids)
                        finished = delta.finished
                        inflight.prefilling = False
                        yield delta
                except WorkerDiedError as error:
                    raise _AttemptFailed("decode_died", decode, died=True) from error
                except KVTransferFailedError as error:
                    raise _AttemptFailed("kv_failed", prefill) from error
                return
            except _AttemptFailed as failure:
                if failure.worker is not None:
                    excluded.add(id(failure.worker))
                    if failure.died:
                        self._worker_died(failure.worker)
                self.metrics.observe_migration(failure.reason)
                logger.warning(
                    "request %s (attempt %d, %d tokens generated) failed: %s: %s",
                    request_id,
                    attempt,
                    len(emitted),
                    failure.reason,
                    str(failure.__cause__).partition("\n")[0],
                )
                last_failure = failure
            except ValueError as error:  # a worker refused the request's input
                raise InvalidRequestError(str(error)) from error
            finally:
                self._inflight.pop(request_id, None)
                if not finished:  # the one abort owner: this request's scope
                    # Shielded and held: the caller may be cancelled while the abort is on
                    # its way. A dead worker's abort fails fast and is only logged.
                    await asyncio.shield(
                        self._spawn(self._abort_on(worker_request_id, decode, prefill))
                    )
        self.metrics.observe_migration("exhausted")
        raise BackendUnavailableError(
            f"request {request_id} failed {self.config.max_migrations + 1} times "
            f"(--max-migrations {self.config.max_migrations}); last: {last_failure.reason}"
        ) from last_failure

    async def _pair(
        self,
        request: GenerateRequest,
        emitted: list[int],
        excluded: set[int],
        attempt: int,
    ) -> tuple[WorkerClient, WorkerClient | None, int]:
        """D, and P or None (local prefill), for an attempt, and how many prompt tokens D
        prefills itself (0 when P does). A retry waits up to
        ``failover_timeout_s`` for a usable decode worker (e.g. the replacement of the only
        one) and never takes a worker that already failed this request."""
        deadline = time.monotonic() + self.config.failover_timeout_s
        while True:
            try:
                decision = self._choose(request, emitted, excluded)
                break
            except BackendUnavailableError:
                if attempt == 0 or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)
        decode = self.cluster.worker(decision.decode_id)
        prefill = None if decision.is_local else self.cluster.worker(decision.prefill_id)
        self.metrics.observe_prefill_decision(
            "local" if prefill is None else "remote", decision.reason.value
        )
        if prefill is not None:
            return decode, prefill, 0
        num_tokens = len(request.prompt_token_ids) + len(emitted)
        return decode, None, num_tokens - decision.num_cached_tokens_expected

    def _attempt(
        self,
        request: GenerateRequest,
        worker_request_id: str,
        emitted: list[int],
        decode: WorkerClient,
        prefill: WorkerClient | None,
    ) -> AsyncIterator[RequestDelta]:
        """One try on one pair of workers: D's stream (local prefill) or P's then D's."""
        resumed = list(emitted) or None
        if prefill is None:
            return decode.generate(
                worker_request_id, request.prompt_token_ids, request.sampling_params, resumed
            )
        return self._remote(request, worker_request_id, resumed, decode, prefill)

    async def _remote(
        self,
        request: GenerateRequest,
        worker_request_id: str,
        resumed: list[int] | None,
        decode: WorkerClient,
        prefill: WorkerClient,
    ) -> AsyncIterator[RequestDelta]:
        request_id = request.request_id
        reservation = await self._reserve(request, worker_request_id, resumed, decode)
        try:
            result = await prefill.prefill(
                worker_request_id,
                request.prompt_token_ids,
                request.sampling_params,
                reservation.target,
                reservation.num_skip_blocks,
                resumed,
            )
        except WorkerDiedError as error:
            raise _AttemptFailed("prefill_died", prefill, died=True) from error
        # Until P's sender is acknowledged, P's death or a failed transfer ends the attempt
        # even though D, still waiting for the KV, would only notice when the lease ends.
        transfer = asyncio.ensure_future(self._watch_transfer(prefill, worker_request_id))
        finished = False  # D sent the request's last token
        try:
            yield RequestDelta(
                request_id=request_id,
                new_token_ids=[result.first_token_id],
                new_logprobs=[result.first_logprobs] if result.first_logprobs else None,
                finish_reason=None,
                num_prompt_tokens=result.num_prompt_tokens,
                num_cached_tokens=result.num_cached_tokens,
            )
            stream = decode.decode(worker_request_id, result.first_token_id)
            cached = result.num_cached_tokens
            async for delta in _until_failed(stream, transfer):
                # Cached tokens are the prefill worker's: the prompt tokens it did not compute.
                # Copied only where D's own count differs (often equal; a copy costs ~3 us).
                if delta.num_cached_tokens != cached:
                    delta = dataclasses.replace(delta, num_cached_tokens=cached)
                finished = delta.finish_reason not in (None, FinishReason.ABORT)
                yield delta
        finally:
            if finished and not transfer.done():
                # D decoded to the end, so the KV arrived; P's acknowledgment (the transfer's
                # figures) can still be on its way when a short request ends (the consumer
                # closes this stream at the last token): wait a little for it.
                with contextlib.suppress(asyncio.TimeoutError, _AttemptFailed):
                    await asyncio.wait_for(transfer, TRANSFER_ACK_GRACE_S)
            transfer.cancel()

    async def _watch_transfer(self, prefill: WorkerClient, worker_request_id: str) -> None:
        """Resolves when P's KV for the request is acknowledged; raises ``_AttemptFailed``
        when it will never be (P died, the transfer failed)."""
        try:
            stats = await prefill.wait_transfer(worker_request_id, None)
        except WorkerDiedError as error:
            raise _AttemptFailed("prefill_died", prefill, died=True) from error
        except Exception as error:
            raise _AttemptFailed("kv_failed", prefill) from error
        self._observe_transfer(stats)

    async def _reserve(
        self,
        request: GenerateRequest,
        worker_request_id: str,
        resumed: list[int] | None,
        decode: WorkerClient,
    ) -> Reservation:
        deadline = time.monotonic() + self.config.admission_timeout_s
        delay = 0.01
        while True:
            try:
                return await decode.reserve(
                    worker_request_id, request.prompt_token_ids, request.sampling_params, resumed
                )
            except NoCapacityError as error:
                if time.monotonic() + delay > deadline:
                    raise AdmissionError(
                        f"no KV cache room for {len(request.prompt_token_ids)} prompt tokens "
                        f"within {self.config.admission_timeout_s}s: {error}"
                    ) from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _observe_transfer(self, stats: TransferStats) -> None:
        request_id = stats.request_id
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
            await self._abort_on(inflight.worker_request_id, inflight.decode, inflight.prefill)

    async def _abort_on(
        self, request_id: str, decode: WorkerClient, prefill: WorkerClient | None
    ) -> None:
        for worker in (prefill, decode):
            if worker is None:
                continue
            try:
                await worker.abort(request_id)
            except WorkerDiedError:
                logger.debug("abort of %s: %s is gone", request_id, worker.worker_id)
            except Exception as error:
                logger.warning("abort of %s on %s failed: %s", request_id, worker.worker_id, error)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- policy input, health ----------------------------------------------------------

    def _choose(
        self,
        request: GenerateRequest,
        emitted: list[int] | None = None,
        excluded: set[int] = frozenset(),
    ) -> PairingDecision:
        """The pairing for a request (resumed: after ``emitted``), among the workers with
        fresh stats and not in ``excluded`` (client ``id()``s)."""
        if self.policy is None:
            raise BackendUnavailableError("the backend has not started")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; this model's maximum "
                f"context length is {self.max_model_len}"
            )

        def usable(worker: WorkerClient) -> bool:
            return worker.worker_id in self._stats and id(worker) not in excluded

        decode_workers = [
            self._decode_snapshot(w.worker_id) for w in self.cluster.decode if usable(w)
        ]
        if not decode_workers:
            raise BackendUnavailableError("no healthy decode workers")
        prefill_workers = [
            PrefillWorkerSnapshot(w.worker_id, self._queued(w.worker_id))
            for w in self.cluster.prefill
            if usable(w)
        ]
        token_ids = request.prompt_token_ids + emitted if emitted else request.prompt_token_ids
        return self.policy.choose(token_ids, decode_workers, prefill_workers)

    def _decode_snapshot(self, worker_id: str) -> DecodeWorkerSnapshot:
        stats = self._stats[worker_id]
        # Requests sent since the last stats refresh are not in ``stats`` yet: without them, a
        # burst of requests would all go to the same worker. Count them as waiting.
        in_flight = local_prefill_tokens = 0
        for f in self._inflight.values():
            if f.decode.worker_id == worker_id:
                in_flight += 1
                if f.prefilling:
                    local_prefill_tokens += f.local_prefill_tokens
        return DecodeWorkerSnapshot(
            worker_id=stats.worker_id,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            num_running=stats.num_running,
            num_waiting=max(stats.num_waiting + stats.num_reserved, in_flight - stats.num_running),
            num_local_prefill_tokens=local_prefill_tokens,
        )

    def _queued(self, worker_id: str) -> int:
        stats = self._stats[worker_id]
        in_flight = sum(
            1
            for f in self._inflight.values()
            if f.prefilling and f.prefill is not None and f.prefill.worker_id == worker_id
        )
        return max(stats.num_waiting + stats.num_running, in_flight)

    async def refresh_stats(self, poll_all: bool = False) -> None:
        """Every worker's stats: pushed by a busy worker within ``stats_interval_s`` (see
        ``engine.channel``), else polled, each within ``STATS_TIMEOUT_S``: a worker that
        does not answer (dead, or hung) leaves the policy's input until it does, and cannot
        hold up the others' refresh. An idle worker is polled only when neither its answer
        nor its push came within ``IDLE_STATS_INTERVAL_S``; ``poll_all`` asks every worker
        now."""
        now = time.monotonic()
        due = []
        for worker in self.cluster.prefill + self.cluster.decode:
            worker.on_pushed = self._on_pushed  # later pushes are recorded as they come
            pushed = worker.pushed_stats
            if not poll_all and pushed and now - pushed[0] < self.config.stats_interval_s:
                self._record_stats(worker, pushed[1])
            elif poll_all or not self._resting(worker, now):
                due.append(worker)

        async def ask(worker: WorkerClient) -> WorkerStats:
            # The call is made inside the task: cancelled before it starts (the router
            # stopping mid-refresh), no ``stats()`` coroutine is left unawaited.
            return await asyncio.wait_for(worker.stats(), STATS_TIMEOUT_S)

        results = await asyncio.gather(*(ask(w) for w in due), return_exceptions=True)
        for worker, stats in zip(due, results):
            if isinstance(stats, BaseException):
                if isinstance(stats, asyncio.TimeoutError):
                    logger.warning("%s did not answer for its stats", worker.worker_id)
                self._stats.pop(worker.worker_id, None)
                continue
            self._polled_at[worker.worker_id] = now
            self._record_stats(worker, stats)

    def _record_stats(self, worker: WorkerClient, stats: WorkerStats) -> None:
        self._stats[worker.worker_id] = stats
        self.metrics.observe_worker(
            stats.role,
            stats.worker_id,
            stats.num_waiting,
            stats.num_running,
            stats.num_total_blocks - stats.num_free_blocks,
            stats.num_free_blocks,
        )

    def _resting(self, worker: WorkerClient, now: float) -> bool:
        """Idle by its last stats, which came (answered or pushed) less than
        ``IDLE_STATS_INTERVAL_S`` ago, and no request of the router's is on it now (a prefill
        worker's KV transfers still reading its blocks show as pinned blocks)."""
        stats = self._stats.get(worker.worker_id)
        heard_at = self._heard_at(worker)
        if stats is None or heard_at is None or now - heard_at >= IDLE_STATS_INTERVAL_S:
            return False
        if stats.num_running or stats.num_waiting or stats.num_reserved or stats.num_pinned_blocks:
            return False
        return not any(
            f.decode is worker or (f.prefilling and f.prefill is worker)
            for f in self._inflight.values()
        )

    def _worker_died(self, worker: WorkerClient) -> None:
        """A request saw ``worker`` die: stop choosing it and replace it now, not at the next
        periodic health check."""
        worker.pushed_stats = None  # its last push must not make it a candidate again
        with contextlib.suppress(KeyError):
            if self.cluster.worker(worker.worker_id) is worker:  # not replaced yet
                self._stats.pop(worker.worker_id, None)
                self._polled_at.pop(worker.worker_id, None)
        self._health_check_now.set()

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._health_check_now.wait(), self.config.health_interval_s)
            # A periodic check skips the workers whose stats came within the interval: stats
            # are answered on the engine's own thread, between steps, so one proves what the
            # health check asks (the loop thread lives and steps) and the router need not pay
            # a Ray call a worker every 5 s. After a request saw a worker die, ask them all.
            now_wanted = self._health_check_now.is_set()
            self._health_check_now.clear()
            try:
                await self._check_workers(
                    frozenset()
                    if now_wanted
                    else self._answered_within(self.config.health_interval_s)
                )
            except Exception:
                logger.exception("checking the workers failed")

    def _answered_within(self, seconds: float) -> frozenset[str]:
        """The workers whose stats were pushed or polled in the last ``seconds`` and whose
        channel is still open."""
        now = time.monotonic()
        return frozenset(
            worker.worker_id
            for worker in self.cluster.prefill + self.cluster.decode
            if (heard_at := self._heard_at(worker)) is not None and now - heard_at < seconds
        )

    async def _check_workers(self, known_alive: frozenset[str] = frozenset()) -> None:
        for worker_id in await self.cluster.replace_unhealthy(known_alive):
            self._stats.pop(worker_id, None)
            self._polled_at.pop(worker_id, None)
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
