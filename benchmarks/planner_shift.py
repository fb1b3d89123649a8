"""The planner under a shifting load mix, against a fixed 1P1D, side by side in one run.

One workload, three phases, sent open loop (Poisson arrivals) to each server in turn:

1. ``prompt-heavy``: long prompts (``--long-prompt-tokens``), short answers;
2. ``decode-heavy``: short prompts (prefilled on the decode worker), long answers;
3. ``idle``: no requests; the planner should return to its minimum.

Each server is ``pdserve serve`` on pdserve-tiny (CPU): ``fixed`` is 1P1D, ``planner`` is
1P1D with ``--planner`` between 1 and ``--max-workers`` per role, its SLOs the benchmark's.
Per phase: SLO attainment (completed requests meeting TTFT <= ``--slo-ttft-ms`` and TPOT <=
``--slo-itl-ms``, over requests issued) and goodput (such requests per second). ``/health``
is sampled every 0.5 s for the workers per role, and the load (requests in flight) is
recorded with it; the plot shows both over time per server.

    .venv/bin/python -m benchmarks.planner_shift --phase-s 60

Writes ``benchmarks/results/planner_shift.json`` and ``planner_shift.png``. On a machine with
fewer cores than workers, more workers add no compute: see ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._servers import (
    LOG_DIR,
    RESULTS_DIR,
    free_port,
    machine_info,
    start_pdserve,
    stop_server,
    wait_ready,
)
from benchmarks.serving.loadgen import build_payload, send_request
from benchmarks.serving.metrics import RequestRecord, RequestStatus, SLOConfig, tpot, ttft
from benchmarks.serving.workloads import BenchRequest, PromptMaker

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 0.5
VOCAB_SIZE = 2048  # pdserve-tiny's


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second (Poisson); 0: idle
    prompt_tokens: int
    output_tokens: int


@dataclass
class Sample:
    time: float  # seconds since the workload started
    phase: str
    in_flight: int
    num_prefill: int
    num_decode: int
    num_draining: int
    num_starting: int  # the planner's pdserve_planner_workers{state="starting"}


@dataclass
class Run:
    name: str
    args: list[str]
    startup_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    phases: dict[str, dict] = field(default_factory=dict)
    planner_metrics: list[str] = field(default_factory=list)  # /metrics at the end
    phase_starts: dict[str, float] = field(default_factory=dict)  # seconds, as sent


def phase_summary(records: list[RequestRecord], duration_s: float, slo: SLOConfig) -> dict:
    done = [r for r in records if r.status is RequestStatus.OK]
    good = sum(slo.is_met(r) for r in done)
    ttfts = [ttft(r) * 1e3 for r in done]
    tpots = [t * 1e3 for t in (tpot(r) for r in done) if t is not None]

    def pct(values: list[float], q: int) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {
        "issued": len(records),
        "completed": len(done),
        "failed": sum(r.status is RequestStatus.FAILED for r in records),
        "errors": sorted({r.error[:200] for r in records if r.error})[:3],
        "slo_attainment": good / len(records) if records else None,
        "goodput_rps": good / duration_s,
        "ttft_ms": {"p50": pct(ttfts, 50), "p90": pct(ttfts, 90)},
        "tpot_ms": {"p50": pct(tpots, 50), "p90": pct(tpots, 90)},
    }


async def drive(base_url: str, phases: list[Phase], slo: SLOConfig, seed: int, run: Run) -> None:
    rng = np.random.default_rng(seed)
    prompts = PromptMaker(rng, VOCAB_SIZE)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        in_flight = 0
        current = phases[0].name
        stop = asyncio.Event()

        async def sample_health() -> None:
            while not stop.is_set():
                body = (await client.get("/health")).json()
                metrics = (await client.get("/metrics")).text
                starting = sum(
                    sample.value
                    for family in text_string_to_metric_families(metrics)
                    for sample in family.samples
                    if sample.name == "pdserve_planner_workers"
                    and sample.labels.get("state") == "starting"
                )
                run.samples.append(
                    Sample(
                        time.perf_counter() - t0,
                        current,
                        in_flight,
                        body.get("num_prefill", 0),
                        body.get("num_decode", 0),
                        body.get("num_draining_prefill", 0) + body.get("num_draining_decode", 0),
                        int(starting),
                    )
                )
                await asyncio.sleep(HEALTH_INTERVAL_S)

        async def one(payload: dict, record: RequestRecord) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                await send_request(client, "completions", payload, record, t0)
            finally:
                in_flight -= 1

        sampler = asyncio.create_task(sample_health())
        index = 0
        for phase in phases:
            current = phase.name
            start = time.perf_counter() - t0
            run.phase_starts[phase.name] = start
            records: list[RequestRecord] = []
            tasks = []
            offset = 0.0
            while phase.rate > 0:
                offset += float(rng.exponential(1.0 / phase.rate))
                if offset >= phase.duration_s:
                    break
                await asyncio.sleep(max(0.0, start + offset - (time.perf_counter() - t0)))
                prompt, prompt_len = prompts.make(phase.prompt_tokens)
                request = BenchRequest(prompt, prompt_len, phase.output_tokens, tag=phase.name)
                payload = build_payload(request, "completions", "pdserve-tiny", ignore_eos=True)
                record = RequestRecord(index, phase.name, prompt_len, phase.output_tokens)
                index += 1
                records.append(record)
                tasks.append(asyncio.create_task(one(payload, record)))
            await asyncio.sleep(max(0.0, start + phase.duration_s - (time.perf_counter() - t0)))
            await asyncio.gather(*tasks)  # a phase's requests finish before the next starts
            elapsed = time.perf_counter() - t0 - start
            if records:
                run.phases[phase.name] = phase_summary(records, elapsed, slo)
                logger.info("%s %s: %s", run.name, phase.name, run.phases[phase.name])
        stop.set()
        await sampler


def run_server(name: str, extra: list[str], phases: list[Phase], args: argparse.Namespace) -> Run:
    run = Run(name, extra)
    log_path = LOG_DIR / f"planner_shift_{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    engine = ["--max-num-seqs", str(args.max_num_seqs)]
    server = start_pdserve(free_port(), log_path, extra_args=tuple(engine + extra))
    try:
        run.startup_s = wait_ready(server, timeout_s=300.0)
        slo = SLOConfig(slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_itl_ms)
        asyncio.run(drive(server.base_url, phases, slo, args.seed, run))
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        run.planner_metrics = [
            line for line in metrics.splitlines() if line.startswith("pdserve_planner_")
        ]
    finally:
        stop_server(server)
    return run


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), sharex=True)
    for ax, run in zip(np.atleast_1d(axes), runs):
        t = [s.time for s in run.samples]
        ax.step(t, [s.num_prefill for s in run.samples], where="post", label="prefill workers")
        ax.step(t, [s.num_decode for s in run.samples], where="post", label="decode workers")
        ax.step(t, [s.num_draining for s in run.samples], where="post", ls=":", label="draining")
        ax.step(t, [s.num_starting for s in run.samples], where="post", ls="--", label="starting")
        ax.set_ylabel("workers")
        ax.set_ylim(0, max(3, *(s.num_prefill + s.num_decode for s in run.samples)))
        load = ax.twinx()
        load.plot(t, [s.in_flight for s in run.samples], color="grey", alpha=0.5)
        load.set_ylabel("requests in flight", color="grey")
        for name, start in run.phase_starts.items():
            ax.axvline(start, color="black", lw=0.5)
            ax.text(start + 1, ax.get_ylim()[1] * 0.92, name, fontsize=8)
        ax.set_title(run.name)
        ax.legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel(
        "seconds (a phase starts when the previous one's requests have all finished)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--idle-s", type=float, default=40.0)
    parser.add_argument("--long-prompt-tokens", type=int, default=1024)
    parser.add_argument("--prompt-rate", type=float, default=2.0)
    parser.add_argument("--decode-rate", type=float, default=2.0)
    parser.add_argument("--decode-output-tokens", type=int, default=128)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-itl-ms", type=float, default=100.0)
    parser.add_argument("--max-workers", type=int, default=2, help="per role, with --planner")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "planner_shift.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    phases = [
        Phase("prompt-heavy", args.phase_s, args.prompt_rate, args.long_prompt_tokens, 4),
        Phase("decode-heavy", args.phase_s, args.decode_rate, 16, args.decode_output_tokens),
        Phase("idle", args.idle_s, 0.0, 0, 0),
    ]
    planner = [
        "--planner",
        "--slo-ttft-ms", str(args.slo_ttft_ms),
        "--slo-itl-ms", str(args.slo_itl_ms),
        "--max-prefill", str(args.max_workers),
        "--max-decode", str(args.max_workers),
        "--planner-interval-s", "1",
        "--planner-window-s", "10",
        "--planner-scale-up-after", "3",
        "--planner-scale-down-after", "10",
        "--planner-cooldown-s", "10",
    ]  # fmt: skip
    runs = [run_server("fixed 1P1D", [], phases, args)]
    runs.append(run_server(f"planner (1..{args.max_workers} per role)", planner, phases, args))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = args.out.with_suffix(".png")
    plot(runs, figure)
    result = {
        "machine": machine_info(),
        "phases": [asdict(p) for p in phases],
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_itl_ms},
        "runs": [asdict(r) for r in runs],
        "figure": figure.name,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'server':<28} {'phase':<14} {'issued':>6} {'failed':>6} {'SLO att.':>8} "
          f"{'goodput':>8} {'TTFT p90':>9} {'TPOT p90':>9}")  # fmt: skip
    for run in runs:
        for name, p in run.phases.items():
            print(
                f"{run.name:<28} {name:<14} {p['issued']:>6} {p['failed']:>6} "
                f"{p['slo_attainment']:>8.2f} {p['goodput_rps']:>8.2f} "
                f"{p['ttft_ms']['p90'] or 0:>9.0f} {p['tpot_ms']['p90'] or 0:>9.1f}"
            )
        print(f"  workers (prefill, decode) seen: "
              f"{sorted({(s.num_prefill, s.num_decode) for s in run.samples})}")  # fmt: skip
    print(f"wrote {args.out} and {figure}")


if __name__ == "__main__":
    main()
