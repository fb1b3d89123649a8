"""Serving metrics computed from per-request timelines (pure Python + numpy, no I/O).

The load generator fills one ``RequestRecord`` per request; everything here is a function of
those records and the benchmark duration. Definitions follow vLLM's ``benchmark_serving``:

- **TTFT** (time to first token) = arrival of the first chunk carrying content - send time.
  A stream that completed without any text (its tokens decode to nothing printable, as a
  dummy-weight model's random tokens can; the server's ``usage`` says how many) showed its
  reader nothing until the end: its TTFT is its end-to-end latency, it has no TPOT and no
  ITL, and its tokens count like any other completed request's.
- **TPOT** (time per output token, excluding the first) = (e2e - TTFT) / (output_tokens - 1),
  one value per request; undefined for 1-token outputs, which are left out of the TPOT
  statistics (and, as in vLLM, count as TPOT 0 when checking the TPOT SLO).
- **ITL** (inter-token latency) = every gap between consecutive content chunks, pooled over
  all requests. A chunk that carries several tokens is one gap, as in vLLM.
- **E2EL** (end-to-end latency) = arrival of the stream's last byte (``[DONE]``) - send time.
- Output tokens are the server's ``usage.completion_tokens`` when reported, else the number
  of content chunks; input tokens are ``usage.prompt_tokens``, else the workload's length.
- **Goodput** = completed requests meeting every given SLO / benchmark duration.
- **SLO attainment** = requests meeting every given SLO / requests issued (failed and
  cancelled ones count as missing it): what ``--goodput-fraction`` is compared with.

Statistics are mean, median, population std and linearly interpolated percentiles
(``numpy.percentile``'s default), reported in milliseconds; an empty sample gives ``None``.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


class RequestStatus(enum.Enum):
    PENDING = "pending"  # scheduled, not finished yet
    OK = "ok"  # the stream ended with [DONE] after a content chunk or with usage's tokens
    FAILED = "failed"  # HTTP error, transport error, error event or malformed stream
    CANCELLED = "cancelled"  # cut off by the benchmark's time limit


@dataclass
class RequestRecord:
    """The timeline of one request. Times are seconds since the benchmark started.

    The workload sets ``index``, ``tag``, ``prompt_len`` and ``target_output_len``; the load
    generator sets the rest while the request runs.
    """

    index: int
    tag: str = ""
    prompt_len: int | None = None  # expected input tokens, from the workload
    target_output_len: int = 0  # max_tokens asked for
    scheduled_time: float = 0.0  # when the arrival process released it
    send_time: float | None = None  # when the HTTP request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end_time: float | None = None  # arrival of the last byte of the stream
    prompt_tokens: int | None = None  # usage.prompt_tokens
    output_tokens: int | None = None  # usage.completion_tokens
    status: RequestStatus = RequestStatus.PENDING
    error: str = ""

    def fail(self, error: str) -> None:
        self.status, self.error = RequestStatus.FAILED, error

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def num_input_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.prompt_len or 0


def ttft(record: RequestRecord) -> float:
    """Seconds from send to the first content chunk; to the end of a stream without text."""
    if not record.chunk_times:
        return e2e_latency(record)
    assert record.send_time is not None, record
    return record.chunk_times[0] - record.send_time


def e2e_latency(record: RequestRecord) -> float:
    """Seconds from send to the last byte of the stream."""
    assert record.send_time is not None and record.end_time is not None, record
    return record.end_time - record.send_time


def tpot(record: RequestRecord) -> float | None:
    """Seconds per output token after the first; ``None`` for outputs of one token and for a
    stream without text (no token's arrival was seen)."""
    num_tokens = record.num_output_tokens
    if num_tokens <= 1 or not record.chunk_times:
        return None
    return (e2e_latency(record) - ttft(record)) / (num_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    """Seconds between consecutive content chunks."""
    return [b - a for a, b in itertools.pairwise(record.chunk_times)]


@dataclass(frozen=True)
class SLOConfig:
    """Per-request latency objectives in milliseconds; ``None`` means no objective."""

    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.slo_ttft_ms, self.slo_tpot_ms, self.slo_e2el_ms))

    def is_met(self, record: RequestRecord) -> bool:
        """Whether a request completed and met every objective (all met when none is set)."""
        if record.status is not RequestStatus.OK:
            return False
        if self.slo_ttft_ms is not None and ttft(record) * 1e3 > self.slo_ttft_ms:
            return False
        if self.slo_tpot_ms is not None and (tpot(record) or 0.0) * 1e3 > self.slo_tpot_ms:
            return False
        return not (self.slo_e2el_ms is not None and e2e_latency(record) * 1e3 > self.slo_e2el_ms)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency sample, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[int, float]  # {50: p50, 90: p90, 99: p99}

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats | None:
        if not seconds:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            percentiles={p: float(np.percentile(ms, p)) for p in PERCENTILES},
        )


@dataclass(frozen=True)
class BenchMetrics:
    """Aggregates over one benchmark run; ``to_dict`` uses vLLM's result-JSON keys."""

    duration: float  # seconds
    num_issued: int
    completed: int
    failed: int
    cancelled: int
    good: int  # completed and meeting every SLO
    total_input_tokens: int
    total_output_tokens: int
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2el: LatencyStats | None

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration

    @property
    def request_goodput(self) -> float:
        return self.good / self.duration

    @property
    def output_throughput(self) -> float:
        return self.total_output_tokens / self.duration

    @property
    def total_token_throughput(self) -> float:
        return (self.total_input_tokens + self.total_output_tokens) / self.duration

    @property
    def slo_attainment(self) -> float:
        return self.good / self.num_issued if self.num_issued else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "duration": self.duration,
            "num_issued": self.num_issued,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "good_completed": self.good,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "slo_attainment": self.slo_attainment,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        }
        for name in ("ttft", "tpot", "itl", "e2el"):
            stats: LatencyStats | None = getattr(self, name)
            out[f"mean_{name}_ms"] = stats.mean if stats else None
            out[f"median_{name}_ms"] = stats.median if stats else None
            out[f"std_{name}_ms"] = stats.std if stats else None
            for p in PERCENTILES:
                out[f"p{p}_{name}_ms"] = stats.percentiles[p] if stats else None
        return out


def compute_metrics(
    records: list[RequestRecord], duration: float, slo: SLOConfig | None = None
) -> BenchMetrics:
    """Aggregate the records of one run that lasted ``duration`` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    slo = slo or SLOConfig()
    done = [r for r in records if r.status is RequestStatus.OK]
    tpots = [t for t in (tpot(r) for r in done) if t is not None]
    return BenchMetrics(
        duration=duration,
        num_issued=len(records),
        completed=len(done),
        failed=sum(r.status is RequestStatus.FAILED for r in records),
        cancelled=sum(r.status is RequestStatus.CANCELLED for r in records),
        good=sum(slo.is_met(r) for r in done),
        total_input_tokens=sum(r.num_input_tokens for r in done),
        total_output_tokens=sum(r.num_output_tokens for r in done),
        ttft=LatencyStats.of([ttft(r) for r in done]),
        tpot=LatencyStats.of(tpots),
        itl=LatencyStats.of([gap for r in done for gap in itls(r)]),
        e2el=LatencyStats.of([e2e_latency(r) for r in done]),
    )


def max_rate_meeting_slo(
    rates: list[float], attainments: list[float], goodput_fraction: float
) -> float | None:
    """The highest request rate whose SLO attainment reaches ``goodput_fraction``."""
    if len(rates) != len(attainments):
        raise ValueError(f"got {len(rates)} rates but {len(attainments)} attainments")
    passing = [r for r, a in zip(rates, attainments) if a >= goodput_fraction]
    return max(passing) if passing else None
