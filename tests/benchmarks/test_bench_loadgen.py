"""The load generator (benchmarks/serving/loadgen.py) against a real streaming HTTP server.

The fake server (conftest.py) runs in this process, so its ``time.perf_counter()`` stamps
are comparable with the client's: ``result.t0 + record time`` is the client's clock.
Assertions are on counts and on causality (a chunk is received after it was sent), with
wall-clock bounds only where unavoidable, and generous.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.loadgen import arrival_offsets, run_benchmark, run_sweep
from benchmarks.serving.metrics import RequestStatus, SLOConfig, e2e_latency, itls, ttft
from benchmarks.serving.workloads import BenchRequest, WorkloadConfig, build_workload
from tests.benchmarks.fake_openai_server import MODEL, REJECTED_MAX_TOKENS, FakeServer


def config_for(server: FakeServer, **kwargs: object) -> BenchConfig:
    workload = kwargs.pop("workload", WorkloadConfig(num_prompts=4, input_len=7, output_len=5))
    return BenchConfig(base_url=server.url, workload=workload, progress=False, **kwargs)  # type: ignore[arg-type]


def test_arrival_offsets() -> None:
    rng = np.random.default_rng(0)
    assert arrival_offsets(3, math.inf, "poisson", rng) == [0.0, 0.0, 0.0]
    assert arrival_offsets(4, 8.0, "constant", rng) == [0.0, 0.125, 0.25, 0.375]
    assert arrival_offsets(0, 1.0, "poisson", rng) == []
    poisson = arrival_offsets(4001, 50.0, "poisson", np.random.default_rng(1))
    gaps = np.diff(poisson)
    assert poisson[0] == 0.0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 0.02) < 0.002  # mean gap 1/rate
    assert abs(gaps.std() - 0.02) < 0.002  # exponential: std equals the mean
    assert arrival_offsets(5, 50.0, "poisson", np.random.default_rng(1)) == poisson[:5]


def test_records_match_what_the_server_streamed(fake_server: FakeServer) -> None:
    config = config_for(fake_server)
    requests = build_workload(config.workload)
    result = run_benchmark(config, requests)
    assert result.model == MODEL  # resolved through GET /v1/models
    assert len(fake_server.served) == 4 and len(result.records) == 4
    for record in result.records:
        assert record.status is RequestStatus.OK, record.error
        served = fake_server.served_for(requests[record.index].completion_prompt())
        body = served.body
        assert body["model"] == MODEL and body["max_tokens"] == 5 and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert len(body["prompt"]) == 7
        assert (record.prompt_tokens, record.output_tokens) == (7, 5)  # from usage
        assert len(record.chunk_times) == len(served.chunk_sent_at) == 5
        # Causality on one clock: sent before received, each chunk received after it was sent.
        assert result.t0 + record.send_time <= served.received_at
        for received, sent in zip(record.chunk_times, served.chunk_sent_at):
            assert result.t0 + received >= sent
        assert record.chunk_times == sorted(record.chunk_times)
        assert record.end_time >= record.chunk_times[-1]
        # The server waits first_token_delay before the first token, then token_delay apart.
        assert ttft(record) >= fake_server.first_token_delay
        assert e2e_latency(record) >= fake_server.first_token_delay + 4 * fake_server.token_delay
        assert len(itls(record)) == 4
    m = result.metrics
    assert (m.completed, m.failed, m.total_output_tokens, m.total_input_tokens) == (4, 0, 20, 28)
    assert m.ttft is not None and m.ttft.mean >= 1e3 * fake_server.first_token_delay


def test_chunk_count_is_the_fallback_without_usage(fake_server: FakeServer) -> None:
    fake_server.send_usage = False
    result = run_benchmark(config_for(fake_server))
    for record in result.records:
        assert record.status is RequestStatus.OK
        assert record.output_tokens is None and record.prompt_tokens is None
        assert record.num_output_tokens == 5 and record.num_input_tokens == 7
    assert result.metrics.total_output_tokens == 20


def test_multi_token_chunks_count_tokens_from_usage(fake_server: FakeServer) -> None:
    fake_server.tokens_per_chunk = 2
    workload = WorkloadConfig(num_prompts=2, input_len=3, output_len=6)
    result = run_benchmark(config_for(fake_server, workload=workload))
    for record in result.records:
        assert len(record.chunk_times) == 3 and record.num_output_tokens == 6
        assert len(itls(record)) == 2
    assert result.metrics.total_output_tokens == 12


def test_max_concurrency_bounds_streams_in_flight(fake_server: FakeServer) -> None:
    workload = WorkloadConfig(num_prompts=6, input_len=3, output_len=4)
    result = run_benchmark(config_for(fake_server, workload=workload, max_concurrency=2))
    assert result.metrics.completed == 6
    assert fake_server.peak_active == 2
    # On the client's clock too: a request waiting for a slot is not "sent" yet, so its TTFT
    # does not include the wait. At most two [send, end] intervals overlap.
    events = sorted(
        [(r.send_time, 1) for r in result.records] + [(r.end_time, -1) for r in result.records]
    )
    in_flight = np.cumsum([step for _, step in events])
    assert in_flight.max() == 2


def test_constant_rate_releases_requests_on_schedule(fake_server: FakeServer) -> None:
    workload = WorkloadConfig(num_prompts=5, input_len=3, output_len=2)
    result = run_benchmark(
        config_for(fake_server, workload=workload, request_rate=20.0, arrival="constant")
    )
    assert result.metrics.completed == 5
    for i, record in enumerate(sorted(result.records, key=lambda r: r.index)):
        assert record.scheduled_time >= i * 0.05  # never early
        assert record.scheduled_time < i * 0.05 + 0.5  # generous: a loaded CI machine
    received = sorted(s.received_at for s in fake_server.served)
    assert received[-1] - result.t0 >= 4 * 0.05
    assert result.metrics.duration >= 4 * 0.05


def test_time_limit_stops_releasing_and_cancels_streams(fake_server: FakeServer) -> None:
    fake_server.token_delay = 0.05  # 40 tokens take 2 s: none finishes within the limit
    workload = WorkloadConfig(num_prompts=100, input_len=3, output_len=40)
    started = time.perf_counter()
    result = run_benchmark(
        config_for(
            fake_server, workload=workload, request_rate=50.0, arrival="constant", time_limit=0.29
        )
    )
    elapsed = time.perf_counter() - started
    # Offsets 0, 0.02, ..., 0.28 fall inside the limit: exactly 15 requests are issued.
    assert len(result.records) == 15
    assert [r.status for r in result.records] == [RequestStatus.CANCELLED] * 15
    assert result.metrics.cancelled == 15 and result.metrics.completed == 0
    assert 0.29 <= result.metrics.duration < 1.5 and elapsed < 2.0
    deadline = time.monotonic() + 5.0
    while fake_server.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake_server.active == 0  # the server saw every stream close


def test_errors_are_recorded_not_raised(fake_server: FakeServer) -> None:
    requests = [
        BenchRequest([1, 2, 3], 3, 2, tag="ok"),
        BenchRequest([4, 5], 2, REJECTED_MAX_TOKENS, tag="bad"),
    ]
    result = run_benchmark(config_for(fake_server, model="any"), requests)
    ok, bad = result.records
    assert ok.status is RequestStatus.OK
    assert bad.status is RequestStatus.FAILED and bad.error.startswith("HTTP 400")
    assert "max_tokens rejected" in bad.error
    assert (result.metrics.completed, result.metrics.failed) == (1, 1)
    assert set(result.metrics_by_tag) == {"ok", "bad"}
    assert result.metrics_by_tag["bad"].failed == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("error_event", "error event: {'message': 'engine died'"),
        ("no_done", "stream ended without [DONE]"),
        ("no_content", "stream carried no content"),
    ],
)
def test_broken_streams_fail_the_request(fake_server: FakeServer, fault: str, error: str) -> None:
    fake_server.fault = fault
    result = run_benchmark(config_for(fake_server))
    assert [r.status for r in result.records] == [RequestStatus.FAILED] * 4
    assert all(r.error.startswith(error) for r in result.records)
    assert result.metrics.failed == 4 and result.metrics.ttft is None


def test_a_stream_without_text_counts_by_its_usage(fake_server: FakeServer) -> None:
    # Tokens that decode to no text (a dummy model's random ids): the server made them and
    # says so in usage; the request completed, its reader saw nothing until the end.
    fake_server.fault = "no_text"
    fake_server.first_token_delay = 0.05
    result = run_benchmark(config_for(fake_server))
    assert [r.status for r in result.records] == [RequestStatus.OK] * 4
    assert all(not r.chunk_times and r.output_tokens == 5 for r in result.records)
    assert (result.metrics.completed, result.metrics.total_output_tokens) == (4, 20)
    assert result.metrics.ttft.median == pytest.approx(result.metrics.e2el.median)
    assert result.metrics.ttft.median >= 50
    assert result.metrics.tpot is None and result.metrics.itl is None
    fake_server.send_usage = False  # then nothing says any token was made: failed
    result = run_benchmark(config_for(fake_server))
    assert [r.error for r in result.records] == ["stream carried no content"] * 4


def test_raw_unicode_line_breaks_in_the_text_do_not_split_an_event(fake_server: FakeServer) -> None:
    fake_server.fault = "raw_line_breaks"  # U+2028 and U+0085 unescaped in each chunk's JSON
    result = run_benchmark(config_for(fake_server))
    assert [r.status for r in result.records] == [RequestStatus.OK] * 4
    assert all(len(r.chunk_times) == 5 for r in result.records)


def test_chat_endpoint_times_content_not_the_role_chunk(
    fake_server: FakeServer, tiny_tokenizer_path: Path
) -> None:
    fake_server.first_token_delay = 0.1  # sent after the role chunk
    workload = WorkloadConfig(
        workload="shared-prefix",
        tokenizer=str(tiny_tokenizer_path),
        num_system_prompts=1,
        questions_per_prompt=2,
        system_prompt_len=8,
        question_len=4,
        output_len=3,
    )
    result = run_benchmark(config_for(fake_server, workload=workload, endpoint="chat"))
    assert result.metrics.completed == 2
    for served in fake_server.served:
        assert [m["role"] for m in served.body["messages"]] == ["system", "user"]
    for record in result.records:
        assert len(record.chunk_times) == 3 and record.output_tokens == 3
        assert ttft(record) >= 0.1


def test_sweep_finds_the_highest_rate_meeting_the_slo(fake_server: FakeServer) -> None:
    # Each token takes 10 ms per concurrent stream: one stream at a time gives TPOT ~10 ms,
    # all four at once ~40 ms. The 25 ms TPOT objective separates the two rates.
    fake_server.slow_down_per_active = True
    fake_server.token_delay = 0.01
    workload = WorkloadConfig(num_prompts=4, input_len=3, output_len=6)
    config = config_for(
        fake_server, workload=workload, arrival="constant", slo=SLOConfig(slo_tpot_ms=25.0)
    )
    sweep = run_sweep(config, [4.0, math.inf])
    assert sweep.rates == [4.0, math.inf]
    low, high = sweep.runs
    assert low.metrics.slo_attainment == 1.0
    assert high.metrics.slo_attainment < 0.9
    assert sweep.max_rate == 4.0
    d = sweep.to_dict()
    assert d["rates"] == [4.0, "inf"] and d["max_rate_meeting_slo"] == 4.0
    assert pytest.approx(d["slo_attainment"][0]) == 1.0
