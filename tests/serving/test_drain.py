"""SIGTERM drains a real ``pdserve serve``: the stream in flight ends normally, new requests
and ``/health`` get 503 meanwhile, then the server exits 0 and its whole process tree (Ray
included) is gone. The signal is a real one, sent by PID."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmarks._servers import (
    descendant_pids,
    free_port,
    is_alive,
    start_pdserve,
    stop_server,
    wait_ready,
)
from router.api import _Admission
from router.metrics import RouterMetrics

OUTPUT_TOKENS = 600


@pytest.mark.timeout(300)
def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    server = start_pdserve(
        free_port(),
        tmp_path / "pdserve.log",
        colocated=True,
        extra_args=("--drain-timeout-s", "120"),
    )
    tree: list[int] = []
    try:
        wait_ready(server, timeout_s=180.0)
        tree = descendant_pids(server.pid)
        url = server.base_url
        body = {
            "prompt": "drain me",
            "max_tokens": OUTPUT_TOKENS,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith('data: {"id"')
            os.kill(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while (health := httpx.get(f"{url}/health", timeout=10)).status_code != 503:
                assert time.monotonic() < deadline, "/health never reported draining"
                time.sleep(0.05)
            assert health.json()["status"] == "draining"
            assert health.json()["num_requests_in_flight"] == 1
            refused = httpx.post(
                f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "draining"
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert "error" not in chunks[-1]
        assert chunks[-1]["usage"]["completion_tokens"] == OUTPUT_TOKENS
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=60) == 0
    finally:
        killed = stop_server(server)
    assert not [pid for pid in tree if is_alive(pid)], "processes of the server outlived it"
    assert killed == [], f"processes had to be killed after the server exited: {killed}"


def test_drain_gives_up_after_its_timeout() -> None:
    async def scenario() -> tuple[bool, bool]:
        admission = _Admission(None, 1, RouterMetrics())
        admission.acquire()
        timed_out = await admission.drain(0.05)
        admission.release()
        return timed_out, await admission.drain(0.05)

    assert asyncio.run(scenario()) == (False, True)
