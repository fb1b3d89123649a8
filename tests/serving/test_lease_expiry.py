"""KV that does not land before the decode worker's lease ends (a prompt that waited too long
in a prefill queue) is prefilled again and answered exactly; with no migration left
(``--max-migrations 0``) it is a 503 with Retry-After (an ``error`` event in a stream), never a
500; either way nothing leaks. 1P1D over gRPC on Ray with a lease too short for any remote
prefill to finish in."""

from __future__ import annotations

import json

import httpx

from tests.serving.conftest import MODEL, Offline, Server, complete, serve, words

ARGV = ["--num-prefill", "1", "--num-decode", "1", "--local-prefill-threshold", "0"]
ARGV += ["--kv-lease-s", "0.001"]


def test_kv_past_its_lease_is_prefilled_again(local_ray: None, offline: Offline) -> None:
    with serve(ARGV) as server:
        prompt = words(8, 300)
        ids = offline.completion_ids(prompt)
        expected = offline.greedy(ids, 8)
        for stream in (False, True):
            complete(server.client(), prompt, 8, stream).check(expected, len(ids))
        assert server.metric("pdserve_request_migrations_total", reason="kv_failed") >= 2
        server.wait_idle()


def test_kv_past_its_lease_with_no_migration_left_is_a_503(local_ray: None) -> None:
    with serve([*ARGV, "--max-migrations", "0"]) as server:
        _check_503(server)


def _check_503(server: Server) -> None:
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
    # Before the error event, the open choice ends with finish_reason "error".
    (last,) = json.loads(events[-3].removeprefix("data: "))["choices"]
    assert (last["finish_reason"], last["text"]) == ("error", "")
    assert server.metric("pdserve_prefill_decisions_total", decision="remote") >= 2
    assert server.metric("pdserve_request_migrations_total", reason="exhausted") == 2
    server.wait_idle()  # nothing reserved, pinned or running on either worker
