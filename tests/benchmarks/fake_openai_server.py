"""A real, minimal OpenAI-compatible streaming server for the bench tests.

``/v1/completions`` and ``/v1/chat/completions`` stream ``max_tokens`` tokens with fixed
sleeps (SSE, ``usage`` in a last chunk when asked for), and record what arrived and when each
chunk was sent. ``start_fake_server`` serves it with uvicorn on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"
REJECTED_MAX_TOKENS = 13  # the fake server answers 400 to requests asking for this many


@dataclass
class ServedRequest:
    body: dict[str, Any]
    received_at: float  # time.perf_counter() in this process, comparable with the client's
    chunk_sent_at: list[float] = field(default_factory=list)  # one per content chunk


@dataclass
class FakeServer:
    url: str
    first_token_delay: float = 0.02  # after the request arrives (and after a chat role chunk)
    token_delay: float = 0.005  # between content chunks
    slow_down_per_active: bool = False  # token_delay is multiplied by the number of streams
    tokens_per_chunk: int = 1
    send_usage: bool = True  # honour stream_options.include_usage
    # "error_event", "no_done" or "no_content": a broken stream; "no_text": a stream whose
    # tokens decode to no text (no content chunk, usage counts them); "raw_line_breaks": text
    # with U+2028 and U+0085 left raw in its JSON (valid SSE, as a server may send it)
    fault: str | None = None
    served: list[ServedRequest] = field(default_factory=list)
    active: int = 0
    peak_active: int = 0

    def served_for(self, prompt: Any) -> ServedRequest:
        (match,) = [s for s in self.served if s.body.get("prompt") == prompt]
        return match


def _prompt_tokens(body: dict[str, Any]) -> int:
    if isinstance(body.get("prompt"), list):
        return len(body["prompt"])
    text = body.get("prompt") or " ".join(m["content"] for m in body["messages"])
    return len(text.split())


def _make_app(server: FakeServer) -> FastAPI:
    app = FastAPI()

    async def stream(served: ServedRequest, chat: bool) -> AsyncIterator[str]:
        body = served.body
        num_tokens = body["max_tokens"]
        server.active += 1
        server.peak_active = max(server.peak_active, server.active)
        try:
            yield ": an SSE comment, which clients ignore\n\n"
            if server.fault == "error_event":
                yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                return
            if server.fault == "no_content":
                num_tokens = 0
            if chat:  # like vLLM: a role-only first chunk, which carries no content
                yield "data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]})
                yield "\n\n"
            await asyncio.sleep(server.first_token_delay)
            sent = 0
            raw = server.fault == "raw_line_breaks"
            while sent < num_tokens and server.fault != "no_text":
                if sent:
                    scale = server.active if server.slow_down_per_active else 1
                    await asyncio.sleep(server.token_delay * scale)
                n = min(server.tokens_per_chunk, num_tokens - sent)
                text = "".join(f" t{sent + i}" for i in range(n)) + ("\u2028\x85" if raw else "")
                choice = {"delta": {"content": text}} if chat else {"text": text}
                choice |= {
                    "index": 0,
                    "finish_reason": "length" if sent + n == num_tokens else None,
                }
                served.chunk_sent_at.append(time.perf_counter())
                yield f"data: {json.dumps({'choices': [choice]}, ensure_ascii=not raw)}\n\n"
                sent += n
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if server.send_usage and wants_usage:
                usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": num_tokens}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            if server.fault != "no_done":
                yield "data: [DONE]\n\n"
        finally:
            server.active -= 1

    async def handle(request: Request, chat: bool) -> Any:
        received_at = time.perf_counter()
        body = await request.json()
        served = ServedRequest(body, received_at)
        server.served.append(served)
        if body.get("max_tokens") == REJECTED_MAX_TOKENS:
            error = {"message": "max_tokens rejected", "type": "BadRequestError", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        return StreamingResponse(stream(served, chat), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


def start_fake_server() -> tuple[FakeServer, uvicorn.Server, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = FakeServer(url=f"http://127.0.0.1:{port}")
    uv = uvicorn.Server(
        uvicorn.Config(_make_app(server), log_level="warning", lifespan="off", access_log=False)
    )
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    return server, uv, thread


def stop_fake_server(uv: uvicorn.Server, thread: threading.Thread) -> None:
    uv.should_exit = True
    thread.join(timeout=10.0)
