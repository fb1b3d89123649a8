"""The contract between the HTTP layer and a serving backend.

The router's API layer speaks OpenAI; a backend speaks token ids. The API layer tokenizes,
builds one ``GenerateRequest`` per sequence (``n == 1``: it fans out ``n > 1`` itself), and
consumes the ``RequestDelta`` stream that ``generate`` yields, until a delta carries a
``finish_reason``. Backends: disaggregated (a prefill worker + a decode worker on Ray) or
colocated (one engine). Workers never see text.

Lifecycle: the app calls ``start()`` on startup and ``shutdown()`` on shutdown. A request
ends early (client disconnect, a stop string, the request timeout) by closing or cancelling
the ``generate`` stream: the backend's request scope (the stream's ``finally``) then aborts it
on its workers, the one abort owner on the router side. ``abort(request_id)`` does the same
from outside the stream; aborting an unknown or finished request is a no-op.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One sequence to generate. Set by the API layer."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # n == 1 here: the API layer fans out n > 1 itself
    arrival_time: float  # time.monotonic() when the HTTP request arrived


class ServingBackend(Protocol):
    model_name: str
    max_model_len: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        """An async generator of deltas; the last one has ``finish_reason`` set."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> dict[str, Any]:
        """Details for ``GET /health``; raises ``BackendUnavailableError`` when unhealthy."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


class BackendError(Exception):
    """Base of the errors a backend raises; the message is safe to show a user."""


class AdmissionError(BackendError):
    """No KV room or the queue is full: HTTP 429."""


class BackendUnavailableError(BackendError):
    """No healthy workers: HTTP 503."""


class InvalidRequestError(BackendError):
    """The request cannot be served as asked (e.g. prompt longer than max_model_len): HTTP 400."""


__all__ = [
    "AdmissionError",
    "BackendError",
    "BackendUnavailableError",
    "GenerateRequest",
    "InvalidRequestError",
    "ServingBackend",
]
