"""Metric definitions on hand-made timelines (benchmarks/serving/metrics.py)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.serving.metrics import (
    RequestRecord,
    RequestStatus,
    SLOConfig,
    compute_metrics,
    e2e_latency,
    itls,
    max_rate_meeting_slo,
    tpot,
    ttft,
)


def record(
    send: float,
    chunks: list[float],
    end: float,
    output_tokens: int | None = None,
    prompt_tokens: int | None = None,
    prompt_len: int | None = 10,
    status: RequestStatus = RequestStatus.OK,
    index: int = 0,
    tag: str = "",
) -> RequestRecord:
    return RequestRecord(
        index=index,
        tag=tag,
        prompt_len=prompt_len,
        send_time=send,
        chunk_times=chunks,
        end_time=end,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        status=status,
    )


def test_single_request_definitions() -> None:
    r = record(1.0, [1.1, 1.15, 1.25, 1.30], 1.32, output_tokens=4)
    assert ttft(r) == pytest.approx(0.1)
    assert e2e_latency(r) == pytest.approx(0.32)
    assert tpot(r) == pytest.approx((0.32 - 0.1) / 3)
    assert itls(r) == pytest.approx([0.05, 0.1, 0.05])


def test_a_stream_without_text_waits_to_its_end() -> None:
    # No content chunk, usage says 5 tokens: the reader saw nothing before the end.
    silent = record(1.0, [], 1.5, output_tokens=5)
    assert ttft(silent) == pytest.approx(e2e_latency(silent)) == pytest.approx(0.5)
    assert tpot(silent) is None and itls(silent) == []
    metrics = compute_metrics([silent, record(0.0, [0.1, 0.2], 0.3, output_tokens=2)], 2.0)
    assert (metrics.completed, metrics.total_output_tokens) == (2, 7)
    assert metrics.tpot.median == pytest.approx(200.0)  # the other request's only
    assert not SLOConfig(slo_ttft_ms=400).is_met(silent)
    assert SLOConfig(slo_ttft_ms=600, slo_tpot_ms=1).is_met(silent)


def test_output_tokens_come_from_usage_else_chunk_count() -> None:
    # Three chunks carried six tokens (two per chunk): TPOT divides by 5, ITL has 2 gaps.
    with_usage = record(0.0, [0.2, 0.4, 0.6], 0.7, output_tokens=6)
    assert with_usage.num_output_tokens == 6
    assert tpot(with_usage) == pytest.approx((0.7 - 0.2) / 5)
    assert itls(with_usage) == pytest.approx([0.2, 0.2])
    without_usage = record(0.0, [0.2, 0.4, 0.6], 0.7)
    assert without_usage.num_output_tokens == 3
    assert tpot(without_usage) == pytest.approx((0.7 - 0.2) / 2)


def test_input_tokens_come_from_usage_else_the_workload() -> None:
    assert record(0.0, [0.1], 0.2, prompt_tokens=7, prompt_len=5).num_input_tokens == 7
    assert record(0.0, [0.1], 0.2, prompt_len=5).num_input_tokens == 5
    assert record(0.0, [0.1], 0.2, prompt_len=None).num_input_tokens == 0


def test_one_token_output_has_no_tpot_and_passes_the_tpot_slo() -> None:
    one = record(0.0, [0.05], 0.06, output_tokens=1)
    assert tpot(one) is None
    assert SLOConfig(slo_tpot_ms=1.0).is_met(one)
    assert not SLOConfig(slo_ttft_ms=40.0).is_met(one)
    metrics = compute_metrics([one], duration=1.0)
    assert metrics.tpot is None
    assert metrics.itl is None
    assert metrics.ttft is not None and metrics.ttft.mean == pytest.approx(50.0)


def five_requests() -> list[RequestRecord]:
    """TTFTs 100..500 ms; each request then streams 3 more tokens 100 ms apart (TPOT 100 ms),
    except the last, which streams them 200 ms apart (TPOT 200 ms)."""
    records = []
    for i in range(5):
        first = 0.1 * (i + 1)
        gap = 0.2 if i == 4 else 0.1
        chunks = [first + k * gap for k in range(4)]
        records.append(
            record(0.0, chunks, chunks[-1], output_tokens=4, prompt_tokens=10 + i, index=i)
        )
    return records


def test_aggregate_statistics_and_throughputs() -> None:
    records = five_requests()
    records.append(record(0.0, [], 0.0, status=RequestStatus.FAILED, index=5))
    records.append(record(0.0, [], 0.0, status=RequestStatus.CANCELLED, index=6))
    m = compute_metrics(records, duration=2.0)
    assert (m.num_issued, m.completed, m.failed, m.cancelled) == (7, 5, 1, 1)
    assert m.total_input_tokens == 10 + 11 + 12 + 13 + 14
    assert m.total_output_tokens == 20
    assert m.request_throughput == pytest.approx(2.5)
    assert m.output_throughput == pytest.approx(10.0)
    assert m.total_token_throughput == pytest.approx((60 + 20) / 2.0)
    assert m.ttft is not None and m.tpot is not None and m.itl is not None
    assert m.ttft.mean == pytest.approx(300.0)
    assert m.ttft.median == pytest.approx(300.0)
    assert m.ttft.std == pytest.approx(math.sqrt((200**2 + 100**2) * 2 / 5))
    # numpy's linear interpolation: p90 sits 60% of the way from 400 to 500.
    assert m.ttft.percentiles == pytest.approx({50: 300.0, 90: 460.0, 99: 496.0})
    assert m.tpot.mean == pytest.approx((4 * 100 + 200) / 5)
    assert m.tpot.percentiles[50] == pytest.approx(100.0)
    assert m.tpot.percentiles[90] == pytest.approx(160.0)
    # ITL pools every gap: 12 gaps of 100 ms and 3 of 200 ms.
    assert m.itl.mean == pytest.approx((12 * 100 + 3 * 200) / 15)
    assert m.itl.percentiles[99] == pytest.approx(200.0)
    assert m.e2el is not None and m.e2el.median == pytest.approx(600.0)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = five_requests()
    records.append(record(0.0, [], 0.0, status=RequestStatus.FAILED, index=5))
    # TTFT <= 350 ms keeps requests 0, 1, 2; TPOT <= 150 ms keeps 0-3: together 0, 1, 2.
    slo = SLOConfig(slo_ttft_ms=350.0, slo_tpot_ms=150.0)
    m = compute_metrics(records, duration=4.0, slo=slo)
    assert m.good == 3
    assert m.request_goodput == pytest.approx(0.75)
    assert m.slo_attainment == pytest.approx(3 / 6)
    # Only a TPOT objective: the 200 ms request misses it.
    assert compute_metrics(records, 4.0, SLOConfig(slo_tpot_ms=150.0)).good == 4
    # An end-to-end objective: E2E latencies are 400, 500, 600, 700 and 1100 ms.
    assert compute_metrics(records, 4.0, SLOConfig(slo_e2el_ms=650.0)).good == 3
    # No objective: every completed request is good.
    no_slo = compute_metrics(records, 4.0)
    assert no_slo.good == 5
    assert no_slo.slo_attainment == pytest.approx(5 / 6)


def test_to_dict_uses_vllm_keys_and_is_strict_json() -> None:
    m = compute_metrics(five_requests(), duration=2.0, slo=SLOConfig(slo_ttft_ms=250.0))
    d = m.to_dict()
    for key in (
        "duration",
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "p90_tpot_ms",
        "p50_itl_ms",
        "mean_e2el_ms",
        "p99_e2el_ms",
    ):
        assert key in d, key
    assert d["request_goodput"] == pytest.approx(1.0)
    assert d["p90_ttft_ms"] == pytest.approx(460.0)
    json.dumps(d, allow_nan=False)

    empty = compute_metrics([record(0.0, [], 0.0, status=RequestStatus.FAILED)], 1.0).to_dict()
    assert empty["mean_ttft_ms"] is None and empty["p99_itl_ms"] is None
    assert empty["completed"] == 0 and empty["failed"] == 1
    json.dumps(empty, allow_nan=False)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="slo_ttft_ms"):
        SLOConfig(slo_ttft_ms=0.0)
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], duration=0.0)
    with pytest.raises(ValueError, match="attainments"):
        max_rate_meeting_slo([1.0, 2.0], [1.0], 0.9)


def test_max_rate_meeting_slo() -> None:
    rates = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max_rate_meeting_slo(rates, [1.0, 0.95, 0.8, 0.92, 0.5], 0.9) == 8.0
    assert max_rate_meeting_slo(rates, [1.0, 0.95, 0.8, 0.92, 0.5], 0.99) == 1.0
    assert max_rate_meeting_slo(rates, [0.5] * 5, 0.9) is None
    assert max_rate_meeting_slo([math.inf, 2.0], [0.9, 1.0], 0.9) == math.inf
