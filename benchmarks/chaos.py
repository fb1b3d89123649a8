"""Chaos, as a user meets it: SIGKILL a worker while streams are in flight, count what is lost.

Starts ``pdserve serve`` (the built-in model, 1P1D over gRPC by default), runs
``--num-requests`` streaming greedy chat completions once undisturbed, then once per case with
the same requests, killing a worker process by PID (SIGKILL) mid-way:

- ``prefill``: as soon as one stream has its first token (the others are still being
  prefilled or their KV is in flight);
- ``decode``: once every stream has at least 3 chunks (all are decoding).

For each case it reports requests completed / failed, how many answers differ from the
undisturbed run's, the longest pause a stream saw, and how long the replacement took.

    .venv/bin/python -m benchmarks.chaos --num-requests 24 --cases prefill decode

Writes ``benchmarks/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from benchmarks._servers import (
    LOG_DIR,
    RESULTS_DIR,
    descendant_pids,
    free_port,
    machine_info,
    start_pdserve,
    stop_server,
    wait_ready,
)

logger = logging.getLogger(__name__)

TOPICS = (
    "the water cycle", "how a compiler works", "the history of the printing press",
    "why the sky is blue", "how vaccines train the immune system", "the rules of chess",
    "how a bicycle stays upright", "what a hash table is", "the causes of the seasons",
    "how bread rises", "what plate tectonics explains", "how a refrigerator cools",
)  # fmt: skip


@dataclass
class Stream:
    prompt: str
    text: str = ""
    chunks: int = 0
    error: str | None = None
    longest_gap_s: float = 0.0
    finish_reason: str | None = None


def _prompts(num: int) -> list[str]:
    return [
        f"Explain {TOPICS[i % len(TOPICS)]} in detail" + (" for a student" * (i // len(TOPICS)))
        for i in range(num)
    ]


async def _stream(client: openai.AsyncOpenAI, model: str, stream: Stream, max_tokens: int) -> None:
    last = time.monotonic()
    try:
        chunks = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": stream.prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in chunks:
            now = time.monotonic()
            stream.longest_gap_s = max(stream.longest_gap_s, now - last)
            last = now
            for choice in chunk.choices:
                stream.text += choice.delta.content or ""
                stream.chunks += 1
                stream.finish_reason = choice.finish_reason or stream.finish_reason
    except Exception as error:  # counted, not raised: the point is how many fail
        stream.error = f"{type(error).__name__}: {error}"


async def _run(url: str, model: str, prompts: list[str], max_tokens: int, kill=None) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    streams = [Stream(p) for p in prompts]
    began = time.monotonic()
    tasks = [asyncio.create_task(_stream(client, model, s, max_tokens)) for s in streams]
    killed = None
    if kill is not None:
        when, pid = kill
        while not when(streams) and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        if not all(t.done() for t in tasks):
            os.kill(pid, signal.SIGKILL)
            killed = round(time.monotonic() - began, 2)
    await asyncio.gather(*tasks)
    await client.close()
    return {
        "streams": streams,
        "elapsed_s": round(time.monotonic() - began, 1),
        "killed_at_s": killed,
    }


def _worker_pid(server_pid: int, role: str) -> int:
    name = "PrefillWorker" if role == "prefill" else "DecodeWorker"
    for pid in descendant_pids(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::{name}"):
            return pid
    raise RuntimeError(f"no {name} process under {server_pid}")


def _wait_replaced(url: str, server_pid: int, role: str, old_pid: int, timeout_s: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            healthy = httpx.get(f"{url}/health", timeout=10)
            ready = healthy.status_code == 200 and all(healthy.json()["workers"].values())
            if ready and _worker_pid(server_pid, role) != old_pid:
                return round(time.monotonic() - began, 1)
        except (httpx.HTTPError, RuntimeError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the {role} worker was not replaced within {timeout_s}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--cases", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"]
    )
    parser.add_argument("--transport", default="grpc")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "chaos.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    extra = (
        "--transport",
        args.transport,
        "--health-interval-s",
        "1",
        "--local-prefill-threshold",
        "0",
    )
    server = start_pdserve(free_port(), LOG_DIR / "chaos.log", model=args.model, extra_args=extra)
    prompts = _prompts(args.num_requests)
    cases = {}
    try:
        wait_ready(server, timeout_s=600)
        url = server.base_url
        baseline = asyncio.run(_run(url, args.model, prompts, args.max_tokens))
        expected = [s.text for s in baseline["streams"]]
        assert not any(s.error for s in baseline["streams"]), "the undisturbed run failed"
        for case in args.cases:
            pid = _worker_pid(server.pid, case)
            if case == "prefill":
                when = lambda streams: any(s.chunks for s in streams)  # noqa: E731
            else:
                when = lambda streams: all(s.chunks >= 3 for s in streams)  # noqa: E731
            run = asyncio.run(_run(url, args.model, prompts, args.max_tokens, (when, pid)))
            streams = run["streams"]
            replaced_after_s = _wait_replaced(url, server.pid, case, pid, 300)
            cases[case] = {
                "killed_pid": pid,
                "killed_at_s": run["killed_at_s"],
                "elapsed_s": run["elapsed_s"],
                "completed": sum(s.error is None for s in streams),
                "failed": sum(s.error is not None for s in streams),
                "differ_from_undisturbed": sum(
                    s.error is None and s.text != e for s, e in zip(streams, expected)
                ),
                "longest_pause_s": round(max(s.longest_gap_s for s in streams), 2),
                "replacement_ready_s_after_run": replaced_after_s,
                "errors": sorted({s.error for s in streams if s.error})[:5],
            }
            logger.info("%s: %s", case, json.dumps(cases[case]))
    finally:
        stop_server(server)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "undisturbed_elapsed_s": baseline["elapsed_s"],
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(cases, indent=2))
    print(f"wrote {args.out}")
    return (
        0
        if all(c["failed"] == 0 and c["differ_from_undisturbed"] == 0 for c in cases.values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
