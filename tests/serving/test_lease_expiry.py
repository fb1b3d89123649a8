"""KV that does not land before the decode worker's lease ends (a prompt that waited too long
in a prefill queue) is a 503 with Retry-After, never a 500, and leaks nothing. 1P1D over
gRPC on Ray with a lease too short for any remote prefill to finish in."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.conftest import MODEL, Server, serve, words


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[Server]:
    argv = ["--num-prefill", "1", "--num-decode", "1", "--local-prefill-threshold", "0"]
    with serve([*argv, "--kv-lease-s", "0.001"]) as running:
        yield running


def test_kv_past_its_lease_is_a_503_with_retry_after(server: Server) -> None:
    body = {"model": MODEL, "prompt": words(7, 300), "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    error = answer.json()["error"]
    assert error["type"] == "service_unavailable" and "Retry later" in error["message"]
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == ("backend_unavailable")
    assert server.metric("pdserve_prefill_decisions_total", decision="remote") >= 2
    server.wait_idle()  # nothing reserved, pinned or running on either worker
