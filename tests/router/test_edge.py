"""The router's edge over HTTP: API keys, body and request limits, 429 with Retry-After, and
an OpenAPI document that says what the routes take. uvicorn on loopback, the real engine
(``pdserve-tiny`` through ``ColocatedBackend``), httpx and the real ``openai`` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from router.api import RouterConfig
from router.limits import RequestLimits
from tests.router.test_api import LONG, MODEL, _serve

KEYS = ("sk-first", "sk-second")


def test_api_keys_guard_v1_and_leave_health_and_metrics_open() -> None:
    with _serve(RouterConfig(api_keys=KEYS)) as served:
        url = served.url
        for key in ("wrong", "sk-first-and-more"):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as info:
                client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert info.value.body["code"] == "invalid_api_key"
            assert key not in info.value.body["message"]
        missing = httpx.get(f"{url}/v1/models", timeout=10)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "invalid_request_error"
        for key in KEYS:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            answer = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert answer.usage.completion_tokens == 2
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert all(key not in metrics.text for key in KEYS)
        assert 'pdserve_requests_total{endpoint="completions",status="200"} 2.0' in metrics.text
        security = httpx.get(f"{url}/openapi.json", timeout=10).json()["components"]
        assert security["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_limits_body_size_and_429_with_retry_after() -> None:
    limits = RequestLimits(max_request_body_bytes=4096, max_completion_tokens=LONG, max_logprobs=2)
    with _serve(RouterConfig(max_concurrent_requests=1, limits=limits, retry_after_s=3)) as served:
        url = f"{served.url}/v1/completions"
        big = json.dumps({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1})
        declared = httpx.post(url, content=big, timeout=10)
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the server counts as the body arrives
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000].encode()

        streamed = httpx.post(url, content=chunked(), timeout=10)
        assert streamed.status_code == 413
        over = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "logprobs": 3}, timeout=10)
        assert over.status_code == 400 and over.json()["error"]["param"] == "logprobs"

        body = {"prompt": "x", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith('data: {"id"')
            refused = httpx.post(url, json={"prompt": "y", "max_tokens": 1}, timeout=10)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["code"] == "too_many_requests"
        served.wait_until_idle()
        metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
        assert 'pdserve_requests_total{endpoint="completions",status="413"} 2.0' in metrics


def test_openapi_declares_bodies_streams_and_metrics() -> None:
    with _serve(RouterConfig()) as served:
        doc = httpx.get(f"{served.url}/openapi.json", timeout=10).json()
    for path, model in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
    ):
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        ok = operation["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
        assert {"400", "401", "413", "429", "503"} <= set(operation["responses"])
        assert "security" not in operation  # no keys configured
    required = doc["components"]["schemas"]["ChatCompletionRequest"]["required"]
    assert "messages" in required
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_a_client_that_leaves_while_sending_its_body_is_a_499_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket
    import time
    from urllib.parse import urlparse

    with _serve(RouterConfig()) as served:
        address = urlparse(served.url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"prompt": "x", ')  # then hang up mid-body
        name = 'pdserve_requests_total{endpoint="completions",status="499"} 1.0'
        deadline = time.monotonic() + 10
        while name not in httpx.get(f"{served.url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the disconnect was not counted as a 499"
            time.sleep(0.05)
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    assert "Exception in ASGI application" not in caplog.text
