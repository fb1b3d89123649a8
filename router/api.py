"""The router's HTTP front door: an OpenAI-compatible FastAPI app over a ``ServingBackend``.

Routes translate and delegate (to ``OpenAIServing``); they hold no engine logic. Every error
is answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: invalid
input 400 (FastAPI's 422 included), unknown model 404, no capacity 429, backend down 503,
timeout 504. The app starts the backend on startup and shuts it down on shutdown.

A client that disconnects is noticed while streaming (Starlette cancels the stream) and
while a non-streamed request waits (``_cancel_on_disconnect``); either way the backend
requests are aborted (see ``router.generation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.backend import (
    AdmissionError,
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    ServingBackend,
)
from router.generation import RequestTimeoutError, SequenceAbortedError
from router.metrics import RouterMetrics
from router.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    validation_error_to_api_error,
)
from router.serving import AnyRequest, OpenAIServing

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away: metrics only
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP layer's settings (CLI flags of the same names)."""

    served_model_names: tuple[str, ...] = ()  # names clients may ask for; () = backend's name
    request_timeout_s: float | None = None  # per request, from arrival to the last token
    max_concurrent_requests: int | None = None  # generation requests in flight; beyond: 429

    def __post_init__(self) -> None:
        object.__setattr__(self, "served_model_names", tuple(self.served_model_names))
        if any(not name for name in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty, got {self.served_model_names}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests <= 0:
            raise ValueError(
                f"max_concurrent_requests must be positive, got {self.max_concurrent_requests}"
            )


def to_api_error(error: BaseException) -> APIError:
    """The HTTP answer for any exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    message = str(error)
    if isinstance(error, InvalidRequestError):
        return APIError(message)
    if isinstance(error, AdmissionError):
        return APIError(message, 429, "rate_limit_error", code="no_capacity")
    if isinstance(error, (BackendUnavailableError, SequenceAbortedError)):
        return APIError(message, 503, "service_unavailable")
    if isinstance(error, RequestTimeoutError):
        return APIError(message, 504, "timeout")
    if isinstance(error, BackendError):
        return APIError(message, 500, "server_error")
    logger.error("unexpected error while serving a request", exc_info=error)
    return APIError("internal server error", 500, "server_error")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_response().model_dump(), status_code=error.status_code)


class _Admission:
    """Counts generation requests in flight; refuses (429) beyond the configured maximum."""

    def __init__(self, limit: int | None, metrics: RouterMetrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.num_in_flight = 0

    def acquire(self) -> None:
        if self.limit is not None and self.num_in_flight >= self.limit:
            raise APIError(
                f"the server is at its limit of {self.limit} concurrent requests; retry later",
                429,
                "rate_limit_error",
                code="too_many_requests",
            )
        self.num_in_flight += 1
        self.metrics.requests_in_flight.set(self.num_in_flight)

    def release(self) -> None:
        self.num_in_flight -= 1
        self.metrics.requests_in_flight.set(self.num_in_flight)


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
    admission = _Admission(config.max_concurrent_requests, metrics)

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

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error_to_api_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(str(error.detail), error.status_code))

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(Exception)
    async def on_unexpected_error(_: Request, error: Exception) -> JSONResponse:
        return _error_response(to_api_error(error))  # logged there

    async def generate(raw: Request, request: AnyRequest, endpoint: str) -> Response:
        arrival_time = time.monotonic()
        try:
            model = serving.model_name(request.model)
            requests = serving.prepare(request, arrival_time)
            admission.acquire()
        except APIError as error:
            metrics.observe_request(endpoint, error.status_code)
            raise
        if request.stream:
            chunks = serving.stream(request, model, requests)
            return StreamingResponse(_sse(chunks, endpoint), media_type="text/event-stream")
        status = CLIENT_CLOSED_REQUEST  # unless an answer is made
        try:
            response = await _cancel_on_disconnect(raw, serving.respond(request, model, requests))
            if response is not None:
                status = 200
        except Exception as error:
            api_error = to_api_error(error)
            status = api_error.status_code
            return _error_response(api_error)
        finally:
            admission.release()
            metrics.observe_request(endpoint, status)
        if response is None:  # the client is gone: nobody reads this
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(response.model_dump())

    async def _sse(chunks: AsyncIterator[str], endpoint: str) -> AsyncIterator[str]:
        status = CLIENT_CLOSED_REQUEST  # unless the stream runs to its end
        try:
            async with contextlib.aclosing(chunks):
                try:
                    async for chunk in chunks:
                        yield f"data: {chunk}\n\n"
                    status = 200
                except Exception as error:
                    api_error = to_api_error(error)
                    status = api_error.status_code
                    yield f"data: {api_error.to_response().model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            admission.release()
            metrics.observe_request(endpoint, status)

    async def parse(raw: Request, model: type[R]) -> R:
        """The body as ``model``; JSON whatever the Content-Type says, as OpenAI accepts."""
        try:
            return model.model_validate_json(await raw.body())
        except ValidationError as error:
            metrics.observe_request(_ENDPOINTS[raw.url.path], 400)
            raise validation_error_to_api_error(error) from error

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        request = await parse(raw, CompletionRequest)
        return await generate(raw, request, _ENDPOINTS["/v1/completions"])

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        request = await parse(raw, ChatCompletionRequest)
        return await generate(raw, request, _ENDPOINTS["/v1/chat/completions"])

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=name, max_model_len=backend.max_model_len)
                for name in served_model_names
            ]
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            details = await backend.check_health()
        except BackendUnavailableError as error:
            return _error_response(to_api_error(error))
        return JSONResponse({"status": "ok", **details})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
