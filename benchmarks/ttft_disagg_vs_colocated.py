"""Time to first token: 1P1D (KV over gRPC and over NIXL, layer by layer) against ``--colocated``.

One invocation starts each server in turn on 127.0.0.1 and sends each the same prompts of
128, 1k and 4k tokens, one request at a time on an idle server (warm-up first). Per request
it times, at the client, the first token (TTFT) and the second: 1P1D returns the first token
from the prefill worker while the last layers' KV may still be landing on the decode worker,
and the decode worker can produce the second one only once all of it has arrived, so the
second token's gap shows the part of the transfer the layer-wise overlap did not hide. The
1P1D runs (one per ``--transports``) also read the KV transfer's bytes and span (first layer
handed to the sender to the decode worker's acknowledgement: it overlaps the prefill, so it
is no wire rate; see ``benchmarks/kv_transfer_rate.py`` for that) from ``/metrics``.

The model is pdserve-tiny's geometry and tokenizer with ``max_position_embeddings`` raised
to 8192 (pdserve-tiny stops at 2048), with random weights (``--load-format dummy``); prompts
are random token ids.

    .venv/bin/python -m benchmarks.ttft_disagg_vs_colocated [--repeats 3] [--sizes 128,1024,4096]
        [--transports grpc,nixl]

Writes ``benchmarks/results/ttft_disagg_vs_colocated.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._servers import (
    RESULTS_DIR,
    format_table,
    free_port,
    machine_info,
    start_pdserve,
    stop_server,
    wait_ready,
)
from engine.tiny import TINY_ASSETS_DIR, TOKENIZER_FILES, tiny_hf_config

logger = logging.getLogger(__name__)

MAX_POSITIONS = 8192
MODEL_NAME = "tiny-8k"
COLOCATED = "colocated"


@dataclass(frozen=True)
class Timing:
    """One request, seen by the client."""

    num_prompt_tokens: int
    ttft_s: float
    second_token_s: float  # from the first token to the second


def make_model(folder: Path) -> Path:
    """pdserve-tiny's config with 8192 positions, and its tokenizer; weights are dummy."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config() | {"max_position_embeddings": MAX_POSITIONS}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY_ASSETS_DIR / name, folder / name)
    return folder


def make_prompts(sizes: list[int], repeats: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Per size, one warm-up prompt and ``repeats`` measured ones, all distinct (no prefix
    cache hits), in the order they are sent."""
    rng = random.Random(seed)
    return [
        [rng.randrange(3, vocab_size) for _ in range(size)]
        for size in sizes
        for _ in range(1 + repeats)
    ]


def time_request(client: httpx.Client, prompt: list[int]) -> Timing:
    """Stream a greedy 2-token completion; a chunk per token (``logprobs=0``)."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
    }
    token_times = []
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"the server failed the request: {chunk['error']}")
            for choice in chunk["choices"]:
                if choice.get("logprobs") and choice["logprobs"]["tokens"]:
                    token_times.append(time.perf_counter())
    if len(token_times) != 2:
        raise RuntimeError(f"expected 2 tokens, got {len(token_times)}")
    return Timing(len(prompt), token_times[0] - start, token_times[1] - token_times[0])


def kv_transfer_totals(client: httpx.Client) -> dict[str, float]:
    """The router's KV transfer histograms: sums and count so far."""
    wanted = {
        "pdserve_kv_transfer_bytes_sum": "bytes",
        "pdserve_kv_transfer_bytes_count": "count",
        "pdserve_kv_transfer_seconds_sum": "seconds",
    }
    totals = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[wanted[sample.name]] += sample.value
    return totals


def wait_for_transfers(client: httpx.Client, count: float, timeout_s: float = 60.0) -> None:
    """The router observes a transfer's acknowledgement after the request: wait for it."""
    deadline = time.monotonic() + timeout_s
    while kv_transfer_totals(client)["count"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} KV transfers observed in {timeout_s} s")
        time.sleep(0.1)


def run_mode(
    mode: str, model: Path, prompts: list[list[int]], repeats: int, log_dir: Path
) -> dict[str, Any]:
    """Start the server, send every prompt in order, stop it. Results per prompt size.

    ``mode``: "colocated", or "1P1D-<transport>".
    """
    port = free_port()
    disaggregated = mode != COLOCATED
    transport = ("--transport", mode.split("-", 1)[1]) if disaggregated else ()
    server = start_pdserve(
        port,
        log_dir / f"ttft_{mode}.log",
        model=str(model),
        extra_args=(
            "--load-format", "dummy",
            "--max-model-len", str(MAX_POSITIONS),
            "--served-model-name", MODEL_NAME,
            "--kv-cache-size-gib", "0.5",
            *transport,
        ),
        colocated=not disaggregated,
    )  # fmt: skip
    results: dict[str, Any] = {}
    try:
        wait_ready(server)
        with httpx.Client(base_url=server.base_url, timeout=600.0) as client:
            for start in range(0, len(prompts), 1 + repeats):
                warmup, *measured = prompts[start : start + 1 + repeats]
                num_transfers = kv_transfer_totals(client)["count"]
                time_request(client, warmup)
                if disaggregated:  # the warm-up's transfer stays out of the figures
                    wait_for_transfers(client, num_transfers + 1)
                before = kv_transfer_totals(client)
                timings = [time_request(client, p) for p in measured]
                size = len(warmup)
                entry: dict[str, Any] = {"timings": [asdict(t) for t in timings]}
                entry["ttft_s"] = statistics.median(t.ttft_s for t in timings)
                entry["second_token_s"] = statistics.median(t.second_token_s for t in timings)
                if disaggregated:
                    wait_for_transfers(client, before["count"] + repeats)
                    after = kv_transfer_totals(client)
                    count = after["count"] - before["count"]
                    entry["kv_bytes_per_request"] = (after["bytes"] - before["bytes"]) / count
                    entry["kv_seconds_per_request"] = (after["seconds"] - before["seconds"]) / count
                results[str(size)] = entry
                logger.info("%s, %d tokens: %s", mode, size, entry["ttft_s"])
    finally:
        stop_server(server)
    return results


def build_table(results: dict[str, dict[str, Any]], sizes: list[int]) -> str:
    """Medians. "exposed": how much longer 1P1D waits for its second token than colocated
    does (the KV still landing, plus the hop to the decode worker); "hidden": the share of
    the transfer's span that was not exposed."""
    header = [
        "prompt tokens",
        "transport",
        "TTFT 1P1D (ms)",
        "TTFT colocated (ms)",
        "TTFT 1P1D / colocated",
        "2nd token 1P1D (ms)",
        "2nd token colocated (ms)",
        "KV per request (MiB)",
        "KV span (ms)",
        "exposed (ms)",
        "hidden",
    ]
    rows = []
    for size in sizes:
        for mode in (m for m in results if m != COLOCATED):
            pd, co = results[mode][str(size)], results[COLOCATED][str(size)]
            span = pd["kv_seconds_per_request"]
            exposed = max(0.0, pd["second_token_s"] - co["second_token_s"])
            rows.append(
                [
                    str(size),
                    mode.split("-", 1)[1],
                    f"{pd['ttft_s'] * 1e3:.0f}",
                    f"{co['ttft_s'] * 1e3:.0f}",
                    f"{pd['ttft_s'] / co['ttft_s']:.2f}",
                    f"{pd['second_token_s'] * 1e3:.0f}",
                    f"{co['second_token_s'] * 1e3:.0f}",
                    f"{pd['kv_bytes_per_request'] / (1 << 20):.2f}",
                    f"{span * 1e3:.0f}",
                    f"{exposed * 1e3:.0f}",
                    f"{100 * (1 - exposed / span):.0f}%" if span > 0 else "n/a",
                ]
            )
    return format_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,1024,4096", help="prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="measured requests per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transports", default="grpc,nixl", help="KV transports for 1P1D")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ttft_disagg_vs_colocated.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) >= MAX_POSITIONS:
        parser.error(f"prompts must be shorter than {MAX_POSITIONS} tokens")
    vocab_size = tiny_hf_config()["vocab_size"]
    prompts = make_prompts(sizes, args.repeats, vocab_size, args.seed)
    info = machine_info()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-ttft-") as tmp:
        model = make_model(Path(tmp) / MODEL_NAME)
        os.environ.setdefault("UCX_TLS", "tcp,self,sm")  # NIXL's UCX on a host without RDMA
        modes = [f"1P1D-{t}" for t in args.transports.split(",")] + [COLOCATED]
        for mode in modes:
            results[mode] = run_mode(mode, model, prompts, args.repeats, RESULTS_DIR / "logs")
    table = build_table(results, sizes)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": info,
                "model": f"pdserve-tiny geometry, {MAX_POSITIONS} positions, dummy weights",
                "repeats": args.repeats,
                "results": results,
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
