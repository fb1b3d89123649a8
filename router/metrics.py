"""Prometheus metrics of the router, all named ``pdserve_*``, in a registry per app.

Two writers: the API layer observes requests as they stream (latencies, tokens, outcomes),
and the backend reports what it sees of the cluster through ``observe_worker``,
``observe_kv_transfer`` and ``observe_prefill_decision``. The CLI creates one
``RouterMetrics`` and hands it to both; ``GET /metrics`` renders ``registry``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from engine.wire import TransferBreakdown

# Seconds. TTFT spans a cached short prompt on an idle GPU to a long prompt behind a queue.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
KV_TRANSFER_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
KV_TRANSFER_BYTES_BUCKETS = tuple(float(4**k) for k in range(6, 18))  # 4 KiB .. 16 GiB


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Arrival of the request to its first output token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Time between consecutive output tokens of one sequence.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Arrival of the request to its last output token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "pdserve_requests",
            "HTTP generation requests by endpoint and response status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.sequences_finished = Counter(
            "pdserve_sequences_finished",
            "Generated sequences (n per request) by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of served sequences.", registry=r
        )
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Tokens generated.", registry=r
        )
        self.prefix_cache_queried_tokens = Counter(
            "pdserve_prefix_cache_queried_tokens",
            "Prompt tokens looked up in a prefix cache (hit rate: hit / queried).",
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "pdserve_prefix_cache_hit_tokens",
            "Prompt tokens served from a prefix cache.",
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "pdserve_requests_in_flight", "Generation requests the router is serving.", registry=r
        )
        worker_labels = ["role", "worker_id"]
        self.worker_num_waiting = Gauge(
            "pdserve_worker_num_waiting_requests", "Queued requests.", worker_labels, registry=r
        )
        self.worker_num_running = Gauge(
            "pdserve_worker_num_running_requests", "Running requests.", worker_labels, registry=r
        )
        self.worker_kv_blocks_used = Gauge(
            "pdserve_worker_kv_blocks_used", "KV cache blocks in use.", worker_labels, registry=r
        )
        self.worker_kv_blocks_free = Gauge(
            "pdserve_worker_kv_blocks_free", "Free KV cache blocks.", worker_labels, registry=r
        )
        self.kv_transfer_bytes = Histogram(
            "pdserve_kv_transfer_bytes",
            "KV cache bytes moved from prefill to decode, per request.",
            buckets=KV_TRANSFER_BYTES_BUCKETS,
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "pdserve_kv_transfer_seconds",
            "KV cache transfer time from prefill to decode, per request.",
            buckets=KV_TRANSFER_SECONDS_BUCKETS,
            registry=r,
        )
        self.kv_transfer_phase_seconds = Histogram(
            "pdserve_kv_transfer_phase_seconds",
            "Per request, seconds from the first KV layer handed to the sender until: the "
            "sender took it (queue_wait), the first and the last write left (first_byte, "
            "last_byte), the decode worker acknowledged all (acknowledged); verify: the "
            "decode worker's checksum time.",
            ["phase"],
            buckets=KV_TRANSFER_SECONDS_BUCKETS,
            registry=r,
        )
        self.migrations = Counter(
            "pdserve_request_migrations",
            "Requests resumed on other workers, by what failed: prefill_died, decode_died, "
            "kv_failed (transfer failed, timed out or failed verification); exhausted: gave up "
            "after --max-migrations.",
            ["reason"],
            registry=r,
        )
        self.prefill_decisions = Counter(
            "pdserve_prefill_decisions",
            "Where prompts were prefilled (local: on the decode worker) and why.",
            ["decision", "reason"],
            registry=r,
        )
        # The planner's (router.planner_loop): only reported while --planner runs.
        self.planner_desired_workers = Gauge(
            "pdserve_planner_desired_workers",
            "Workers per role the planner wants.",
            ["role"],
            registry=r,
        )
        self.planner_workers = Gauge(
            "pdserve_planner_workers",
            "Workers per role by state: ready (serving), starting, draining.",
            ["role", "state"],
            registry=r,
        )
        self.planner_decisions = Counter(
            "pdserve_planner_decisions",
            "Planner decisions by role, direction (up, down, give_up) and reason.",
            ["role", "direction", "reason"],
            registry=r,
        )
        self.planner_placement_failures = Counter(
            "pdserve_planner_placement_failures",
            "Workers given up: not placed or not started within the placement timeout, or "
            "failed to start.",
            ["role"],
            registry=r,
        )
        self.planner_drain_timeouts = Counter(
            "pdserve_planner_drain_timeouts",
            "Retired workers killed with requests still in flight (they fail over).",
            ["role"],
            registry=r,
        )

    # -- written by the API layer ------------------------------------------------------

    def observe_sequence_finished(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        num_cached_tokens: int,
        num_generation_tokens: int,
        e2e_seconds: float | None,
    ) -> None:
        self.sequences_finished.labels(finish_reason=finish_reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generation_tokens)
        self.prefix_cache_queried_tokens.inc(num_prompt_tokens)
        self.prefix_cache_hit_tokens.inc(num_cached_tokens)
        if e2e_seconds is not None:
            self.e2e_latency.observe(e2e_seconds)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    # -- written by the backend --------------------------------------------------------

    def observe_worker(
        self,
        role: str,
        worker_id: str,
        num_waiting: int,
        num_running: int,
        kv_used: int,
        kv_free: int,
    ) -> None:
        """One worker's load, from its latest stats (``role``: "prefill", "decode", ...)."""
        labels = {"role": role, "worker_id": worker_id}
        self.worker_num_waiting.labels(**labels).set(num_waiting)
        self.worker_num_running.labels(**labels).set(num_running)
        self.worker_kv_blocks_used.labels(**labels).set(kv_used)
        self.worker_kv_blocks_free.labels(**labels).set(kv_free)

    def remove_worker(self, role: str, worker_id: str) -> None:
        """Drop a dead or removed worker's gauges so they stop reporting stale values."""
        for gauge in (
            self.worker_num_waiting,
            self.worker_num_running,
            self.worker_kv_blocks_used,
            self.worker_kv_blocks_free,
        ):
            with contextlib.suppress(KeyError):  # never observed
                gauge.remove(role, worker_id)

    def observe_kv_transfer(
        self, num_bytes: int, seconds: float, breakdown: TransferBreakdown | None = None
    ) -> None:
        self.kv_transfer_bytes.observe(num_bytes)
        self.kv_transfer_seconds.observe(seconds)
        if breakdown is not None:
            for phase, value in (
                ("queue_wait", breakdown.queue_wait_s),
                ("first_byte", breakdown.first_byte_s),
                ("last_byte", breakdown.last_byte_s),
                ("acknowledged", breakdown.acknowledged_s),
                ("verify", breakdown.verify_s),
            ):
                self.kv_transfer_phase_seconds.labels(phase=phase).observe(value)

    def observe_migration(self, reason: str) -> None:
        self.migrations.labels(reason=reason).inc()

    def observe_prefill_decision(self, decision: str, reason: str) -> None:
        """``decision``: "local" (prefill on the decode worker) or "remote"."""
        self.prefill_decisions.labels(decision=decision, reason=reason).inc()

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
