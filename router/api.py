"""The router's HTTP front door: an OpenAI-compatible FastAPI app over a ``ServingBackend``.

Routes translate and delegate (to ``OpenAIServing``); they hold no engine logic. Every error
is answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: invalid
input 400 (FastAPI's 422 included), unknown model 404, no capacity 429, backend down 503,
timeout 504. The app starts the backend on startup and shuts it down on shutdown.

Before any work a request passes, in order: the API key (``router.auth``; 401), the body size
and the per-request limits (``router.limits``; 413/400), the drain state (503 while draining)
and the concurrency limit (429). Every 429 and 503 carries ``Retry-After``. Errors of the
backend's own making reach the client as a fixed sentence per kind; the details (worker
addresses, Ray's error text) go to the log only.

Draining (``drain``, on SIGTERM through ``pdserve serve``): new generation requests get 503
and ``/health`` reports ``draining`` (503), so load balancers stop sending; requests in
flight run to their end, up to a grace period.

A client that disconnects is noticed while streaming (``EventStreamResponse`` cancels the
stream) and while a non-streamed request waits (``_cancel_on_disconnect``); either way the
backend requests are aborted (see ``router.generation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from router.auth import APIKeyAuth
from router.backend import (
    AdmissionError,
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    ServingBackend,
)
from router.generation import RequestTimeoutError, SequenceAbortedError
from router.limits import RequestLimits
from router.metrics import RouterMetrics
from router.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    validation_error_to_api_error,
)
from router.schema import document_api
from router.serving import AnyRequest, OpenAIServing

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away: metrics only
# The line breaks of Python's str.splitlines() (and so of httpx's aiter_lines) that JSON
# leaves raw: SSE ends a line at CR or LF only, but a client reading lines that way would cut
# an event holding one of these in two. Escaped, the JSON means the same.
_RAW_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP layer's settings (CLI flags of the same names)."""

    served_model_names: tuple[str, ...] = ()  # names clients may ask for; () = backend's name
    request_timeout_s: float | None = None  # per request, from arrival to the last token
    max_concurrent_requests: int | None = None  # generation requests in flight; beyond: 429
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # () = no key needed; never logged
    limits: RequestLimits = field(default_factory=RequestLimits)
    retry_after_s: int = 1  # the Retry-After of every 429 and 503

    def __post_init__(self) -> None:
        object.__setattr__(self, "served_model_names", tuple(self.served_model_names))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys must not contain an empty key")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must not be negative, got {self.retry_after_s}")
        if any(not name for name in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty, got {self.served_model_names}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests <= 0:
            raise ValueError(
                f"max_concurrent_requests must be positive, got {self.max_concurrent_requests}"
            )


def to_api_error(error: BaseException, retry_after_s: int = 1) -> APIError:
    """The HTTP answer for any exception raised while serving a request.

    Client errors keep their message. A failure of the cluster's own (a worker died, none is
    healthy) is answered with a fixed sentence: its text can name actors, addresses or carry
    a remote traceback, so it goes to the log only.
    """
    if isinstance(error, APIError):
        return error
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(error, InvalidRequestError):
        return APIError(str(error))
    if isinstance(error, AdmissionError):
        return APIError(str(error), 429, "rate_limit_error", code="no_capacity", headers=retry)
    if isinstance(error, RequestTimeoutError):
        return APIError(str(error), 504, "timeout")
    if isinstance(error, (BackendUnavailableError, SequenceAbortedError)):
        logger.warning("request failed: %s: %s", type(error).__name__, error)
        return APIError(
            "The server could not complete the request: a worker failed or none is available. "
            "Retry later.",
            503,
            "service_unavailable",
            code="backend_unavailable",
            headers=retry,
        )
    if isinstance(error, BackendError):
        logger.error("request failed: %s: %s", type(error).__name__, error)
        return APIError("The server failed to complete the request.", 500, "server_error")
    logger.error("unexpected error while serving a request", exc_info=error)
    return APIError("internal server error", 500, "server_error")


def sse_event(data: str) -> str:
    """One JSON document as one server-sent event, read as one line by every client."""
    if not data.isascii():
        data = data.translate(_RAW_LINE_BREAKS)
    return f"data: {data}\n\n"


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error.to_response().model_dump(), status_code=error.status_code, headers=error.headers
    )


class _Admission:
    """Counts generation requests in flight; refuses beyond the configured maximum (429) and
    while draining (503). ``drain`` waits for the requests in flight to end."""

    def __init__(self, limit: int | None, retry_after_s: int, metrics: RouterMetrics) -> None:
        self.limit = limit
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.metrics = metrics
        self.num_in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        if self.draining:
            raise APIError(
                "The server is shutting down and accepts no new requests.",
                503,
                "service_unavailable",
                code="draining",
                headers=self.retry_after,
            )
        if self.limit is not None and self.num_in_flight >= self.limit:
            raise APIError(
                f"the server is at its limit of {self.limit} concurrent requests; retry later",
                429,
                "rate_limit_error",
                code="too_many_requests",
                headers=self.retry_after,
            )
        self.num_in_flight += 1
        self._idle.clear()
        self.metrics.requests_in_flight.set(self.num_in_flight)

    def release(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()
        self.metrics.requests_in_flight.set(self.num_in_flight)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests from now on; True when those in flight ended within the time."""
        self.draining = True
        logger.info(
            "draining: %d request(s) in flight, up to %.0f s", self.num_in_flight, timeout_s
        )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("drain timed out with %d request(s) in flight", self.num_in_flight)
            return False
        return True


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response of ``chunks`` (JSON documents, one event each, then
    ``[DONE]``) that runs in the request's own task and cancels that task when the client
    disconnects. An error raised by ``chunks`` becomes an error event; ``on_end`` gets the
    status to count (200, the error's, or ``CLIENT_CLOSED_REQUEST``) once the stream ends.

    Starlette's ``StreamingResponse`` does the same with an anyio task group of two tasks
    per response (uvicorn speaks ASGI 2.3), ~0.2 ms of CPU a request; one plain asyncio
    task watching ``receive`` costs ~0.02 ms. The SSE framing is done here, in the loop that
    sends, not in a generator layer of its own: every layer is paid again for every token.
    A disconnect ends the response quietly, as Starlette's does: the cancellation unwinds
    the stream (its ``finally`` blocks abort the backend requests) and is absorbed here,
    never left counted on the task.
    """

    media_type = "text/event-stream"

    def __init__(
        self, chunks: AsyncIterator[str], on_end: Callable[[int], None], retry_after_s: int
    ) -> None:
        super().__init__(chunks)
        self.on_end = on_end
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not disconnected:
                raise
            task.uncancel()
        except OSError:
            raise ClientDisconnect() from None
        finally:
            watcher.cancel()

    async def stream_response(self, send: Any) -> None:
        status = CLIENT_CLOSED_REQUEST  # unless the stream runs to its end
        chunks = self.body_iterator
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                try:
                    async for chunk in chunks:
                        body = sse_event(chunk).encode()  # type: ignore[arg-type]
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    status = 200
                except Exception as error:
                    api_error = to_api_error(error, self.retry_after_s)
                    status = api_error.status_code
                    body = sse_event(api_error.to_response().model_dump_json()).encode()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            done = b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": done, "more_body": False})
        finally:
            self.on_end(status)


async def _cancel_on_disconnect(raw: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``, cancelling it if the client disconnects first (then returns None)."""
    work_task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    disconnect_task = asyncio.create_task(wait_for_disconnect())
    try:
        await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not work_task.done():
            work_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work_task
    return None if work_task.cancelled() else work_task.result()


def build_app(
    backend: ServingBackend,
    tokenizer: Any,
    config: RouterConfig | None = None,
    metrics: RouterMetrics | None = None,
) -> FastAPI:
    """The app; pass ``metrics`` when the backend reports into the same ``RouterMetrics``."""
    config = config or RouterConfig()
    metrics = metrics or RouterMetrics()
    served_model_names = config.served_model_names or (backend.model_name,)
    serving = OpenAIServing(
        backend, tokenizer, metrics, served_model_names, config.request_timeout_s
    )
    admission = _Admission(config.max_concurrent_requests, config.retry_after_s, metrics)
    auth = APIKeyAuth(config.api_keys)
    limits = config.limits

    async def require_api_key(raw: Request) -> None:
        auth.verify(raw.headers.get("authorization"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.shutdown()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.drain = admission.drain  # await app.state.drain(timeout_s): see `pdserve serve`
    app.state.auth_required = auth.enabled

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error_to_api_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(str(error.detail), error.status_code))

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(raw: Request, _: ClientDisconnect) -> Response:
        # The client left while its body was arriving: nobody reads this answer.
        if raw.url.path in _ENDPOINTS:
            metrics.observe_request(_ENDPOINTS[raw.url.path], CLIENT_CLOSED_REQUEST)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def on_unexpected_error(_: Request, error: Exception) -> JSONResponse:
        return _error_response(to_api_error(error, config.retry_after_s))  # logged there

    async def generate(raw: Request, request: AnyRequest, endpoint: str) -> Response:
        arrival_time = time.monotonic()
        try:
            limits.check_request(request)
            model = serving.model_name(request.model)
            requests = serving.prepare(request, arrival_time)
            limits.check_prompts(
                [len(r.prompt_token_ids) for r in requests[:: request.n]], request.n
            )
            admission.acquire()
        except APIError as error:
            metrics.observe_request(endpoint, error.status_code)
            raise
        if request.stream:
            chunks = serving.stream(request, model, requests)

            def on_end(status: int) -> None:
                admission.release()
                metrics.observe_request(endpoint, status)

            return EventStreamResponse(chunks, on_end, config.retry_after_s)
        status = CLIENT_CLOSED_REQUEST  # unless an answer is made
        try:
            response = await _cancel_on_disconnect(raw, serving.respond(request, model, requests))
            if response is not None:
                status = 200
        except Exception as error:
            api_error = to_api_error(error, config.retry_after_s)
            status = api_error.status_code
            return _error_response(api_error)
        finally:
            admission.release()
            metrics.observe_request(endpoint, status)
        if response is None:  # the client is gone: nobody reads this
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(response.model_dump())

    async def read_body(raw: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit: never held whole if larger."""
        declared = raw.headers.get("content-length", "")
        if declared.isdigit():
            limits.check_body_size(int(declared))
        body = bytearray()
        async for piece in raw.stream():
            body += piece
            limits.check_body_size(len(body))
        return bytes(body)

    async def parse(raw: Request, model: type[R]) -> R:
        """The body as ``model``; JSON whatever the Content-Type says, as OpenAI accepts."""
        try:
            return model.model_validate_json(await read_body(raw))
        except ValidationError as error:
            metrics.observe_request(_ENDPOINTS[raw.url.path], 400)
            raise validation_error_to_api_error(error) from error
        except APIError as error:
            metrics.observe_request(_ENDPOINTS[raw.url.path], error.status_code)
            raise

    authorized = [Depends(require_api_key)]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(raw: Request) -> Response:
        request = await parse(raw, CompletionRequest)
        return await generate(raw, request, _ENDPOINTS["/v1/completions"])

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(raw: Request) -> Response:
        request = await parse(raw, ChatCompletionRequest)
        return await generate(raw, request, _ENDPOINTS["/v1/chat/completions"])

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=name, max_model_len=backend.max_model_len)
                for name in served_model_names
            ]
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if admission.draining:
            body = {"status": "draining", "num_requests_in_flight": admission.num_in_flight}
            return JSONResponse(body, status_code=503, headers=admission.retry_after)
        try:
            details = await backend.check_health()
        except BackendUnavailableError as error:
            return _error_response(to_api_error(error, config.retry_after_s))
        return JSONResponse({"status": "ok", **details})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    document_api(app, auth.enabled)
    return app
