"""Results of ``pdserve bench``: one run (``BenchResult``) or a rate sweep (``SweepResult``).

``to_dict`` is the result JSON. Top-level keys follow vLLM's ``benchmark_serving``
(``duration``, ``completed``, ``request_throughput``, ``request_goodput``,
``output_throughput``, ``total_token_throughput``, ``mean_ttft_ms``, ``median_tpot_ms``,
``p99_itl_ms``, ``p90_e2el_ms``, ...; per-request ``input_lens``, ``output_lens``, ``ttfts``,
``itls``, ``start_times``, ``errors`` in seconds), so existing tooling reads it; an infinite
request rate is written as the string ``"inf"``, undefined statistics as ``null``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.metrics import (
    BenchMetrics,
    RequestRecord,
    RequestStatus,
    e2e_latency,
    itls,
    max_rate_meeting_slo,
    ttft,
)


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: write it as the string "inf", like vLLM."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_json(data: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False)


@dataclass
class BenchResult:
    """One run: its config, the per-request records and the aggregate metrics."""

    config: BenchConfig
    model: str
    records: list[RequestRecord]
    metrics: BenchMetrics
    metrics_by_tag: dict[str, BenchMetrics]  # filled when the workload has several tags
    t0: float = 0.0  # time.perf_counter() at the start: record times are relative to it
    started_at: float = 0.0  # time.time() at the start

    @property
    def title(self) -> str:
        """``"<label> @ <rate> req/s"``, for tables and plot legends."""
        rate = self.config.request_rate
        prefix = f"{self.config.label} " if self.config.label else ""
        return f"{prefix}@ {'inf' if math.isinf(rate) else f'{rate:g}'} req/s"

    def to_dict(self) -> dict[str, Any]:
        """The result JSON: vLLM's keys at the top level, then per-request lists."""
        done = [r.status is RequestStatus.OK for r in self.records]
        out: dict[str, Any] = {
            "label": self.config.label,
            "date": datetime.datetime.fromtimestamp(self.started_at).strftime("%Y%m%d-%H%M%S"),
            "base_url": self.config.base_url,
            "model_id": self.model,
            "endpoint": self.config.endpoint,
            "workload": self.config.workload.workload,
            "request_rate": self.config.request_rate,
            "arrival": self.config.arrival,
            "max_concurrency": self.config.max_concurrency,
            "num_prompts": len(self.records),
            "config": dataclasses.asdict(self.config),
            **self.metrics.to_dict(),
            "metrics_by_tag": {tag: m.to_dict() for tag, m in self.metrics_by_tag.items()},
            "tags": [r.tag for r in self.records],
            "statuses": [r.status.value for r in self.records],
            "start_times": [r.send_time for r in self.records],
            "input_lens": [r.num_input_tokens for r in self.records],
            "output_lens": [r.num_output_tokens if d else 0 for r, d in zip(self.records, done)],
            "ttfts": [ttft(r) if d else None for r, d in zip(self.records, done)],
            "e2els": [e2e_latency(r) if d else None for r, d in zip(self.records, done)],
            "itls": [itls(r) if d else [] for r, d in zip(self.records, done)],
            "errors": [r.error for r in self.records],
        }
        return _json_safe(out)

    def write_json(self, path: str) -> None:
        _write_json(self.to_dict(), path)


@dataclass
class SweepResult:
    """Several runs of one workload at increasing request rates."""

    runs: list[BenchResult]
    goodput_fraction: float

    @property
    def rates(self) -> list[float]:
        return [run.config.request_rate for run in self.runs]

    @property
    def max_rate(self) -> float | None:
        """The highest rate at which ``goodput_fraction`` of the requests met the SLOs."""
        attainments = [run.metrics.slo_attainment for run in self.runs]
        return max_rate_meeting_slo(self.rates, attainments, self.goodput_fraction)

    def to_dict(self) -> dict[str, Any]:
        first = self.runs[0].config
        out = {
            "label": first.label,
            "slo": dataclasses.asdict(first.slo),
            "goodput_fraction": self.goodput_fraction,
            "rates": self.rates,
            "slo_attainment": [run.metrics.slo_attainment for run in self.runs],
            "request_goodput": [run.metrics.request_goodput for run in self.runs],
            "request_throughput": [run.metrics.request_throughput for run in self.runs],
            "max_rate_meeting_slo": self.max_rate,
            "runs": [run.to_dict() for run in self.runs],
        }
        return _json_safe(out)

    def write_json(self, path: str) -> None:
        _write_json(self.to_dict(), path)
