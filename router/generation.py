"""Driving a backend for one HTTP request: fan out ``n`` sequences, detokenize, stop, abort.

Every sequence of a request (``n`` per prompt) is one ``GenerateRequest`` to the backend.
One sequence is read directly; several are consumed by one task each, feeding one queue
that ``stream_sequences`` yields from as ``SequenceUpdate``s, in arrival order. A sequence
ends when the backend finishes it, when a stop string appears in its text, or when it is
cut short. Cutting it short (a stop string, the client going away: the consumer is
cancelled or closed, the request timeout, an error in a sibling sequence) closes the
backend's stream, and the backend's request scope aborts it on the workers. A backend
"abort" finish (a worker died) is an error, never a successful answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.detokenizer import OutputText
from engine.outputs import RequestDelta
from engine.request import FinishReason
from engine.scheduler_output import TokenLogprobs
from router.backend import BackendError, GenerateRequest, ServingBackend
from router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

# Producer tasks that were cancelled keep running until their abort() returns: hold them.
_background_tasks: set[asyncio.Task] = set()


class SequenceAbortedError(BackendError):
    """The backend aborted a sequence on its own (e.g. its worker died)."""


class RequestTimeoutError(BackendError):
    """The request ran past the router's ``request_timeout_s``."""


@dataclass(slots=True)
class SequenceUpdate:
    """New output of one sequence. ``finish_reason`` ("stop" or "length") on its last one."""

    index: int  # the choice index: prompt_index * n + i
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_cached_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Sequence:
    """The router-side state of one sequence: detokenizer, stop strings, timing."""

    def __init__(self, index: int, request: GenerateRequest, tokenizer: Any) -> None:
        params = request.sampling_params
        self.index = index
        self.request = request
        self.output_text = OutputText(tokenizer, params)
        self.num_output_tokens = 0
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_cached_tokens = 0
        self.last_token_time: float | None = None

    def absorb(self, delta: RequestDelta, metrics: RouterMetrics) -> SequenceUpdate:
        now = time.monotonic()
        if delta.new_token_ids:
            if self.last_token_time is None:
                metrics.time_to_first_token.observe(now - self.request.arrival_time)
            else:
                metrics.inter_token_latency.observe(now - self.last_token_time)
            self.last_token_time = now
        self.num_output_tokens += len(delta.new_token_ids)
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        text = self.output_text.add(delta)
        return SequenceUpdate(
            index=self.index,
            text=text.text,
            token_ids=list(delta.new_token_ids),
            logprobs=delta.new_logprobs,
            finish_reason=text.finish_reason,
            stop_reason=text.stop_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
        )

    def finish(self, finish_reason: str, metrics: RouterMetrics) -> None:
        last = self.last_token_time
        metrics.observe_sequence_finished(
            finish_reason,
            self.num_prompt_tokens,
            self.num_cached_tokens,
            self.num_output_tokens,
            None if last is None else last - self.request.arrival_time,
        )


async def _sequence_updates(
    backend: ServingBackend, sequence: _Sequence, metrics: RouterMetrics
) -> AsyncIterator[SequenceUpdate]:
    """One sequence's updates, until it finishes. Ending it early (a stop string, the
    consumer closing or cancelling, an error) closes the backend's stream, whose scope
    aborts the request on its workers: the one abort owner on the router side."""
    request_id = sequence.request.request_id
    finish_reason = "error"  # replaced when the sequence ends normally
    try:
        async with contextlib.aclosing(backend.generate(sequence.request)) as deltas:
            async for delta in deltas:
                if delta.finish_reason is FinishReason.ABORT:
                    finish_reason = "abort"
                    raise SequenceAbortedError(f"request {request_id} was aborted by its worker")
                update = sequence.absorb(delta, metrics)
                if update.finish_reason is not None:
                    finish_reason = update.finish_reason
                    yield update
                    return
                yield update
        raise BackendError(f"the backend ended request {request_id} without finishing it")
    except (asyncio.CancelledError, GeneratorExit):
        if finish_reason == "error":
            finish_reason = "cancelled"
        raise
    finally:
        sequence.finish(finish_reason, metrics)


async def _merged(sources: list[AsyncIterator[SequenceUpdate]]) -> AsyncIterator[SequenceUpdate]:
    """Several sequences' updates in arrival order (``n`` > 1, or several prompts): one task
    per sequence feeds one queue. The first error is raised; leaving early cancels the
    unfinished sequences (each then closes its backend stream)."""
    queue: asyncio.Queue[SequenceUpdate | Exception] = asyncio.Queue()

    async def pump(source: AsyncIterator[SequenceUpdate]) -> None:
        try:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for update in source:
                    queue.put_nowait(update)
        except Exception as error:  # raised to the consumer below
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    num_unfinished = len(tasks)
    try:
        while num_unfinished:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                num_unfinished -= 1
            yield item
    finally:
        for task in tasks:
            if not task.done():  # cut short: cancelled; held until its abort went out
                task.cancel()
                _background_tasks.add(task)
                task.add_done_callback(_background_tasks.discard)


def stream_sequences(
    backend: ServingBackend,
    requests: list[GenerateRequest],
    tokenizer: Any,
    metrics: RouterMetrics,
    timeout_s: float | None = None,
) -> AsyncIterator[SequenceUpdate]:
    """Run ``requests`` concurrently (``requests[i]`` is choice ``i``) and yield their updates.

    One sequence (the common case) is read directly: no task, no queue between the
    backend's stream and the caller, and with no timeout not even a layer of its own (each
    layer of async generators is paid again for every token). Raises the first error of
    any sequence, or ``RequestTimeoutError``; either way, and when the caller stops early,
    every unfinished backend request is aborted.
    """
    sources = [
        _sequence_updates(backend, _Sequence(i, request, tokenizer), metrics)
        for i, request in enumerate(requests)
    ]
    updates = sources[0] if len(sources) == 1 else _merged(sources)
    if timeout_s is None:
        return updates
    return _within(updates, timeout_s)


async def _within(
    updates: AsyncIterator[SequenceUpdate], timeout_s: float
) -> AsyncIterator[SequenceUpdate]:
    """``updates`` until they end or ``timeout_s`` passes (``RequestTimeoutError``)."""
    async with contextlib.aclosing(updates):  # type: ignore[type-var]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # around the wait, not the yield
                    update = await anext(updates)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request did not finish within {timeout_s} seconds"
                ) from None
            yield update
