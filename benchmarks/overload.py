"""The router under overload: 10x more concurrent clients than it admits, for a bounded time.

Starts ``pdserve serve`` (pdserve-tiny, 1P1D by default) with ``--max-concurrent-requests
LIMIT`` and keeps ``LIMIT x --overload`` streaming clients busy: each sends a request, reads
it to the end (or takes its 429), and sends the next, until ``--duration-s`` or
``--max-requests``. It samples the router process's resident memory (RSS, the uvicorn process
alone, not its Ray workers) before, every 0.5 s during, and after the load, and counts the
answers: every refusal must be a 429 with ``Retry-After``, no request may fail otherwise, and
the router must be healthy and idle afterwards.

    .venv/bin/python -m benchmarks.overload --limit 16 --overload 10 --duration-s 60

Writes ``benchmarks/results/overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks._servers import (
    LOG_DIR,
    RESULTS_DIR,
    free_port,
    machine_info,
    start_pdserve,
    stop_server,
    wait_ready,
)

logger = logging.getLogger(__name__)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _client(
    http: httpx.AsyncClient, deadline: float, budget: list[int], counts: Counter, body: dict
) -> None:
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 429:
                    ok = "retry-after" in response.headers
                    counts["429" if ok else "429 without Retry-After"] += 1
                    await response.aread()
                    await asyncio.sleep(float(response.headers.get("retry-after", 1)) / 10)
                    continue
                text = "".join([line async for line in response.aiter_lines()])
                failed = response.status_code != 200 or '"error"' in text
                counts["failed" if failed else "200"] += 1
        except httpx.HTTPError as error:
            counts[f"transport error: {type(error).__name__}"] += 1


async def _overload(url: str, pid: int, args: argparse.Namespace) -> dict:
    counts: Counter = Counter()
    samples: list[float] = []
    body = {"prompt": "overload", "max_tokens": args.output_len, "ignore_eos": True, "stream": True}
    budget = [args.max_requests]
    limits = httpx.Limits(max_connections=args.limit * args.overload + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        deadline = time.monotonic() + args.duration_s
        clients = [
            asyncio.create_task(_client(http, deadline, budget, counts, body))
            for _ in range(args.limit * args.overload)
        ]
        while not all(c.done() for c in clients):
            samples.append(rss_mib(pid))
            await asyncio.sleep(0.5)
        await asyncio.gather(*clients)
        health = (await http.get("/health")).json()
    return {"counts": dict(counts), "rss_samples_mib": samples, "health": health}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=16, help="--max-concurrent-requests")
    parser.add_argument("--overload", type=int, default=10, help="clients per admitted request")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--colocated", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "overload.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    extra = ("--max-concurrent-requests", str(args.limit))
    server = start_pdserve(
        free_port(), LOG_DIR / "overload.log", colocated=args.colocated, extra_args=extra
    )
    try:
        wait_ready(server)
        time.sleep(2.0)  # let the startup's allocations settle
        before = rss_mib(server.pid)
        began = time.monotonic()
        run = asyncio.run(_overload(server.base_url, server.pid, args))
        elapsed = time.monotonic() - began
        time.sleep(2.0)
        after = rss_mib(server.pid)
    finally:
        stop_server(server)
    samples = run["rss_samples_mib"]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "elapsed_s": round(elapsed, 1),
        "answers": run["counts"],
        "router_rss_mib": {
            "before": round(before, 1),
            "peak": round(max(samples), 1),
            "last_sample": round(samples[-1], 1),
            "after": round(after, 1),
            "num_samples": len(samples),
        },
        "health_after": run["health"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("elapsed_s", "answers", "router_rss_mib")}, indent=2))
    print(f"wrote {args.out}")
    bad = {k: v for k, v in run["counts"].items() if k not in ("200", "429")}
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
