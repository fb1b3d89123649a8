"""``pdserve bench`` flags and entry point; also ``python -m benchmarks.serving.cli``.

Flags follow vLLM's ``benchmark_serving`` where the concept is the same and are the field
names of ``BenchConfig``, ``WorkloadConfig`` and ``SLOConfig``. This module only translates
flags into configs, runs, prints a summary and writes the JSON and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from typing import Any

import httpx

from benchmarks.serving.config import ARRIVALS, ENDPOINTS, BenchConfig
from benchmarks.serving.loadgen import BenchmarkError, run_benchmark, run_sweep
from benchmarks.serving.metrics import PERCENTILES, BenchMetrics, SLOConfig
from benchmarks.serving.results import BenchResult, SweepResult
from benchmarks.serving.workloads import LENGTH_DISTS, WORKLOADS, WorkloadConfig, build_workload

logger = logging.getLogger(__name__)

_CDF_PNG = "latency_cdf.png"
_SWEEP_PNG = "goodput_vs_rate.png"


def _default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``pdserve bench`` flags on ``parser``."""
    w = WorkloadConfig
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=_default(BenchConfig, "base_url"))
    server.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    server.add_argument(
        "--endpoint", choices=tuple(ENDPOINTS), default=_default(BenchConfig, "endpoint")
    )
    server.add_argument(
        "--request-timeout", type=float, default=_default(BenchConfig, "request_timeout")
    )
    server.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (outputs may then stop before --output-len)",
    )

    load = parser.add_argument_group("workload")
    load.add_argument("--workload", choices=WORKLOADS, default=_default(w, "workload"))
    load.add_argument(
        "--num-prompts",
        type=int,
        default=_default(w, "num_prompts"),
        help="requests to send (shared-prefix sends systems x questions instead)",
    )
    load.add_argument("--input-len", type=int, default=_default(w, "input_len"))
    load.add_argument("--output-len", type=int, default=_default(w, "output_len"))
    load.add_argument("--length-dist", choices=LENGTH_DISTS, default=_default(w, "length_dist"))
    load.add_argument(
        "--range-ratio",
        type=float,
        default=_default(w, "range_ratio"),
        help="uniform: lengths in [len*(1-r), len*(1+r)]",
    )
    load.add_argument(
        "--std-ratio",
        type=float,
        default=_default(w, "std_ratio"),
        help="normal: std = r * len",
    )
    load.add_argument(
        "--vocab-size",
        type=int,
        default=_default(w, "vocab_size"),
        help="token-id prompts draw ids from [0, vocab-size)",
    )
    load.add_argument("--tokenizer", default=None, help="path: send text prompts, not token ids")
    load.add_argument("--seed", type=int, default=_default(w, "seed"))
    load.add_argument("--num-system-prompts", type=int, default=_default(w, "num_system_prompts"))
    load.add_argument(
        "--questions-per-prompt", type=int, default=_default(w, "questions_per_prompt")
    )
    load.add_argument("--system-prompt-len", type=int, default=_default(w, "system_prompt_len"))
    load.add_argument("--question-len", type=int, default=_default(w, "question_len"))
    load.add_argument("--long-prompt-len", type=int, default=_default(w, "long_prompt_len"))
    load.add_argument(
        "--long-prompt-every",
        type=int,
        default=_default(w, "long_prompt_every"),
        help="long-prompt workload: every N-th request has a long prompt",
    )
    load.add_argument("--long-output-len", type=int, default=_default(w, "long_output_len"))
    load.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    load.add_argument(
        "--corpus-path",
        default=None,
        help="a text file: prompts are windows of its tokens, not random ids (needs --tokenizer)",
    )

    rate = parser.add_argument_group("load")
    rate.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once"
    )
    rate.add_argument("--arrival", choices=ARRIVALS, default=_default(BenchConfig, "arrival"))
    rate.add_argument("--max-concurrency", type=int, default=None)
    rate.add_argument("--time-limit", type=float, default=None, help="seconds")
    rate.add_argument("--sweep-rates", default=None, help="comma-separated rates, e.g. 1,2,4,inf")

    slo = parser.add_argument_group("SLOs")
    slo.add_argument("--slo-ttft-ms", type=float, default=None)
    slo.add_argument("--slo-tpot-ms", type=float, default=None)
    slo.add_argument("--slo-e2el-ms", type=float, default=None)
    slo.add_argument(
        "--goodput-fraction",
        type=float,
        default=_default(BenchConfig, "goodput_fraction"),
        help="a sweep's rate meets the SLOs when this fraction of its requests do",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--result-json", default=None)
    out.add_argument("--plot-dir", default=None)
    out.add_argument("--label", default="")
    out.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the flags describe (``ValueError`` on a bad value)."""

    def pick(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        return {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip
        }

    return BenchConfig(
        **pick(BenchConfig, skip=("workload", "slo")),
        workload=WorkloadConfig(**pick(WorkloadConfig)),
        slo=SLOConfig(**pick(SLOConfig)),
    )


def parse_rates(text: str | None) -> list[float]:
    """``"1,2.5,inf"`` -> ``[1.0, 2.5, inf]``."""
    if not text:
        return []
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise ValueError(f"--sweep-rates must be comma-separated numbers, got {text!r}") from e
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--sweep-rates must be positive numbers, got {text!r}")
    return rates


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_summary(title: str, metrics: BenchMetrics) -> str:
    """A vLLM-style text table of one run's metrics."""
    d = metrics.to_dict()
    rows = [
        ("Successful requests:", f"{metrics.completed} of {metrics.num_issued}"),
        ("Failed / cancelled requests:", f"{metrics.failed} / {metrics.cancelled}"),
        ("Benchmark duration (s):", f"{metrics.duration:.2f}"),
        ("Total input tokens:", str(metrics.total_input_tokens)),
        ("Total generated tokens:", str(metrics.total_output_tokens)),
        ("Request throughput (req/s):", f"{metrics.request_throughput:.2f}"),
        ("Request goodput (req/s):", f"{metrics.request_goodput:.2f}"),
        ("SLO attainment:", f"{metrics.slo_attainment:.3f}"),
        ("Output token throughput (tok/s):", f"{metrics.output_throughput:.2f}"),
        ("Total token throughput (tok/s):", f"{metrics.total_token_throughput:.2f}"),
    ]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows.append((f"Mean {name} (ms):", _ms(d[f"mean_{key}_ms"])))
        rows.extend((f"P{p} {name} (ms):", _ms(d[f"p{p}_{key}_ms"])) for p in PERCENTILES)
    lines = [f"{' ' + title + ' ':=^60}"]
    lines += [f"{name:<40} {value:<10}" for name, value in rows]
    return "\n".join([*lines, "=" * 60])


def _report(result: BenchResult) -> str:
    parts = [format_summary(f"Serving benchmark {result.title}", result.metrics)]
    parts += [format_summary(f"tag {tag}", m) for tag, m in result.metrics_by_tag.items()]
    return "\n".join(parts)


def _sweep_report(sweep: SweepResult) -> str:
    lines = [f"{'rate':>8} {'throughput':>12} {'goodput':>10} {'attainment':>11}"]
    for run in sweep.runs:
        m = run.metrics
        lines.append(
            f"{run.config.request_rate:>8g} {m.request_throughput:>12.2f} "
            f"{m.request_goodput:>10.2f} {m.slo_attainment:>11.3f}"
        )
    best = sweep.max_rate
    lines.append(
        f"max rate with {sweep.goodput_fraction:.0%} of requests meeting the SLOs: "
        + ("none" if best is None else f"{best:g} req/s")
    )
    return "\n".join(lines)


def main_bench(args: argparse.Namespace) -> int:
    """Run ``pdserve bench``; 0 on success, 1 when a run completed no request or the server
    cannot be reached, 2 on bad flags."""
    try:
        config = config_from_args(args)
        rates = parse_rates(args.sweep_rates)
    except ValueError as e:
        logger.error("pdserve bench: %s", e)
        return 2
    try:
        requests = build_workload(config.workload)
        if rates:
            sweep: SweepResult | None = run_sweep(config, rates, requests)
            runs = sweep.runs
        else:
            sweep, runs = None, [run_benchmark(config, requests)]
    except (httpx.HTTPError, BenchmarkError, OSError, ValueError) as e:
        logger.error("pdserve bench against %s failed: %s", config.base_url, e)
        return 1

    for run in runs:
        print(_report(run))
    if sweep is not None:
        print(_sweep_report(sweep))
    if args.result_json:
        (sweep or runs[0]).write_json(args.result_json)
        logger.info("wrote %s", args.result_json)
    if args.plot_dir:
        from benchmarks.serving.plots import plot_goodput_vs_rate, plot_latency_cdfs

        os.makedirs(args.plot_dir, exist_ok=True)
        plot_latency_cdfs(runs, os.path.join(args.plot_dir, _CDF_PNG))
        if sweep is not None:
            plot_goodput_vs_rate(sweep, os.path.join(args.plot_dir, _SWEEP_PNG))
        logger.info("wrote plots under %s", args.plot_dir)
    return 0 if all(run.metrics.completed > 0 for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving.cli",
        description="Load-test an OpenAI-compatible server: TTFT, TPOT, ITL, goodput.",
    )
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
