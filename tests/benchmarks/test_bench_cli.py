"""``pdserve bench`` flags, JSON and plots (benchmarks/serving/cli.py, results.py, plots.py)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks.serving.cli import add_bench_arguments, config_from_args, main, parse_rates
from tests.benchmarks.fake_openai_server import MODEL, FakeServer


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_flags_map_onto_the_configs() -> None:
    config = config_from_args(
        parse(
            [
                "--base-url", "http://h:9", "--workload", "long-prompt", "--num-prompts", "7",
                "--input-len", "11", "--output-len", "12", "--length-dist", "normal",
                "--long-prompt-every", "3", "--request-rate", "2.5", "--arrival", "constant",
                "--max-concurrency", "4", "--time-limit", "30", "--slo-ttft-ms", "200",
                "--slo-tpot-ms", "50", "--goodput-fraction", "0.95", "--label", "pd",
                "--no-progress", "--no-ignore-eos", "--seed", "5", "--vocab-size", "100",
            ]
        )
    )  # fmt: skip
    assert config.base_url == "http://h:9" and config.model is None
    assert (config.request_rate, config.arrival, config.max_concurrency) == (2.5, "constant", 4)
    assert (config.time_limit, config.goodput_fraction, config.label) == (30.0, 0.95, "pd")
    assert config.progress is False and config.ignore_eos is False
    assert (config.slo.slo_ttft_ms, config.slo.slo_tpot_ms, config.slo.slo_e2el_ms) == (
        200.0,
        50.0,
        None,
    )
    w = config.workload
    assert (w.workload, w.num_prompts, w.input_len, w.output_len) == ("long-prompt", 7, 11, 12)
    assert (w.length_dist, w.long_prompt_every, w.seed, w.vocab_size) == ("normal", 3, 5, 100)

    defaults = config_from_args(parse([]))
    assert math.isinf(defaults.request_rate) and defaults.base_url == "http://127.0.0.1:8000"
    assert defaults.progress is True and defaults.ignore_eos is True


def test_parse_rates() -> None:
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    assert parse_rates(None) == []
    for bad in ("1,x", "0,1", "-2"):
        with pytest.raises(ValueError, match="sweep-rates"):
            parse_rates(bad)


def test_bad_flags_exit_2_without_contacting_a_server() -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--num-prompts", "0"]) == 2
    assert main(["--endpoint", "chat"]) == 2  # token-id prompts cannot go to chat
    assert main(["--sweep-rates", "1,fast"]) == 2


def test_unreachable_server_exits_1() -> None:
    argv = ["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--no-progress"]
    assert main([*argv, "--request-timeout", "5"]) == 1


def test_single_run_writes_json(fake_server: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = [
        "--base-url", fake_server.url, "--num-prompts", "3", "--input-len", "4",
        "--output-len", "3", "--slo-ttft-ms", "10000", "--label", "fake",
        "--result-json", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["label"] == "fake" and data["model_id"] == MODEL and data["request_rate"] == "inf"
    assert data["completed"] == 3 and data["total_output_tokens"] == 9
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert len(data["ttfts"]) == 3 and all(len(gaps) == 2 for gaps in data["itls"])
    assert data["output_lens"] == [3, 3, 3] and data["input_lens"] == [4, 4, 4]
    assert data["mean_ttft_ms"] > 0 and data["p99_itl_ms"] >= data["p50_itl_ms"]
    assert data["config"]["workload"]["num_prompts"] == 3


def test_sweep_writes_json_and_pngs(fake_server: FakeServer, tmp_path: Path) -> None:
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    argv = [
        "--base-url", fake_server.url, "--num-prompts", "3", "--input-len", "4",
        "--output-len", "3", "--sweep-rates", "inf,20", "--arrival", "constant",
        "--slo-tpot-ms", "10000", "--result-json", str(out), "--plot-dir", str(plots),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["rates"] == ["inf", 20.0] and len(data["runs"]) == 2
    assert data["slo_attainment"] == [1.0, 1.0] and data["max_rate_meeting_slo"] == "inf"
    assert [run["completed"] for run in data["runs"]] == [3, 3]
    for name in ("latency_cdf.png", "goodput_vs_rate.png"):
        png = (plots / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
