"""The planner's control loop: measure, decide (``router.planner.Planner``), scale.

Every ``interval_s`` the loop builds one ``Observation`` from what the router already
measures and applies the policy's decisions:

- **measure**: per role the serving, starting and draining workers; the queue (prefill:
  prompts waiting or running on prefill workers, as the pairing policy counts them; decode:
  requests waiting for a batch slot on decode workers); the decode workers' free KV blocks
  over their total; TTFT (prefill) and ITL (decode) at ``percentile`` over the last
  ``window_s``, from the router's own Prometheus histograms (bucket counts now minus those
  ``window_s`` ago, interpolated within the bucket as Prometheus' ``histogram_quantile``);
  prompt tokens/s over the window (logged with every decision).
- **up**: a task asks the cluster for one more worker of the role (``Cluster.add_worker``:
  an actor with the role's resources, paired, then serving). While it starts it counts as
  *starting*; when the policy says ``placement_timeout``, the loop cancels the oldest start,
  which kills its actor, and counts a placement failure.
- **down**: the worker with the fewest requests in flight (the newest among equals) is
  retired at once (``Cluster.begin_drain``: the pairing policy no longer sees it); a task
  waits until no request in flight uses it, for at most ``drain_timeout_s``, then kills it.
  Past the timeout the requests still on it see ``WorkerDiedError`` and fail over (prefill
  failover, decode migration). Never the last decode worker, never below the minimum.

Every decision is logged with its reason and measurements and counted in
``pdserve_planner_*``; the worker counts per role and state are gauges.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from router.planner import Decision, Observation, Planner, PlannerConfig, Reason, Role, RoleLoad

if TYPE_CHECKING:
    from router.backends.cluster import ClusterBackend

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.1


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative bucket counts ``[(upper bound, count), ...]`` (the
    last bound ``inf``), linear within its bucket as Prometheus' ``histogram_quantile``;
    None without samples. Past the last finite bound: that bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    counts = [count for _, count in buckets]
    i = min(bisect.bisect_left(counts, rank), len(buckets) - 1)
    upper, count = buckets[i]
    if math.isinf(upper):
        return buckets[i - 1][0] if i > 0 else None
    lower, below = buckets[i - 1] if i > 0 else (0.0, 0.0)
    if count == below:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


def _cumulative(histogram: Histogram) -> list[tuple[float, float]]:
    (family,) = histogram.collect()
    return [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]


def _total(counter: Counter) -> float:
    (family,) = counter.collect()
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


@dataclass
class _Snapshot:
    time: float
    ttft: list[tuple[float, float]]
    itl: list[tuple[float, float]]
    prompt_tokens: float


class LatencyWindow:
    """TTFT and ITL percentiles and prompt tokens/s over the last ``window_s``, from the
    router's cumulative metrics sampled once per tick."""

    def __init__(self, backend: ClusterBackend, window_s: float, percentile: float) -> None:
        self.metrics = backend.metrics
        self.window_s = window_s
        self.percentile = percentile
        self._snapshots: deque[_Snapshot] = deque()

    def sample(self, now: float) -> None:
        m = self.metrics
        self._snapshots.append(
            _Snapshot(
                now,
                _cumulative(m.time_to_first_token),
                _cumulative(m.inter_token_latency),
                _total(m.prompt_tokens),
            )
        )
        # Keep one snapshot at or before the window's start: the baseline of the difference.
        while len(self._snapshots) > 2 and self._snapshots[1].time <= now - self.window_s:
            self._snapshots.popleft()

    def _diff(self, pick: Callable[[_Snapshot], list[tuple[float, float]]]) -> float | None:
        if len(self._snapshots) < 2:
            return None
        old, new = pick(self._snapshots[0]), pick(self._snapshots[-1])
        diff = [(le, count - before) for (le, count), (_, before) in zip(new, old)]
        value = bucket_quantile(self.percentile, diff)
        return None if value is None else value * 1e3

    def ttft_ms(self) -> float | None:
        return self._diff(lambda s: s.ttft)

    def itl_ms(self) -> float | None:
        return self._diff(lambda s: s.itl)

    def prompt_tokens_per_s(self) -> float:
        if len(self._snapshots) < 2:
            return 0.0
        old, new = self._snapshots[0], self._snapshots[-1]
        return (new.prompt_tokens - old.prompt_tokens) / max(new.time - old.time, 1e-9)


class PlannerLoop:
    """Runs in the router's event loop, started with the backend (``ClusterBackend.start``)."""

    def __init__(
        self,
        config: PlannerConfig,
        backend: ClusterBackend,
        roles: tuple[Role, ...] = tuple(Role),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.backend = backend
        self.cluster = backend.cluster
        self.metrics = backend.metrics
        self.roles = roles  # --colocated: decode only
        self.planner = Planner(config)
        self.window = LatencyWindow(backend, config.window_s, config.percentile)
        self.clock = clock
        self.starting: dict[Role, list[tuple[float, asyncio.Task]]] = {r: [] for r in Role}
        self.drains: dict[str, asyncio.Task] = {}
        self.desired: dict[Role, int] = {}
        self.decisions: list[tuple[float, Decision]] = []  # every decision made, in order

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    logger.exception("planner tick failed")
                await asyncio.sleep(self.config.interval_s)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Cancel the starts and drains under way (a cancelled start kills its actor)."""
        tasks = [t for starts in self.starting.values() for _, t in starts]
        tasks += list(self.drains.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def tick(self) -> list[Decision]:
        now = self.clock()
        self.window.sample(now)
        observation = self.observe(now)
        for role in self.roles:
            self.desired.setdefault(role, self._current(observation.of(role)))
        decisions = self.planner.decide(observation, self.roles)
        for decision in decisions:
            self.apply(decision, observation, now)
        self._export(self.observe(now) if decisions else observation)
        return decisions

    # -- measure ---------------------------------------------------------------------------

    def observe(self, now: float) -> Observation:
        def load(role: Role) -> RoleLoad:
            starts = self.starting[role]
            queue, kv_free = self.backend.planner_load(role.value)
            return RoleLoad(
                ready=len(self.cluster.workers(role.value)),
                starting=len(starts),
                oldest_start_s=min(t for t, _ in starts) if starts else None,
                draining=sum(1 for w in self.cluster.draining if w.role == role.value),
                queue=queue,
                latency_ms=self.window.ttft_ms() if role is Role.PREFILL else self.window.itl_ms(),
                kv_free_fraction=kv_free,
            )

        return Observation(now, load(Role.PREFILL), load(Role.DECODE))

    @staticmethod
    def _current(load: RoleLoad) -> int:
        return load.ready + load.starting

    # -- act -------------------------------------------------------------------------------

    def apply(self, decision: Decision, observation: Observation, now: float) -> None:
        role, load = decision.role, observation.of(decision.role)
        self.decisions.append((now, decision))
        self.desired[role] = decision.desired
        direction = (
            "give_up"
            if decision.reason is Reason.PLACEMENT_TIMEOUT
            else "up"
            if decision.desired > decision.current
            else "down"
        )
        self.metrics.planner_decisions.labels(
            role=role.value, direction=direction, reason=decision.reason.value
        ).inc()
        logger.info(
            "planner: %s %s %d -> %d (%s; ready %d, starting %d, draining %d, queue %.1f, "
            "%s p%d %s ms (SLO %.0f), KV free %s, prompt tokens/s %.0f)",
            role.value,
            direction,
            decision.current,
            decision.desired,
            decision.reason.value,
            load.ready,
            load.starting,
            load.draining,
            load.queue,
            "TTFT" if role is Role.PREFILL else "ITL",
            round(self.config.percentile * 100),
            "-" if load.latency_ms is None else f"{load.latency_ms:.0f}",
            self.config.slo_ms(role),
            "-" if load.kv_free_fraction is None else f"{load.kv_free_fraction:.2f}",
            self.window.prompt_tokens_per_s(),
        )
        if direction == "give_up":
            self._give_up(role)
        elif direction == "up":
            self._grow(role, now)
        else:
            self._shrink(role)

    def _grow(self, role: Role, now: float) -> None:
        task = asyncio.create_task(self.cluster.add_worker(role.value))
        entry = (now, task)
        self.starting[role].append(entry)

        def done(task: asyncio.Task) -> None:
            with contextlib.suppress(ValueError):
                self.starting[role].remove(entry)
            if task.cancelled():
                return
            if (error := task.exception()) is not None:
                self.metrics.planner_placement_failures.labels(role=role.value).inc()
                logger.error("planner: a new %s worker failed to start: %s", role.value, error)
            else:
                logger.info("planner: %s is serving", task.result().worker_id)

        task.add_done_callback(done)

    def _give_up(self, role: Role) -> None:
        started, task = min(self.starting[role], key=lambda entry: entry[0])
        task.cancel()  # Cluster.add_worker kills the actor
        self.metrics.planner_placement_failures.labels(role=role.value).inc()
        logger.error(
            "planner: a new %s worker was not placed or started within %.0f s: given up "
            "(its actor killed); check that a node offers the role's resources",
            role.value,
            self.clock() - started,
        )

    def _shrink(self, role: Role) -> None:
        serving = self.cluster.workers(role.value)
        low, _ = self.config.bounds(role)
        if len(serving) <= max(low, 1 if role is Role.DECODE else 0):
            logger.warning("planner: no %s worker to retire (%d serving)", role.value, len(serving))
            return
        # Fewest requests in flight; among equals the newest (ids grow).
        candidates = sorted(
            enumerate(serving),
            key=lambda iw: (self.backend.num_in_flight(iw[1].worker_id), -iw[0]),
        )
        worker_id = candidates[0][1].worker_id
        self.retire(worker_id)

    def retire(self, worker_id: str) -> asyncio.Task:
        """Drain ``worker_id`` (no new requests at once), then remove it."""
        self.cluster.begin_drain(worker_id)
        self.backend.forget_worker(worker_id)
        logger.info(
            "planner: draining %s (%d request(s) in flight)",
            worker_id,
            self.backend.num_in_flight(worker_id),
        )
        task = asyncio.create_task(self._drain(worker_id))
        self.drains[worker_id] = task
        task.add_done_callback(lambda _: self.drains.pop(worker_id, None))
        return task

    async def _drain(self, worker_id: str) -> None:
        role = self.cluster.worker(worker_id).role
        deadline = self.clock() + self.config.drain_timeout_s
        try:
            while (left := self.backend.num_in_flight(worker_id)) and self.clock() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            if left:
                self.metrics.planner_drain_timeouts.labels(role=role).inc()
                logger.warning(
                    "planner: %s still has %d request(s) in flight after %.0f s: removing it, "
                    "they fail over to other workers",
                    worker_id,
                    left,
                    self.config.drain_timeout_s,
                )
        finally:  # also when the router stops
            if any(w.worker_id == worker_id for w in self.cluster.draining):
                self.cluster.remove(worker_id)
            self.backend.forget_worker(worker_id)  # stats a refresh in flight wrote since

    # -- export ----------------------------------------------------------------------------

    def _export(self, observation: Observation) -> None:
        for role in self.roles:
            load = observation.of(role)
            self.metrics.planner_desired_workers.labels(role=role.value).set(self.desired[role])
            for state, count in (
                ("ready", load.ready),
                ("starting", load.starting),
                ("draining", load.draining),
            ):
                self.metrics.planner_workers.labels(role=role.value, state=state).set(count)
