"""The planner loop's measurements (windowed percentiles from the router's histograms) and
the ``--planner`` flags. The loop acting on a real cluster is in tests/serving/test_planner.py."""

from __future__ import annotations

import math

import pytest

from router.cli import build_parser, main
from router.metrics import RouterMetrics
from router.planner import PlannerConfig
from router.planner_loop import LatencyWindow, bucket_quantile
from router.serve import planner_config_from_args

INF = math.inf


def test_bucket_quantile_interpolates_within_the_bucket() -> None:
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (INF, 20.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.2)  # rank 10: top of (0.1, 0.2]
    assert bucket_quantile(0.75, buckets) == pytest.approx(0.3)  # rank 15: half of (0.2, 0.4]
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.15)
    assert bucket_quantile(0.9, [(1.0, 0.0), (INF, 0.0)]) is None
    assert bucket_quantile(0.9, [(1.0, 1.0), (INF, 5.0)]) == 1.0  # past the last bound


class FakeBackend:
    """What ``LatencyWindow`` reads of the backend: its metrics."""

    def __init__(self) -> None:
        self.metrics = RouterMetrics()


def test_the_window_forgets_samples_older_than_window_s() -> None:
    backend = FakeBackend()
    window = LatencyWindow(backend, window_s=10.0, percentile=0.9)  # type: ignore[arg-type]
    window.sample(0.0)
    assert window.ttft_ms() is None and window.itl_ms() is None
    for _ in range(10):
        backend.metrics.time_to_first_token.observe(3.0)  # slow: (2.5, 5.0]
    backend.metrics.prompt_tokens.inc(1000)
    window.sample(5.0)
    assert 2500 < window.ttft_ms() <= 5000
    assert window.prompt_tokens_per_s() == pytest.approx(200.0)
    for _ in range(100):
        backend.metrics.time_to_first_token.observe(0.03)  # fast: (0.025, 0.04]... bucket 0.04
        backend.metrics.inter_token_latency.observe(0.012)
    window.sample(12.0)
    # The baseline is the sample at 5.0 (the newest at or before 12 - 10): the slow ones left.
    assert 20 < window.ttft_ms() <= 40
    assert 10 < window.itl_ms() <= 15
    window.sample(30.0)  # nothing new in the last 10 s
    assert window.ttft_ms() is None and window.prompt_tokens_per_s() == 0.0


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_planner_flags_are_the_config_fields() -> None:
    assert planner_config_from_args(serve_args()) is None  # off by default
    argv = ["--planner", "--slo-ttft-ms", "500", "--max-prefill", "3"]
    argv += ["--planner-cooldown-s", "5", "--planner-drain-timeout-s", "9"]
    config = planner_config_from_args(serve_args(*argv))
    assert config == PlannerConfig(slo_ttft_ms=500, max_prefill=3, cooldown_s=5, drain_timeout_s=9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-prefill", "3", "--max-prefill", "2"], "--num-prefill 3 is outside"),
        (["--num-decode", "1", "--min-decode", "2"], "--num-decode 1 is outside"),
        (["--min-prefill", "3", "--max-prefill", "2"], "min_prefill <= max_prefill"),
        (["--slo-itl-ms", "-5"], "slo_itl_ms must be positive, got -5"),
        (["--planner-percentile", "1.5"], "percentile must be in"),
    ],
)
def test_bad_planner_flags_are_refused_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=message):
        planner_config_from_args(serve_args("--planner", *argv))
    assert main(["serve", "--planner", *argv]) == 2
    assert message.split(" is ")[0] in capsys.readouterr().err
