"""Driving a backend for one HTTP request: fan out ``n`` sequences, detokenize, stop, abort.

Every sequence of a request (``n`` per prompt) is one ``GenerateRequest`` to the backend,
consumed by its own task; the tasks feed one queue that ``stream_sequences`` yields from as
``SequenceUpdate``s, in arrival order. A sequence ends when the backend finishes it, when a
stop string appears in its text, or when it is aborted. The backend request is aborted
(``backend.abort``) whenever a sequence ends before the backend finished it: a stop string,
the client going away (the consumer is cancelled or closed), the request timeout, or an
error in a sibling sequence. A backend "abort" finish (a worker died) is an error, never a
successful answer.
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


@dataclass(frozen=True)
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


async def _run_sequence(
    backend: ServingBackend,
    sequence: _Sequence,
    queue: asyncio.Queue[SequenceUpdate | Exception],
    metrics: RouterMetrics,
) -> None:
    """Feed one sequence's updates into ``queue``; abort the backend request if cut short."""
    request_id = sequence.request.request_id
    backend_finished = False
    finish_reason = "error"  # replaced when the sequence ends normally
    try:
        async with contextlib.aclosing(backend.generate(sequence.request)) as deltas:
            async for delta in deltas:
                backend_finished = delta.finished
                if delta.finish_reason is FinishReason.ABORT:
                    finish_reason = "abort"
                    raise SequenceAbortedError(f"request {request_id} was aborted by its worker")
                update = sequence.absorb(delta, metrics)
                await queue.put(update)
                if update.finish_reason is not None:
                    finish_reason = update.finish_reason
                    return
        raise BackendError(f"the backend ended request {request_id} without finishing it")
    except asyncio.CancelledError:
        finish_reason = "cancelled"
        raise
    except Exception as error:  # raised to the consumer by stream_sequences
        await queue.put(error)
    finally:
        sequence.finish(finish_reason, metrics)
        if not backend_finished:
            # Shielded: the consumer may cancel this task while the abort is on its way.
            await asyncio.shield(backend.abort(request_id))


async def stream_sequences(
    backend: ServingBackend,
    requests: list[GenerateRequest],
    tokenizer: Any,
    metrics: RouterMetrics,
    timeout_s: float | None = None,
) -> AsyncIterator[SequenceUpdate]:
    """Run ``requests`` concurrently (``requests[i]`` is choice ``i``) and yield their updates.

    Raises the first error of any sequence, or ``RequestTimeoutError``; either way, and when
    the caller stops early, every unfinished backend request is aborted.
    """
    queue: asyncio.Queue[SequenceUpdate | Exception] = asyncio.Queue()
    tasks = [
        asyncio.create_task(
            _run_sequence(backend, _Sequence(i, request, tokenizer), queue, metrics)
        )
        for i, request in enumerate(requests)
    ]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    num_unfinished = len(tasks)
    try:
        while num_unfinished:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(
                    f"the request did not finish within {timeout_s} seconds"
                ) from None
            if isinstance(item, Exception):
                raise item
            if item.finished:
                num_unfinished -= 1
            yield item
    finally:
        for task in tasks:
            if not task.done():  # cut short (cancelled below), or finishing its abort
                if num_unfinished:
                    task.cancel()
                _background_tasks.add(task)
                task.add_done_callback(_background_tasks.discard)
