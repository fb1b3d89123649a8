"""PNG plots of benchmark results: latency CDFs, and goodput against request rate.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure

from benchmarks.serving.metrics import RequestRecord, RequestStatus, e2e_latency, itls, tpot, ttft
from benchmarks.serving.results import BenchResult, SweepResult


def _ttfts(records: list[RequestRecord]) -> list[float]:
    return [ttft(r) for r in records]


def _tpots(records: list[RequestRecord]) -> list[float]:
    return [t for t in (tpot(r) for r in records) if t is not None]


def _itls(records: list[RequestRecord]) -> list[float]:
    return [gap for r in records for gap in itls(r)]


def _e2els(records: list[RequestRecord]) -> list[float]:
    return [e2e_latency(r) for r in records]


# (title, samples in seconds, the SLO field that applies)
_PANELS: list[tuple[str, Callable[[list[RequestRecord]], list[float]], str | None]] = [
    ("TTFT", _ttfts, "slo_ttft_ms"),
    ("TPOT", _tpots, "slo_tpot_ms"),
    ("ITL", _itls, None),
    ("E2E latency", _e2els, "slo_e2el_ms"),
]


def plot_latency_cdfs(results: list[BenchResult], path: str) -> None:
    """One CDF panel per latency (TTFT, TPOT, ITL, E2E), one line per run, SLOs dashed."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (title, samples, slo_field) in zip(axes.flat, _PANELS):
        for result in results:
            done = [r for r in result.records if r.status is RequestStatus.OK]
            values_ms = np.sort(np.asarray(samples(done), dtype=np.float64) * 1e3)
            if values_ms.size == 0:
                continue
            fraction = np.arange(1, values_ms.size + 1) / values_ms.size
            ax.step(values_ms, fraction, where="post", label=result.title)
        slo_ms = getattr(results[0].config.slo, slo_field) if slo_field and results else None
        if slo_ms is not None:
            ax.axvline(slo_ms, color="black", linestyle="--", linewidth=1, label="SLO")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_goodput_vs_rate(sweep: SweepResult, path: str) -> None:
    """Goodput and throughput against the offered rate, and SLO attainment with the target.

    An infinite rate is drawn to the right of the largest finite one and labelled ``inf``.
    """
    rates = sweep.rates
    finite = [r for r in rates if not math.isinf(r)]
    inf_x = 1.25 * max(finite) if finite else 1.0
    xs = [inf_x if math.isinf(r) else r for r in rates]
    order = np.argsort(xs)
    xs_sorted = [xs[i] for i in order]
    runs = [sweep.runs[i] for i in order]

    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(xs_sorted, [r.metrics.request_goodput for r in runs], "o-", label="goodput")
    left.plot(xs_sorted, [r.metrics.request_throughput for r in runs], "s--", label="throughput")
    left.set_xlabel("offered request rate (req/s)")
    left.set_ylabel("requests/s")
    left.set_title("goodput vs request rate")
    right.plot(xs_sorted, [r.metrics.slo_attainment for r in runs], "o-", label="SLO attainment")
    right.axhline(sweep.goodput_fraction, color="black", linestyle="--", label="target")
    max_rate = sweep.max_rate
    if max_rate is not None:
        x = inf_x if math.isinf(max_rate) else max_rate
        right.axvline(x, color="green", linestyle=":", label=f"max rate {max_rate:g}")
    right.set_xlabel("offered request rate (req/s)")
    right.set_ylabel("fraction of requests meeting the SLOs")
    right.set_ylim(0.0, 1.05)
    right.set_title("SLO attainment vs request rate")
    labels = ["inf" if math.isinf(r) else f"{r:g}" for r in (rates[i] for i in order)]
    for ax in (left, right):
        ax.set_xticks(xs_sorted, labels)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
