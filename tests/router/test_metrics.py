"""The router's Prometheus metrics: names, values and one registry per app."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from engine.wire import TransferBreakdown
from router.metrics import RouterMetrics


def _samples(metrics: RouterMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_all_names_are_prefixed() -> None:
    body, _ = RouterMetrics().render()
    families = list(text_string_to_metric_families(body.decode()))
    assert len(families) >= 15
    assert all(family.name.startswith("pdserve_") for family in families)


def test_registries_are_per_instance() -> None:
    a, b = RouterMetrics(), RouterMetrics()  # would raise "Duplicated timeseries" if shared
    a.observe_request("completions", 200)
    assert (
        _samples(a)[("pdserve_requests_total", (("endpoint", "completions"), ("status", "200")))]
        == 1
    )
    assert not any(name == "pdserve_requests_total" for name, _ in _samples(b))


def test_request_and_sequence_metrics() -> None:
    metrics = RouterMetrics()
    metrics.time_to_first_token.observe(0.03)
    metrics.inter_token_latency.observe(0.012)
    metrics.observe_sequence_finished("stop", 100, 64, 20, e2e_seconds=0.5)
    metrics.observe_sequence_finished("length", 50, 0, 16, e2e_seconds=None)
    samples = _samples(metrics)
    assert samples[("pdserve_sequences_finished_total", (("finish_reason", "stop"),))] == 1
    assert samples[("pdserve_sequences_finished_total", (("finish_reason", "length"),))] == 1
    assert samples[("pdserve_prompt_tokens_total", ())] == 150
    assert samples[("pdserve_generation_tokens_total", ())] == 36
    assert samples[("pdserve_prefix_cache_queried_tokens_total", ())] == 150
    assert samples[("pdserve_prefix_cache_hit_tokens_total", ())] == 64
    assert samples[("pdserve_e2e_request_latency_seconds_count", ())] == 1
    assert samples[("pdserve_time_to_first_token_seconds_bucket", (("le", "0.04"),))] == 1
    assert samples[("pdserve_time_to_first_token_seconds_bucket", (("le", "0.02"),))] == 0
    assert samples[("pdserve_inter_token_latency_seconds_sum", ())] == 0.012


def test_backend_reported_metrics() -> None:
    metrics = RouterMetrics()
    metrics.observe_worker("decode", "D0", num_waiting=2, num_running=5, kv_used=30, kv_free=70)
    metrics.observe_worker("prefill", "P0", num_waiting=1, num_running=1, kv_used=8, kv_free=92)
    metrics.observe_kv_transfer(3 * 1024 * 1024, 0.004)
    metrics.observe_prefill_decision("local", "short_prompt")
    metrics.observe_prefill_decision("remote", "affinity")
    metrics.observe_prefill_decision("remote", "affinity")
    samples = _samples(metrics)
    d0 = (("role", "decode"), ("worker_id", "D0"))
    assert samples[("pdserve_worker_num_waiting_requests", d0)] == 2
    assert samples[("pdserve_worker_num_running_requests", d0)] == 5
    assert samples[("pdserve_worker_kv_blocks_used", d0)] == 30
    assert samples[("pdserve_worker_kv_blocks_free", d0)] == 70
    assert (
        samples[("pdserve_worker_kv_blocks_free", (("role", "prefill"), ("worker_id", "P0")))] == 92
    )
    assert samples[("pdserve_kv_transfer_bytes_sum", ())] == 3 * 1024 * 1024
    assert samples[("pdserve_kv_transfer_bytes_bucket", (("le", "4.194304e+06"),))] == 1
    assert samples[("pdserve_kv_transfer_seconds_bucket", (("le", "0.005"),))] == 1
    remote = (("decision", "remote"), ("reason", "affinity"))
    assert samples[("pdserve_prefill_decisions_total", remote)] == 2

    metrics.remove_worker("decode", "D0")
    metrics.remove_worker("decode", "never-seen")  # no error
    samples = _samples(metrics)
    assert ("pdserve_worker_kv_blocks_free", d0) not in samples


def test_kv_transfer_breakdown_per_phase() -> None:
    metrics = RouterMetrics()
    breakdown = TransferBreakdown(
        queue_wait_s=0.001, first_byte_s=0.002, last_byte_s=0.03, acknowledged_s=0.04, verify_s=0.5
    )
    metrics.observe_kv_transfer(1 << 20, 0.04, breakdown)
    metrics.observe_kv_transfer(1 << 20, 0.05)  # a transfer without a breakdown
    samples = _samples(metrics)
    phase = "pdserve_kv_transfer_phase_seconds"
    assert samples[("pdserve_kv_transfer_seconds_count", ())] == 2
    for name, value in [("queue_wait", 0.001), ("first_byte", 0.002), ("last_byte", 0.03)]:
        assert samples[(f"{phase}_sum", (("phase", name),))] == value
        assert samples[(f"{phase}_count", (("phase", name),))] == 1
    assert samples[(f"{phase}_sum", (("phase", "acknowledged"),))] == 0.04
    assert samples[(f"{phase}_bucket", (("le", "0.25"), ("phase", "verify")))] == 0
    assert samples[(f"{phase}_bucket", (("le", "0.5"), ("phase", "verify")))] == 1
