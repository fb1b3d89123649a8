"""A burst of short prompts amid ongoing decodes (1P1D): how long the running streams stall,
and which worker prefilled the burst; optionally this tree against another checkout.

Starts ``pdserve serve`` 1P1D on 127.0.0.1 (``--model``, default the 77M dummy Llama of
``compare_vllm.py``), opens ``--num-long`` streams (128 prompt tokens, ``--long-tokens``
output tokens each, greedy, EOS ignored), and once they are decoding sends ``--num-short``
requests of ``--short-len`` prompt tokens (8 output tokens) at once. Short prompts are what
the router may prefill on the decode worker itself (``--local-prefill-threshold``, default
64). Figures per run:

- ``stall_ms``: for each long stream, its longest gap between two streamed tokens while the
  burst is in flight (``logprobs=0``: an event per token); the median and the largest over
  the long streams;
- the burst's TTFT p50 and max, and how long until its last request was answered;
- ``pdserve_prefill_decisions_total`` of the burst (local on D or remote on P).

With ``--compare-with DIR`` the servers of the two trees alternate, ``--rounds`` times each
(the other tree's server runs with ``PYTHONPATH=DIR`` and ``DIR`` as its working directory).

    .venv/bin/python -m benchmarks.short_burst
    .venv/bin/python -m benchmarks.short_burst --compare-with /tmp/base --rounds 2

Writes ``benchmarks/results/short_burst.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._servers import (
    LOG_DIR,
    RESULTS_DIR,
    compared_trees,
    fmt,
    format_table,
    free_port,
    machine_info,
    model_path,
    start_pdserve,
    stop_server,
    tree_order,
    wait_ready,
)

logger = logging.getLogger(__name__)

VOCAB = 2048  # the dummy model's and pdserve-tiny's tokenizer
LONG_PROMPT_LEN = 128
SHORT_OUTPUT_LEN = 8
DECODING_AFTER_S = 1.0  # the long streams' first token, then this long before the burst
FIGURES = ("stall_max_ms", "stall_median_ms", "burst_ttft_p50_ms", "burst_ttft_max_ms")


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: list[int],
    max_tokens: int,
    first: asyncio.Event | None = None,
) -> tuple[float, list[float]]:
    """When the request was sent, and when each streamed event arrived (``first`` is set at
    the first)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
        # Every token its own event: without logprobs a token that completes no character
        # sends none, and a stream of such tokens would look like one long stall.
        "logprobs": 0,
    }
    sent, times = time.monotonic(), []
    async with client.stream("POST", url, json=body, timeout=600.0) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.monotonic())
                if first is not None:
                    first.set()
    if not times:
        raise RuntimeError(f"a stream of {len(prompt)} prompt tokens carried no event")
    return sent, times


def _decisions(base_url: str) -> dict[str, float]:
    """``pdserve_prefill_decisions_total`` by decision (``local`` / ``remote``), all reasons."""
    totals = {"local": 0.0, "remote": 0.0}
    text = httpx.get(base_url + "/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pdserve_prefill_decisions_total":
                totals[sample.labels["decision"]] += sample.value
    return totals


async def _run(base_url: str, model: str, args: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)

    def prompt(length: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(length)]

    url = base_url + "/v1/completions"
    limits = httpx.Limits(max_connections=args.num_long + args.num_short + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        await _stream(client, url, model, prompt(args.short_len), 2)  # warm-up
        decoding = [asyncio.Event() for _ in range(args.num_long)]
        longs = [
            asyncio.create_task(
                _stream(client, url, model, prompt(LONG_PROMPT_LEN), args.long_tokens, event)
            )
            for event in decoding
        ]
        # Every long stream past its prefill, then a while: D is decoding all of them.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in decoding)), timeout=600.0)
        await asyncio.sleep(DECODING_AFTER_S)
        before = _decisions(base_url)
        burst_start = time.monotonic()
        shorts = await asyncio.gather(
            *(
                _stream(client, url, model, prompt(args.short_len), SHORT_OUTPUT_LEN)
                for _ in range(args.num_short)
            )
        )
        burst_end = time.monotonic()
        long_results = await asyncio.gather(*longs)
    after = _decisions(base_url)
    stalls = []
    for _, times in long_results:
        if times[-1] < burst_end:
            raise RuntimeError("a long stream ended before the burst did: raise --long-tokens")
        gaps = [b - a for a, b in itertools.pairwise(times) if b > burst_start and a < burst_end]
        stalls.append(max(gaps))
    ttfts = sorted(times[0] - sent for sent, times in shorts)
    return {
        "stall_max_ms": max(stalls) * 1e3,
        "stall_median_ms": statistics.median(stalls) * 1e3,
        "burst_ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "burst_ttft_max_ms": ttfts[-1] * 1e3,
        "burst_s": burst_end - burst_start,
        "decisions": {k: after[k] - before[k] for k in after},
    }


def measure(pythonpath: str | None, args: argparse.Namespace, seed: int) -> dict:
    """One 1P1D server of the tree at ``pythonpath`` (None: this one): its figures."""
    log = LOG_DIR / f"short_burst_{'other' if pythonpath else 'this'}.log"
    model = model_path(args.model)
    server = start_pdserve(free_port(), log, model=model, checkout=pythonpath)
    try:
        wait_ready(server, args.ready_timeout_s)
        return asyncio.run(_run(server.base_url, model, args, seed))
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dummy-100m", help="tiny, dummy-100m or smollm2")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--num-long", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=400)
    parser.add_argument("--num-short", type=int, default=24)
    parser.add_argument("--short-len", type=int, default=64)
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "short_burst.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.rounds < 1 or args.num_long < 1 or args.num_short < 1:
        parser.error("--rounds, --num-long and --num-short must be at least 1")
    trees = compared_trees(parser, args.compare_with)

    runs: list[dict] = []
    for round_index in range(args.rounds):
        for tree, pythonpath in tree_order(trees, round_index):
            figures = measure(pythonpath, args, seed=round_index)
            runs.append({"round": round_index, "tree": tree, **figures})
            logger.info("%s round %d: %s", tree, round_index, figures)

    header = ["figure", *trees] + (["this / other"] if len(trees) == 2 else [])
    rows, medians = [], {}
    for key in FIGURES:
        values = {t: statistics.median(r[key] for r in runs if r["tree"] == t) for t in trees}
        medians[key] = values
        row = [key, *(fmt(v, 0) for v in values.values())]
        if len(trees) == 2:
            row.append(fmt(values["this"] / values["other"], 2) if values["other"] else "n/a")
        rows.append(row)
    for tree in trees:
        local = sum(r["decisions"]["local"] for r in runs if r["tree"] == tree)
        remote = sum(r["decisions"]["remote"] for r in runs if r["tree"] == tree)
        print(f"{tree}: the bursts were prefilled {local:.0f} on D, {remote:.0f} on P")
    print(format_table(header, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.short_burst " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine_info(),
                "trees": trees,
                "workload": {
                    "model": args.model,
                    "num_long": args.num_long,
                    "long_prompt_len": LONG_PROMPT_LEN,
                    "long_tokens": args.long_tokens,
                    "num_short": args.num_short,
                    "short_len": args.short_len,
                    "short_output_len": SHORT_OUTPUT_LEN,
                },
                "medians": medians,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
