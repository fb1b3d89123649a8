"""End to end over HTTP: uvicorn on loopback, the real engine (``pdserve-tiny`` through
``ColocatedBackend``), and the real ``openai`` client.

pdserve-tiny has random weights, so texts are gibberish: tests compare the server with itself
(greedy reruns, seeds, stop strings cut from an earlier output) and check token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from engine.llm import LLM
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer
from router.api import RouterConfig, build_app, sse_event
from router.backends.colocated import ColocatedBackend
from router.metrics import RouterMetrics

MODEL = "pdserve-tiny"
MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT_S = 120.0
# Requests that would run for many seconds on CPU unless aborted: a backend that is not
# aborted still holds them when ``Served.wait_until_idle`` gives up.
LONG = 1900
ABORT_TIMEOUT_S = 4.0


def _engine_config() -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=MODEL, max_model_len=MAX_MODEL_LEN),
        cache=CacheConfig(block_size=4, num_gpu_blocks_override=1200),
        parallel=ParallelConfig(device="cpu"),
    )


@dataclass(frozen=True)
class Served:
    url: str
    backend: ColocatedBackend
    loop: asyncio.AbstractEventLoop  # the server's event loop, where the backend lives

    def num_unfinished(self) -> int:
        """Requests the backend's workers hold now (freshly asked, not a cached snapshot)."""
        refresh = asyncio.run_coroutine_threadsafe(
            self.backend.refresh_stats(poll_all=True), self.loop
        )
        refresh.result(timeout=10)
        stats = self.backend.worker_stats().values()
        return sum(s.num_waiting + s.num_running + s.num_reserved for s in stats)

    def abort_on_worker(self, request_id: str) -> None:
        """What a decode worker does when it drops a request on its own (lease expired, ...)."""
        worker = self.backend.cluster.decode[0].target

        def drop(engine) -> None:  # on the engine's loop thread
            engine.abort_request(request_id)
            worker.loop.close_stream(request_id, FinishReason.ABORT)

        worker.loop.call(drop).result(timeout=10)

    def wait_until_idle(self, timeout_s: float = ABORT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while self.num_unfinished() != 0:
            assert time.monotonic() < deadline, "the backend still holds a request: not aborted"
            time.sleep(0.05)


@contextlib.contextmanager
def _serve(config: RouterConfig) -> Iterator[Served]:
    """A real server on 127.0.0.1 (port 0) in a thread, over a fresh backend."""
    metrics = RouterMetrics()
    backend = ColocatedBackend(_engine_config(), metrics=metrics)
    app = build_app(backend, load_tokenizer(MODEL), config, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert thread.is_alive(), "the server failed to start"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.02)
    (listener,) = server.servers
    port = listener.sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", backend, listener.get_loop())
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="class")
def served() -> Iterator[Served]:
    with _serve(RouterConfig(request_timeout_s=120.0)) as served:
        yield served


@pytest.fixture(scope="class")
def url(served: Served) -> str:
    return served.url


@pytest.fixture(scope="class")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def _greedy(client: openai.OpenAI, prompt: str | list, max_tokens: int, **kwargs):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _post(url: str, path: str, body: object) -> httpx.Response:
    """No Content-Type header, as from ``curl -d``: the body is JSON all the same."""
    return httpx.post(f"{url}{path}", content=json.dumps(body), timeout=30)


class TestServer:
    """One server for the whole class; it is shut down before the tests below start theirs
    (two colocated backends cannot live in one process at once)."""

    # ---------------------------------------------------------------- completions

    def test_completion(self, client: openai.OpenAI) -> None:
        response = _greedy(client, "The scheduler sends", 12)
        assert response.object == "text_completion"
        assert response.model == MODEL
        (choice,) = response.choices
        assert choice.finish_reason == "length" and choice.text
        usage = response.usage
        assert usage.completion_tokens == 12
        assert usage.prompt_tokens == len(load_tokenizer(MODEL).encode("The scheduler sends"))
        assert usage.total_tokens == usage.prompt_tokens + 12
        assert _greedy(client, "The scheduler sends", 12).choices[0].text == choice.text

    def test_streamed_completion_equals_non_streamed(self, client: openai.OpenAI) -> None:
        expected = _greedy(client, "A request moves", 16)
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt="A request moves",
                max_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        usage = chunks[-1].usage
        assert not chunks[-1].choices and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            expected.usage.prompt_tokens,
            16,
        )

    def test_token_id_prompts_and_several_prompts(self, client: openai.OpenAI) -> None:
        ids = load_tokenizer(MODEL).encode("The cache keeps")
        by_text = _greedy(client, "The cache keeps", 6)
        by_ids = _greedy(client, ids, 6)
        assert by_ids.choices[0].text == by_text.choices[0].text
        both = _greedy(client, [ids, ids[:3]], 6)
        assert [c.index for c in both.choices] == [0, 1]
        assert both.choices[0].text == by_text.choices[0].text
        assert both.usage.prompt_tokens == len(ids) + 3
        assert both.usage.completion_tokens == 12

    def test_stop_string_cuts_the_text_and_aborts(
        self, served: Served, client: openai.OpenAI
    ) -> None:
        full = _greedy(client, "The tokenizer reads", 24).choices[0].text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        assert stop
        expected = full[: full.find(stop)]
        response = _greedy(client, "The tokenizer reads", LONG, stop=[stop])
        choice = response.choices[0]
        assert (choice.text, choice.finish_reason) == (expected, "stop")
        assert response.usage.completion_tokens < 24
        served.wait_until_idle()
        streamed = client.completions.create(
            model=MODEL,
            prompt="The tokenizer reads",
            max_tokens=LONG,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
        )
        assert "".join(c.choices[0].text for c in streamed) == expected + stop
        served.wait_until_idle()

    def test_a_stop_token_is_reported_as_stop_reason(self, client: openai.OpenAI) -> None:
        """The engine's stop token reaches the answer (vLLM's ``stop_reason``), through the
        same delta-to-text path the offline ``LLM`` uses."""
        prompt = load_tokenizer(MODEL).encode("The scheduler admits")
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        llm = LLM.from_config(_engine_config())
        generated = llm.generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0].token_ids
        stop_token = generated[4]
        response = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True, "stop_token_ids": [stop_token]},
        )
        choice = response.choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", stop_token)
        assert response.usage.completion_tokens == generated.index(stop_token) + 1

    def test_n_choices_are_seeded_per_index(self, client: openai.OpenAI) -> None:
        def sample(n: int, seed: int):
            return client.completions.create(
                model=MODEL,
                prompt="Alice sees",
                max_tokens=10,
                n=n,
                seed=seed,
                temperature=1.0,
                extra_body={"ignore_eos": True},
            )

        two = sample(2, seed=7)
        assert [c.index for c in two.choices] == [0, 1]
        assert [c.text for c in sample(2, seed=7).choices] == [c.text for c in two.choices]
        assert sample(1, seed=7).choices[0].text == two.choices[0].text  # choice 0 keeps the seed
        assert sample(1, seed=8).choices[0].text == two.choices[1].text  # choice i: seed + i
        assert two.usage.completion_tokens == 20

    def test_completion_logprobs(self, client: openai.OpenAI) -> None:
        response = _greedy(client, "The router picks", 8, logprobs=2)
        logprobs = response.choices[0].logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
        assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 8
        assert "".join(logprobs.tokens) == response.choices[0].text
        assert logprobs.text_offset == [
            sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
        ]
        for token, logprob, top in zip(
            logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs
        ):
            assert logprob <= 0
            assert 1 <= len(top) <= 2
            # Greedy: the chosen token is the most likely one.
            assert top[token] == pytest.approx(max(top.values()), abs=1e-5)
            assert logprob == pytest.approx(max(top.values()), abs=1e-5)

    # ---------------------------------------------------------------- chat

    def test_chat_completion_and_cached_prompt_tokens(self, client: openai.OpenAI) -> None:
        first = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert first.object == "chat.completion"
        message = first.choices[0].message
        assert message.role == "assistant" and isinstance(message.content, str)
        assert first.usage.completion_tokens <= 8
        second = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert second.choices[0].message.content == message.content
        # The repeated prompt's full blocks (block_size 4) come from the prefix cache.
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert 0 < cached <= second.usage.prompt_tokens and cached % 4 == 0
        assert first.usage.prompt_tokens_details.cached_tokens < cached

    def test_streamed_chat_with_usage(self, client: openai.OpenAI) -> None:
        expected = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0
        )
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == expected.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == expected.choices[0].finish_reason
        assert all(f is None for f in finishes[:-1])
        assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens

    def test_chat_logprobs_and_n(self, client: openai.OpenAI) -> None:
        response = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0.8,
            seed=3,
            n=2,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in response.choices] == [0, 1]
        assert response.usage.completion_tokens == 12
        for choice in response.choices:
            content = choice.logprobs.content
            assert len(content) == 6
            assert "".join(entry.token for entry in content) == choice.message.content
            for entry in content:
                assert entry.bytes == list(entry.token.encode())
                assert len(entry.top_logprobs) == 3
                assert entry.logprob <= max(top.logprob for top in entry.top_logprobs) + 1e-5

    # ---------------------------------------------------------------- errors and the rest

    @pytest.mark.parametrize(
        ("path", "body", "param"),
        [
            ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
            ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
            ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
            ("/v1/completions", {"prompt": 5}, "prompt"),
            ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus"),
            ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
            ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
            ("/v1/chat/completions", {"messages": []}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, None),
        ],
    )
    def test_bad_input_is_400_with_an_openai_error_body(self, path, body, param, url: str) -> None:
        response = _post(url, path, body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"].startswith(param)

    def test_malformed_json_and_too_long_prompt(self, url: str, client: openai.OpenAI) -> None:
        response = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30)
        assert response.status_code == 400 and "error" in response.json()
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=[1] * 2040, max_tokens=20)
        message = info.value.body["message"]
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
        assert "2040 in the prompt, 20 in the completion" in message

    def test_unknown_model_is_404(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
        assert info.value.body["code"] == "model_not_found"

    def test_models_health_and_metrics(self, url: str, client: openai.OpenAI) -> None:
        models = client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        _greedy(client, "metrics please", 3)
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'pdserve_requests_total{endpoint="completions",status="200"}' in text
        for name in (
            "pdserve_time_to_first_token_seconds_count",
            "pdserve_inter_token_latency_seconds_count",
            "pdserve_e2e_request_latency_seconds_count",
            "pdserve_generation_tokens_total",
            'pdserve_sequences_finished_total{finish_reason="length"}',
        ):
            line = next(line for line in text.splitlines() if line.startswith(name))
            assert float(line.rsplit(" ", 1)[1]) >= 1, line

    def test_worker_side_abort_is_an_error_not_a_success(self, served: Served) -> None:
        body = {"prompt": "A worker dies", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        url = f"{served.url}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            lines = response.iter_lines()
            response_id = json.loads(next(lines).removeprefix("data: "))["id"]
            served.abort_on_worker(f"{response_id}-0")  # choice 0's backend request
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "a worker failed" in error["message"]
        assert response_id not in error["message"]  # the details stay in the log
        assert not any('"finish_reason":"abort"' in event for event in events)
        served.wait_until_idle()

    def test_client_disconnect_mid_stream_aborts_the_request(self, served: Served) -> None:
        body = {
            "model": MODEL,
            "prompt": "The decode worker streams",
            "max_tokens": LONG,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{served.url}/v1/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines)]
            assert any(line.startswith('data: {"id"') for line in received)
            assert served.num_unfinished() == 1
        # The connection is closed with ~1890 tokens to go: the backend must drop the request.
        served.wait_until_idle()
        metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
        assert 'pdserve_requests_total{endpoint="completions",status="499"} 1.0' in metrics
        assert 'pdserve_sequences_finished_total{finish_reason="cancelled"} 1.0' in metrics

    def test_client_disconnect_while_waiting_for_a_whole_answer(self, served: Served) -> None:
        body = {"prompt": "Nobody waits", "max_tokens": LONG, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            httpx.post(f"{served.url}/v1/completions", json=body, timeout=0.5)
        served.wait_until_idle()


def test_timeout_and_concurrency_limit() -> None:
    config = RouterConfig(request_timeout_s=1.5, max_concurrent_requests=1)
    with _serve(config) as served:
        url = served.url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        body = {"prompt": "x", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()  # keep it: dropping the iterator closes the stream
            assert next(lines).startswith('data: {"id"')
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt="y", max_tokens=2)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "timeout" and "1.5 seconds" in error["message"]
        served.wait_until_idle()
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(
                model=MODEL, prompt="z", max_tokens=LONG, extra_body={"ignore_eos": True}
            )
        assert info.value.status_code == 504
        served.wait_until_idle()


@pytest.mark.parametrize("text", ["a\u2028b", "\u2029", "x\x85y\\\u2028", "plain", "é \x0b\x1c"])
def test_an_event_is_one_line_to_a_client_that_splits_at_unicode_line_breaks(text: str) -> None:
    # httpx's aiter_lines (Python's str.splitlines) also ends a line at U+0085, U+2028 and
    # U+2029, which JSON leaves raw: a model's text with one of them split the event in two
    # and the client's JSON parse failed (seen in a SmolLM2 benchmark run).
    chunk = json.dumps({"choices": [{"text": text}]}, ensure_ascii=False)
    event = sse_event(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n")
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=event.encode()))
    with httpx.Client(transport=transport) as client, client.stream("GET", "http://x") as reply:
        (line,) = [line for line in reply.iter_lines() if line]
    assert json.loads(line.removeprefix("data: ")) == {"choices": [{"text": text}]}
