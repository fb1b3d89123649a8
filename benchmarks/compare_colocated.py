"""pdserve 1P1D (prefill and decode workers, KV over gRPC) against pdserve ``--colocated``.

Same machine, same model, same workload, one server after the other in one invocation: the
``long-prompt`` workload (short-prompt, long-output requests whose decodes are running when
every N-th request arrives with a very long prompt). Colocated, a long prefill runs in the
same engine step loop as the ongoing decodes and stalls them; disaggregated, it runs on the
prefill worker while the decode worker keeps stepping. Colocated runs with one worker (one
engine) and with two (as many workers as 1P1D). Reported as ratios to 1P1D: ITL p99 of the
short requests (colocated / 1P1D: above 1 means 1P1D's decodes stall less) and goodput at
the SLOs (1P1D / colocated: above 1 means 1P1D serves more requests within the SLOs).

After the measured run, two probes on the then idle server: one long prompt alone (its TTFT
is prefill + hand-off without queueing) and one short request alone (its ITL is one decode
step without interference).

    .venv/bin/python benchmarks/compare_colocated.py

Writes ``benchmarks/results/colocated_vs_1p1d.json`` and, per model, a latency-CDF plot and
an ITL-over-time plot (short requests' gaps, long-prompt arrivals marked) as PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from benchmarks._servers import (
    LOG_DIR,
    RESULTS_DIR,
    ServerRun,
    checkpoint_dir,
    count_parameters,
    fmt,
    format_table,
    free_port,
    machine_info,
    model_path,
    run_on_server,
    start_pdserve,
    text_workload,
)
from benchmarks.serving.config import BenchConfig
from benchmarks.serving.metrics import RequestRecord, RequestStatus, SLOConfig, itls
from benchmarks.serving.plots import plot_latency_cdfs
from benchmarks.serving.results import BenchResult
from benchmarks.serving.workloads import WorkloadConfig

logger = logging.getLogger(__name__)

# mode -> start_pdserve arguments: 1P1D; colocated with one worker (one engine, like a plain
# single-engine server) and with two (as many workers as 1P1D: the equal-resources baseline).
MODES: dict[str, dict[str, Any]] = {
    "1p1d": {"colocated": False, "num_prefill": 1, "num_decode": 1},
    "colocated": {"colocated": True, "num_decode": 1},
    "colocated-x2": {"colocated": True, "num_decode": 2},
}
# Per-model load and SLOs, scaled to what one core of this 2-core machine does with each
# model: the dummy model prefills 1024 tokens in about 2.5 s and decodes a small batch in
# about 80 ms a step; pdserve-tiny in about 40 ms and 6 ms.
PRESETS: dict[str, dict[str, float]] = {
    # SmolLM2-135M (real weights, real-text prompts): about 30 layers of width 576, so a
    # prefill and a decode step cost about what the dummy model's do.
    "smollm2": {
        "request_rate": 0.75,
        "slo_ttft_ms": 4000.0,
        "slo_tpot_ms": 150.0,
        "stall_ms": 1000.0,
    },
    "dummy-100m": {
        "request_rate": 0.75,
        "slo_ttft_ms": 4000.0,
        "slo_tpot_ms": 150.0,
        "stall_ms": 1000.0,  # a short request's inter-token gap above this is a stall
    },
    "tiny": {"request_rate": 4.0, "slo_ttft_ms": 500.0, "slo_tpot_ms": 25.0, "stall_ms": 100.0},
}


def build_benches(
    args: argparse.Namespace, preset: dict[str, float], text: dict[str, str] | None = None
) -> tuple[list[BenchConfig], tuple[BenchConfig, ...]]:
    """The measured run and the two probes; and the warm-up (a short and a long prompt,
    so that both paths, and the KV channel, are up before anything is timed). ``text``:
    real-text prompts (``_servers.text_workload``)."""
    long_prompt = {
        "long_prompt_len": args.long_prompt_len,
        "long_output_len": args.long_output_len,
        "vocab_size": args.vocab_size,
        **(text or {}),
    }
    workload = WorkloadConfig(
        workload="long-prompt",
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        long_prompt_every=args.long_prompt_every,
        seed=args.seed,
        **long_prompt,
    )
    slo = SLOConfig(
        slo_ttft_ms=args.slo_ttft_ms or preset["slo_ttft_ms"],
        slo_tpot_ms=args.slo_tpot_ms or preset["slo_tpot_ms"],
    )
    rate = args.request_rate or preset["request_rate"]
    main = BenchConfig(workload=workload, request_rate=rate, slo=slo, progress=False)
    alone_long = WorkloadConfig(
        workload="long-prompt",
        num_prompts=1,
        long_prompt_every=1,
        seed=args.seed + 2,
        **long_prompt,
    )
    alone_short = WorkloadConfig(
        num_prompts=1,
        input_len=args.input_len,
        output_len=args.output_len,
        vocab_size=args.vocab_size,
        seed=args.seed + 3,
        **(text or {}),
    )
    probes = [BenchConfig(workload=w, slo=slo, progress=False) for w in (alone_long, alone_short)]
    warmup = WorkloadConfig(
        workload="long-prompt",
        num_prompts=2,
        input_len=args.input_len,
        output_len=4,
        long_prompt_every=2,
        seed=args.seed + 1,
        **{**long_prompt, "long_output_len": 2},
    )
    return [main, *probes], (BenchConfig(workload=warmup, request_rate=1.0),)


def _ok(result: BenchResult, tag: str) -> list[RequestRecord]:
    return [r for r in result.records if r.tag == tag and r.status is RequestStatus.OK]


def summary(run: ServerRun, stall_ms: float) -> dict[str, Any]:
    """The figures the comparison quotes, from one server's run."""
    if len(run.results) < 3:
        return {"error": run.error or "the server did not run every benchmark"}
    result, alone_long, alone_short = run.results
    m = result.metrics.to_dict()
    short = result.metrics_by_tag["short"].to_dict()
    long = result.metrics_by_tag["long"].to_dict()
    short_gaps = [g for r in _ok(result, "short") for g in itls(r)]
    return {
        "completed": m["completed"],
        "failed": m["failed"],
        "duration_s": m["duration"],
        "request_throughput": m["request_throughput"],
        "output_throughput": m["output_throughput"],
        "request_goodput": m["request_goodput"],
        "slo_attainment": m["slo_attainment"],
        "short_p50_itl_ms": short["median_itl_ms"],
        "short_p99_itl_ms": short["p99_itl_ms"],
        "short_max_itl_ms": 1e3 * max(short_gaps, default=0.0),
        "short_num_stalls": sum(g * 1e3 > stall_ms for g in short_gaps),
        "short_p99_tpot_ms": short["p99_tpot_ms"],
        "short_p99_ttft_ms": short["p99_ttft_ms"],
        "long_p50_ttft_ms": long["median_ttft_ms"],
        "p99_itl_ms": m["p99_itl_ms"],
        "alone_long_ttft_ms": alone_long.metrics.to_dict()["mean_ttft_ms"],
        "alone_short_itl_ms": alone_short.metrics.to_dict()["median_itl_ms"],
        "server_cpu_s": run.server_cpu_s[0],
        "server_cpu_ms_per_output_token": 1e3
        * run.server_cpu_s[0]
        / max(1, result.metrics.total_output_tokens),
        "load_avg_after": run.load_avg[0],
        "startup_s": run.startup_s,
        "error": run.error,
    }


def ratios(by_mode: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each colocated mode against 1P1D: latencies colocated / 1P1D and rates 1P1D /
    colocated, so above 1 always means 1P1D is better."""

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or not den else num / den

    d = by_mode.get("1p1d", {})
    out: dict[str, float | None] = {}
    for mode, c in by_mode.items():
        if mode == "1p1d":
            continue
        out[f"short_p99_itl_{mode}_over_1p1d"] = ratio(
            c.get("short_p99_itl_ms"), d.get("short_p99_itl_ms")
        )
        out[f"goodput_1p1d_over_{mode}"] = ratio(d.get("request_goodput"), c.get("request_goodput"))
        out[f"throughput_1p1d_over_{mode}"] = ratio(
            d.get("output_throughput"), c.get("output_throughput")
        )
        out[f"cpu_per_token_{mode}_over_1p1d"] = ratio(
            c.get("server_cpu_ms_per_output_token"), d.get("server_cpu_ms_per_output_token")
        )
    return out


_COLUMNS = [
    ("ITL p50 short (ms)", "short_p50_itl_ms", 1),
    ("ITL p99 short (ms)", "short_p99_itl_ms", 1),
    ("ITL max short (ms)", "short_max_itl_ms", 0),
    ("stalls", "short_num_stalls", 0),
    ("TPOT p99 short (ms)", "short_p99_tpot_ms", 1),
    ("TTFT p99 short (ms)", "short_p99_ttft_ms", 0),
    ("TTFT p50 long (ms)", "long_p50_ttft_ms", 0),
    ("goodput (req/s)", "request_goodput", 3),
    ("SLO met", "slo_attainment", 2),
    ("out tok/s", "output_throughput", 1),
    ("server CPU ms/out tok", "server_cpu_ms_per_output_token", 1),
    ("idle: long TTFT (ms)", "alone_long_ttft_ms", 0),
    ("idle: ITL (ms)", "alone_short_itl_ms", 1),
]


def table(model: str, by_mode: dict[str, dict[str, Any]]) -> str:
    header = ["model", "mode", *(name for name, _, _ in _COLUMNS)]
    rows = []
    for mode, s in by_mode.items():
        if "completed" not in s:
            rows.append([model, mode, f"failed: {s['error']}"] + [""] * (len(_COLUMNS) - 1))
            continue
        rows.append([model, mode, *(fmt(s[key], digits) for _, key, digits in _COLUMNS)])
    return format_table(header, rows)


def plot_itl_timeline(results: dict[str, BenchResult], path: Path) -> None:
    """Each short request's inter-token gaps against time, long-prompt arrivals dashed."""
    fig = Figure(figsize=(12, 3.2 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 1, squeeze=False, sharex=True, sharey=True)[:, 0]
    for ax, (mode, result) in zip(axes, results.items()):
        for record in _ok(result, "short"):
            gaps_ms = [g * 1e3 for g in itls(record)]
            ax.plot(record.chunk_times[1:], gaps_ms, ".", markersize=3, color="tab:blue")
        for record in result.records:
            if record.tag == "long" and record.send_time is not None:
                ax.axvline(record.send_time, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_title(f"{mode}: short requests' inter-token gaps (red: a long prompt arrives)")
        ax.set_ylabel("ITL (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("time since the start (s)")
    fig.savefig(path, dpi=100)


def compare_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run every mode on one model; returns its section of the report."""
    model = model_path(name)
    benches, warmups = build_benches(args, PRESETS[name], text_workload(name))
    by_mode: dict[str, dict[str, Any]] = {}
    results: dict[str, BenchResult] = {}
    for mode in args.modes.split(","):
        log = LOG_DIR / f"colocated_vs_1p1d_{name}_{mode}.log"
        server = start_pdserve(free_port(), log, model=model, **MODES[mode])
        labelled = [dataclasses.replace(b, label=f"{name} {mode}") for b in benches]
        run = run_on_server(server, labelled, warmups, args.ready_timeout_s)
        by_mode[mode] = summary(run, PRESETS[name]["stall_ms"])
        if run.results:
            results[mode] = run.results[0]
    if results:
        prefix = args.out_dir / f"colocated_vs_1p1d_{name}"
        plot_latency_cdfs(list(results.values()), f"{prefix}_cdf.png")
        plot_itl_timeline(results, Path(f"{prefix}_itl.png"))
    return {
        "model": model,
        "num_parameters": count_parameters(checkpoint_dir(name)),
        "request_rate": benches[0].request_rate,
        "slo": dataclasses.asdict(benches[0].slo),
        "stall_ms": PRESETS[name]["stall_ms"],
        "summary": by_mode,
        "ratios": ratios(by_mode),
        "runs": {mode: r.to_dict() for mode, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="smollm2,dummy-100m,tiny", help="of smollm2, dummy-100m, tiny"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--long-prompt-len", type=int, default=1024)
    parser.add_argument("--long-prompt-every", type=int, default=4)
    parser.add_argument("--long-output-len", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--request-rate", type=float, default=None, help="default: per model")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="default: per model")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="default: per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: use {', '.join(MODES)}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    flags = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/compare_colocated.py", *flags]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "models": {},
    }
    texts = []
    for name in args.models.split(","):
        section = compare_model(name, args)
        report["models"][name] = section
        ratio_text = "\n".join(f"  {k} = {fmt(v, 2)}" for k, v in section["ratios"].items())
        texts += [table(name, section["summary"]), f"ratios ({name}):\n{ratio_text}"]

    out = args.out_dir / "colocated_vs_1p1d.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print("\n\n".join(texts))
    print(f"wrote {out}")
    complete = all(
        "completed" in s for m in report["models"].values() for s in m["summary"].values()
    )
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
