"""The router's uvicorn server (``router.serve.make_server``): it wakes once a second where
uvicorn's loop wakes ten times, and not at all while no connection is open, keeps the Date
header fresh, and still stops at once when told to (its first SIGTERM drains first;
``tests/serving/test_drain.py`` sends a real one)."""

from __future__ import annotations

import asyncio
import email.utils
import signal
import time

import httpx
import uvicorn
from fastapi import FastAPI

from benchmarks._servers import free_port
from router.serve import make_server


def test_the_server_ticks_once_a_second_while_connected_and_stops_at_once_when_told() -> None:
    app = FastAPI()
    drained: list[float] = []

    async def drain(timeout_s: float) -> bool:
        drained.append(timeout_s)
        return True

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    app.state.drain = drain
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = make_server(app, config, drain_timeout_s=7.0)
    ticks: list[float] = []
    on_tick = server.on_tick

    async def counted_tick(counter: int) -> bool:
        ticks.append(time.monotonic())
        return await on_tick(counter)

    server.on_tick = counted_tick  # type: ignore[method-assign]

    async def scenario() -> float:
        serving = asyncio.create_task(server.serve())
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline, "the server did not start"
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient() as client:  # one keep-alive connection
                response = await client.get(f"http://127.0.0.1:{port}/ping")
                assert response.json() == {"ok": True}
                date = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
                assert abs(date - time.time()) < 5
                first = len(ticks)
                await asyncio.sleep(2.5)
                assert 2 <= len(ticks) - first <= 4  # uvicorn's own loop: ~25
            await asyncio.sleep(0.2)  # the connection closes
            first = len(ticks)
            await asyncio.sleep(2.5)
            assert len(ticks) - first <= 1  # no connection: it rests
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/ping")
            rested = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
            assert rested >= date + 2  # refreshed when the connection opened, not stale
            await asyncio.sleep(0.2)  # resting again, with no timeout at all
            told = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)  # the first: drains, then exits
            await asyncio.wait_for(asyncio.shield(serving), 10)
            return time.monotonic() - told
        finally:
            serving.cancel()

    stopped_after_s = asyncio.run(scenario())
    assert drained == [7.0]
    assert stopped_after_s < 0.5  # woken by should_exit, though resting
