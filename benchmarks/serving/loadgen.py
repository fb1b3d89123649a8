"""The open-loop load generator behind ``pdserve bench``.

Lifecycle of one run (``run_benchmark``): the workload is built up front; an arrival process
(``poisson`` or ``constant`` at ``request_rate`` req/s, or everything at once for ``inf``)
releases request ``i`` at offset ``arrival_offsets[i]`` whether or not earlier ones finished
(open loop). A released request waits for a slot when ``max_concurrency`` is set, then is
sent as one streamed HTTP request to any OpenAI-compatible server (pdserve, vLLM) on
``/v1/completions`` or ``/v1/chat/completions``, with ``max_tokens`` = its output length,
``ignore_eos`` and ``stream_options.include_usage``. The SSE stream is parsed line by line and
every content chunk is timestamped as it arrives (a stream that completes without text
counts by its ``usage``: see ``metrics``). Nothing is released at or after
``time_limit`` seconds; requests still running then are cancelled (status ``cancelled``,
left out of the latency statistics). The run's duration is from the first release to the last
finish (or the time limit), and ``metrics.compute_metrics`` turns the records into results.

``run_sweep`` repeats the same workload at several rates and reports the highest rate whose
SLO attainment reaches ``goodput_fraction``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from benchmarks.serving.config import ENDPOINTS, BenchConfig
from benchmarks.serving.metrics import BenchMetrics, RequestRecord, RequestStatus, compute_metrics
from benchmarks.serving.results import BenchResult, SweepResult
from benchmarks.serving.workloads import BenchRequest, build_workload

logger = logging.getLogger(__name__)


class BenchmarkError(RuntimeError):
    """The server cannot be benchmarked (e.g. it lists no model)."""


def arrival_offsets(
    num: int, request_rate: float, arrival: str, rng: np.random.Generator
) -> list[float]:
    """Release times in seconds from the start: the first at 0, then gaps of 1/rate on
    average (exponential gaps for ``poisson``, equal ones for ``constant``)."""
    if num == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num
    if arrival == "constant":
        return [i / request_rate for i in range(num)]
    gaps = rng.exponential(1.0 / request_rate, size=num - 1)
    return [0.0, *(float(x) for x in np.cumsum(gaps))]


def build_payload(
    request: BenchRequest, endpoint: str, model: str, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = request.chat_messages()
    else:
        body["prompt"] = request.completion_prompt()
    return body


def _chunk_has_content(chunk: dict[str, Any], endpoint: str) -> bool:
    choices = chunk.get("choices") or []
    if not choices:
        return False
    if endpoint == "chat":
        return bool((choices[0].get("delta") or {}).get("content"))
    return bool(choices[0].get("text"))


async def fetch_default_model(client: httpx.AsyncClient) -> str:
    """The id of the first model the server lists."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise BenchmarkError(f"{client.base_url}/v1/models lists no model")
    return str(models[0]["id"])


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, ended by LF or CR LF as SSE has them (a lone CR, which SSE allows
    too, is not taken: no server measured here sends one). httpx's ``aiter_lines`` also ends a
    line at U+0085, U+2028 and U+2029, which JSON may carry raw in a model's text: an event
    would arrive in two pieces."""
    pending = b""
    async for data in response.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if pending:
        yield pending.removesuffix(b"\r").decode()


async def send_request(
    client: httpx.AsyncClient,
    endpoint: str,
    payload: dict[str, Any],
    record: RequestRecord,
    t0: float,
) -> None:
    """Send one streamed request and fill ``record`` (times relative to ``t0``)."""
    record.send_time = time.perf_counter() - t0
    try:
        async with client.stream("POST", ENDPOINTS[endpoint], json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.fail(f"HTTP {response.status_code}: {body[:500]}")
                return
            async for line in sse_lines(response):
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    record.end_time = now
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.fail(f"error event: {chunk['error']}")
                    return
                if usage := chunk.get("usage"):
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.output_tokens = usage.get("completion_tokens")
                if _chunk_has_content(chunk, endpoint):
                    record.chunk_times.append(now)
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a malformed JSON chunk
        record.fail(f"{type(e).__name__}: {e}")
        return
    if record.end_time is None:
        record.fail("stream ended without [DONE]")
    elif not record.chunk_times and not record.output_tokens:
        record.fail("stream carried no content")  # and no usage saying it made tokens
    else:
        record.status = RequestStatus.OK


async def _drive(
    config: BenchConfig, requests: list[BenchRequest], client: httpx.AsyncClient, model: str
) -> tuple[list[RequestRecord], float, float]:
    """Release, send and await every request.

    Returns the records, the ``time.perf_counter()`` their times are relative to, and the
    duration in seconds.
    """
    rng = np.random.default_rng([config.workload.seed, 1])
    offsets = arrival_offsets(len(requests), config.request_rate, config.arrival, rng)
    limit = config.time_limit if config.time_limit is not None else math.inf
    slots = asyncio.Semaphore(config.max_concurrency or len(requests))
    progress = tqdm(total=len(requests), disable=not config.progress, unit="req")
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []

    async def limited(payload: dict[str, Any], record: RequestRecord) -> None:
        async with slots:
            await send_request(client, config.endpoint, payload, record, t0)

    t0 = time.perf_counter()
    for i, (request, offset) in enumerate(zip(requests, offsets)):
        if offset >= limit:
            break
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = RequestRecord(
            index=i,
            tag=request.tag,
            prompt_len=request.prompt_len,
            target_output_len=request.output_len,
            scheduled_time=time.perf_counter() - t0,
        )
        payload = build_payload(request, config.endpoint, model, config.ignore_eos)
        task = asyncio.create_task(limited(payload, record))
        task.add_done_callback(lambda _: progress.update(1))
        records.append(record)
        tasks.append(task)

    timeout = None if math.isinf(limit) else max(0.0, t0 + limit - time.perf_counter())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - t0
    progress.close()
    for task in done:
        task.result()  # re-raise a bug rather than reporting it as a failed request
    for record in records:
        if record.status is RequestStatus.PENDING:
            record.status = RequestStatus.CANCELLED
    return records, t0, duration


async def run_benchmark_async(
    config: BenchConfig, requests: list[BenchRequest] | None = None
) -> BenchResult:
    """Run one benchmark; ``requests`` defaults to ``build_workload(config.workload)``."""
    if requests is None:
        requests = build_workload(config.workload)
    if not requests:
        raise ValueError("the workload produced no requests")
    limits = httpx.Limits(
        max_connections=config.max_concurrency or len(requests),
        max_keepalive_connections=config.max_concurrency or len(requests),
    )
    timeout = httpx.Timeout(config.request_timeout, connect=min(config.request_timeout, 30.0))
    async with httpx.AsyncClient(
        base_url=config.api_root, limits=limits, timeout=timeout
    ) as client:
        model = config.model or await fetch_default_model(client)
        started_at = time.time()
        records, t0, duration = await _drive(config, requests, client, model)
    failed = [r for r in records if r.status is RequestStatus.FAILED]
    if failed:
        logger.warning(
            "%d of %d requests failed; first: %s", len(failed), len(records), failed[0].error
        )
    tags = sorted({r.tag for r in records})
    by_tag: dict[str, BenchMetrics] = {}
    if len(tags) > 1:
        for tag in tags:
            tagged = [r for r in records if r.tag == tag]
            by_tag[tag] = compute_metrics(tagged, duration, config.slo)
    metrics = compute_metrics(records, duration, config.slo)
    return BenchResult(config, model, records, metrics, by_tag, t0=t0, started_at=started_at)


def run_benchmark(config: BenchConfig, requests: list[BenchRequest] | None = None) -> BenchResult:
    """Synchronous ``run_benchmark_async`` (runs its own event loop)."""
    return asyncio.run(run_benchmark_async(config, requests))


async def run_sweep_async(
    config: BenchConfig, rates: list[float], requests: list[BenchRequest] | None = None
) -> SweepResult:
    """Run the same requests at each rate, in the order given."""
    if not rates:
        raise ValueError("a sweep needs at least one request rate")
    if requests is None:
        requests = build_workload(config.workload)
    runs = []
    for rate in rates:
        run = await run_benchmark_async(dataclasses.replace(config, request_rate=rate), requests)
        logger.info(
            "rate %s req/s: SLO attainment %.3f, goodput %.3f req/s",
            rate,
            run.metrics.slo_attainment,
            run.metrics.request_goodput,
        )
        runs.append(run)
    return SweepResult(runs, config.goodput_fraction)


def run_sweep(
    config: BenchConfig, rates: list[float], requests: list[BenchRequest] | None = None
) -> SweepResult:
    """Synchronous ``run_sweep_async``."""
    return asyncio.run(run_sweep_async(config, rates, requests))
