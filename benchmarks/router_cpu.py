"""The router's CPU: per generated token, per request, and idle; optionally this tree
against another checkout of pdserve, server by server in turn.

Starts ``pdserve serve`` with pdserve-tiny (1P1D and ``--colocated``) on 127.0.0.1, and
measures the CPU time (user + system, ``/proc/<pid>/stat``) of the router process alone
(the server's front process: HTTP, detokenization, routing, the worker channels; not its
workers) while it

- sits idle for ``--idle-s`` seconds (stats polling, health checks, Ray's driver threads),
  split thread by thread: the event loop's own, and the rest (Ray's core worker and gRPC
  threads, which wake on fixed timers of their own: ``idle_threads`` in the JSON);
- serves a burst of ``--num-prompts`` requests of 128 prompt tokens and 64 output tokens
  (the router's CPU per generated token, as in ``compare_vllm.py``), then the same number
  of requests with one output token (what a request costs apart from its tokens);
- serves a Poisson-paced run (8 requests a second).

With ``--compare-with DIR`` (a checkout of another pdserve revision, e.g. a ``git worktree``
of main), the servers of the two trees alternate, ``--rounds`` times each, so both meet
the same machine load; the table gives each tree's median and the ratio. A server of
the other tree (router and workers) runs with ``PYTHONPATH=DIR`` and ``DIR`` as its
working directory (Ray puts the driver's first on its workers' path), with this venv's
packages.

    .venv/bin/python -m benchmarks.router_cpu
    git worktree add --detach /tmp/base main
    .venv/bin/python -m benchmarks.router_cpu --compare-with /tmp/base --rounds 3

Writes ``benchmarks/results/router_cpu.json`` (every round's figures).

On this 2-core machine the load generator, the engine and the router share the cores, so
one server's figures move by up to ~30% from run to run: compare medians of several
rounds, never two single runs.

It also measures the host's floors under the paced figure, which no router code goes
below (``benchmarks/host_floor.py``: a loopback write's CPU, and what waking after a
lone stream's inter-token gap costs the same Python against staying awake): a paced
token costs the router at least one such write and one such wake-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks import host_floor
from benchmarks._servers import (
    LOG_DIR,
    MAIN_THREAD,
    RESULTS_DIR,
    ServerRun,
    compared_trees,
    fmt,
    format_table,
    free_port,
    machine_info,
    run_on_server,
    start_pdserve,
    tree_order,
)
from benchmarks.serving.config import BenchConfig
from benchmarks.serving.workloads import WorkloadConfig

logger = logging.getLogger(__name__)

TINY_VOCAB = 2048  # pdserve-tiny's tokenizer
INPUT_LEN = 128
OUTPUT_LEN = 64
PACED_RATE = 8.0
NO_CONTENT = "stream carried no content"
FIGURES = (
    "idle_ms_per_s",
    "idle_loop_ms_per_s",  # of which its event loop's thread (schedstat: ns, not ticks)
    "idle_other_threads_ms_per_s",  # of which every other thread (Ray's, gRPC's, Python's)
    "idle_wakeups_per_s",  # times any of its threads was scheduled in, a second
    "burst_ms_per_token",
    "burst_events_per_token",
    "request_ms",
    "paced_ms_per_token",
    "paced_events_per_token",
)


def _workload(num_prompts: int, output_len: int, seed: int) -> WorkloadConfig:
    return WorkloadConfig(
        num_prompts=num_prompts,
        input_len=INPUT_LEN,
        output_len=output_len,
        vocab_size=TINY_VOCAB,
        seed=seed,
    )


def _per_token(run: ServerRun, index: int) -> tuple[float, float]:
    """Router CPU ms per output token of ``run``'s bench ``index``, and its SSE events per
    token (a few tokens complete no character and send none: ~0.94 here; lower would mean
    the router fell behind and merged several steps of a request into one event)."""
    result = run.results[index]
    tokens = result.metrics.total_output_tokens
    events = sum(len(r.chunk_times) for r in result.records)
    return run.router_cpu_s[index] / tokens * 1e3, events / tokens


def measure(mode: str, pythonpath: str | None, args: argparse.Namespace, seed: int) -> dict:
    """One server of the tree at ``pythonpath`` (None: this one) in ``mode``: its figures."""
    log = LOG_DIR / f"router_cpu_{mode}_{'other' if pythonpath else 'this'}.log"
    server = start_pdserve(free_port(), log, colocated=mode == "colocated", checkout=pythonpath)
    base = BenchConfig(progress=False)
    n = args.num_prompts
    benches = [  # fresh prompts for every run: no prefix-cache hits between them
        replace(base, workload=_workload(n, OUTPUT_LEN, seed=seed)),
        replace(base, workload=_workload(n, 1, seed=seed + 1)),
        replace(
            base,
            workload=_workload(args.paced_prompts, OUTPUT_LEN, seed=seed + 2),
            request_rate=PACED_RATE,
        ),
    ]
    warmup = replace(base, workload=_workload(8, 4, seed=10_000 + seed))
    run = run_on_server(server, benches, (warmup,), idle_s=args.idle_s)
    if run.error:
        raise RuntimeError(f"{server.name}: {run.error}")
    # A random-prompt request whose tokens never complete a UTF-8 character streams no text
    # (likely at one output token): the load generator counts it completed where usage says
    # how many tokens it made, failed where not; the router served it either way.
    errors = [
        r.error for res in run.results for r in res.records if r.error not in ("", NO_CONTENT)
    ]
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} requests failed; the first: {errors[0]}")
    assert run.router_idle_cpu_s is not None
    burst_ms, burst_events = _per_token(run, 0)
    paced_ms, paced_events = _per_token(run, 2)
    threads = run.router_idle_threads
    return {
        "idle_ms_per_s": run.router_idle_cpu_s / args.idle_s * 1e3,
        "idle_loop_ms_per_s": threads[MAIN_THREAD]["cpu_ms_per_s"],
        "idle_other_threads_ms_per_s": sum(
            t["cpu_ms_per_s"] for name, t in threads.items() if name != MAIN_THREAD
        ),
        "idle_wakeups_per_s": sum(t["scheduled_per_s"] for t in threads.values()),
        "burst_ms_per_token": burst_ms,
        "burst_events_per_token": burst_events,
        "request_ms": run.router_cpu_s[1] / n * 1e3,
        "paced_ms_per_token": paced_ms,
        "paced_events_per_token": paced_events,
        "idle_threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="1p1d,colocated")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--paced-prompts", type=int, default=32)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "router_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"1p1d", "colocated"}:
        parser.error("--modes takes 1p1d and/or colocated")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    trees = compared_trees(parser, args.compare_with)

    runs: list[dict] = []
    for round_index in range(args.rounds):
        for mode in modes:
            for tree, pythonpath in tree_order(trees, round_index):
                seed = 1000 * round_index
                figures = measure(mode, pythonpath, args, seed)
                runs.append({"round": round_index, "mode": mode, "tree": tree, **figures})
                logger.info("%s %s round %d: %s", mode, tree, round_index, figures)

    def median(mode: str, tree: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode and r["tree"] == tree)

    header = ["mode", "figure", *trees]
    if len(trees) == 2:
        header.append("this / other")
    rows = []
    summary: dict[str, dict] = {}
    for mode in modes:
        for key in FIGURES:
            values = {tree: median(mode, tree, key) for tree in trees}
            summary.setdefault(mode, {})[key] = values
            row = [mode, key, *(fmt(v, 3) for v in values.values())]
            if len(trees) == 2:
                other = values["other"]
                row.append(fmt(values["this"] / other, 2) if other > 0 else "n/a")
            rows.append(row)
    print(format_table(header, rows))
    floor = host_floor.measure()
    print(host_floor.describe(floor))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.router_cpu "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine_info(),
                "trees": trees,
                "rounds": args.rounds,
                "workload": {
                    "model": "pdserve-tiny",
                    "input_len": INPUT_LEN,
                    "output_len": OUTPUT_LEN,
                    "num_prompts": args.num_prompts,
                    "paced_prompts": args.paced_prompts,
                    "paced_rate": PACED_RATE,
                    "idle_s": args.idle_s,
                },
                "medians": summary,
                "host_floor": floor,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
