"""Fuzzing the router from its own OpenAPI document with schemathesis: valid and invalid
bodies for every route, against a live server (uvicorn on loopback, the real engine). No
answer may be a 5xx, every error must be OpenAI-shaped, and the server must be healthy and
idle afterwards. Bounded: a fixed number of cases per route, short generations (limits)."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

from router.api import RouterConfig
from router.limits import RequestLimits
from tests.router.test_api import _serve

CASES_PER_ROUTE = 100
LIMITS = RequestLimits(
    max_request_body_bytes=64 * 1024,
    max_num_seqs_per_request=4,
    max_prompt_tokens=256,
    max_completion_tokens=8,
)


def test_no_5xx_under_fuzzing() -> None:
    with _serve(RouterConfig(request_timeout_s=60.0, limits=LIMITS)) as served:
        schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {
            "POST /v1/completions",
            "POST /v1/chat/completions",
            "GET /v1/models",
            "GET /health",
            "GET /metrics",
        }
        seen: dict[str, list[int]] = {}
        for operation in operations:
            # A route without a body or parameters has no invalid input to make.
            has_input = bool(list(operation.body)) or bool(list(operation.iter_parameters()))
            modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * has_input
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode)

                @settings(
                    max_examples=CASES_PER_ROUTE // 2,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=strategy)
                def call(case) -> None:
                    response = case.call(base_url=served.url, timeout=60)
                    seen.setdefault(case.operation.label, []).append(response.status_code)
                    assert response.status_code < 500, (
                        f"{case.method} {case.path} -> {response.status_code}: "
                        f"{response.text[:500]}\nbody: {case.body!r}"
                    )
                    if response.status_code >= 400:
                        error = response.json()["error"]
                        assert isinstance(error["message"], str) and error["type"]

                began = time.monotonic()
                call()
                print(f"fuzz: {operation.label} {mode.value}: {time.monotonic() - began:.1f} s")
        served.wait_until_idle(timeout_s=30)
        health = httpx.get(f"{served.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        num_cases = sum(len(codes) for codes in seen.values())
        generation = seen["POST /v1/completions"] + seen["POST /v1/chat/completions"]
        for label, codes in seen.items():
            print(f"fuzz: {label}: {len(codes)} cases, statuses {sorted(set(codes))}")
        assert num_cases >= 2 * CASES_PER_ROUTE  # the bound was used, not skipped
        assert 200 in generation and 400 in generation  # valid and invalid bodies both ran


pytestmark = pytest.mark.timeout(600)
