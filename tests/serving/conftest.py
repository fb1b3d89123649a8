"""End-to-end serving fixtures: local Ray, a real server on 127.0.0.1, offline expectations.

A server is built exactly as ``pdserve serve`` builds it (the CLI's own parser, then
``router.serve.build_backend`` and ``build_app``) and served by uvicorn in a thread of this
process, so a test can also look at the workers (free blocks, pids) through the backend.
Workers are Ray actors unless the transport is ``local``. One local Ray instance serves
every module that asks for ``local_ray``; it is shut down at the end of the session (or by a
module that needs another cluster), and each shutdown checks that its processes are gone.

Expected outputs come from the offline engine (``engine.llm.LLM``) on the same model, with
prompts tokenized by the router's own functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from engine.arg_utils import engine_config_from_args
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.worker import WorkerInfo, WorkerStats
from router.backends.cluster import ClusterBackend
from router.chat import encode_completion_prompts, render_chat_prompt
from router.cli import build_parser
from router.protocol import ChatMessage
from router.serve import build_app_from_args

# Test clusters listen on loopback only: no token authentication. It must be one mode for
# every cluster this process attaches to (Ray keeps the mode of its first ``ray.init``), and
# ``ray start`` nodes inherit it from here.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

T = TypeVar("T")

MODEL = "pdserve-tiny"
NUM_BLOCKS = 480  # per worker, 16 tokens each
# Engine flags of every test server: chunked prefill in steps of 128 tokens, so a long
# prompt takes many steps (and many layer-wise sends) on the prefill worker.
ENGINE_ARGS = [
    "--model", MODEL,
    "--device", "cpu",
    "--num-gpu-blocks-override", str(NUM_BLOCKS),
    "--max-num-batched-tokens", "128",
]  # fmt: skip
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 60.0

_WORDS = (
    "prefill decode block cache layer token router worker stream batch queue lease epoch",
    "transfer chunk kernel tensor shard node actor policy prefix hash reserve abort metric",
    "latency buffer socket channel window budget schedule preempt sample logit rope head",
)


# -- processes -------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(roots: set[int]) -> set[int]:
    """Every live process below ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: set[int], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while alive := {pid for pid in pids if is_alive(pid)}:
        if time.monotonic() > deadline:
            left = "; ".join(f"{pid}: {cmdline(pid)[:100]}" for pid in sorted(alive))
            raise AssertionError(f"{what}: processes still alive after {timeout_s}s: {left}")
        time.sleep(0.1)


def terminate(pids: set[int], timeout_s: float = 10.0) -> None:
    """SIGTERM ``pids``, SIGKILL the ones still alive after ``timeout_s``, wait for all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(AssertionError):
            wait_gone(pids, timeout_s, "terminate")
            return
    wait_gone(pids, timeout_s, "SIGKILL")


# -- Ray -------------------------------------------------------------------------------


def _ray_processes_of_this_driver() -> set[int]:
    """Local Ray's processes (GCS, raylet, agents, workers) below this test process."""
    return {pid for pid in descendants({os.getpid()}) if "ray" in cmdline(pid)}


def shutdown_ray() -> None:
    """Disconnect from Ray; a local instance this process started must leave no process."""
    import ray

    if not ray.is_initialized():
        return
    started_here = _ray_processes_of_this_driver()
    ray.shutdown()
    wait_gone(started_here, SHUTDOWN_TIMEOUT_S, "local Ray after ray.shutdown()")


@pytest.fixture(scope="session")
def _ray_session_end() -> Iterator[None]:
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def local_ray(_ray_session_end: None) -> None:
    """A local Ray instance shared by the modules that ask for it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


# -- the server ------------------------------------------------------------------------


@dataclass
class Server:
    """A running server and the backend behind it (which lives on the server's loop)."""

    url: str
    backend: ClusterBackend
    loop: asyncio.AbstractEventLoop
    worker_infos: dict[str, WorkerInfo] = field(default_factory=dict)

    def run(self, make: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
        """Run a coroutine on the server's event loop (where the workers' handles live)."""

        async def wrapper() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout_s)

    def client(self, timeout_s: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def async_client(self, timeout_s: float = 120.0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def worker_stats(self) -> dict[str, WorkerStats]:
        """Every worker's stats, asked now (not the backend's periodic snapshot)."""
        workers = self.backend.cluster.prefill + self.backend.cluster.decode

        async def ask() -> list[WorkerStats]:
            return await asyncio.gather(*(w.stats() for w in workers))

        return {w.worker_id: s for w, s in zip(workers, self.run(ask))}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels`` (0 when none)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def decisions(self) -> dict[str, float]:
        name = "pdserve_prefill_decisions_total"
        return {d: self.metric(name, decision=d) for d in ("local", "remote")}

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, WorkerStats]:
        """Wait until no worker holds a request and every block is free (and unpinned) again."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.worker_stats()
            busy = {
                wid: s
                for wid, s in stats.items()
                if s.num_running
                or s.num_waiting
                or s.num_reserved
                or s.num_pinned_blocks
                or s.num_free_blocks != s.num_total_blocks
            }
            if not busy:
                return stats
            assert time.monotonic() < deadline, f"workers still busy: {busy}"
            time.sleep(0.05)


def parse_serve_args(argv: list[str]) -> Any:
    """``pdserve serve ARGV`` parsed by the CLI's own parser."""
    return build_parser().parse_args(["serve", *argv])


@contextlib.contextmanager
def serve(argv: list[str]) -> Iterator[Server]:
    """``pdserve serve ARGV`` on 127.0.0.1 (a free port) in a thread of this process.

    On exit the server and its workers shut down; Ray workers' processes must be gone.
    """
    args = parse_serve_args([*ENGINE_ARGS, "--request-timeout-s", "120", *argv])
    app, backend = build_app_from_args(args, engine_config_from_args(args))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    worker_pids: set[int] = set()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            assert thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, f"the server did not start in {STARTUP_TIMEOUT_S}s"
            time.sleep(0.05)
        (listener,) = server.servers
        port = listener.sockets[0].getsockname()[1]
        running = Server(f"http://127.0.0.1:{port}", backend, listener.get_loop())
        workers = backend.cluster.prefill + backend.cluster.decode

        async def infos() -> list[WorkerInfo]:
            return await asyncio.gather(*(w.info() for w in workers))

        running.worker_infos = {w.worker_id: i for w, i in zip(workers, running.run(infos))}
        worker_pids = {i.pid for i in running.worker_infos.values()} - {os.getpid()}
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200
        yield running
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT_S)
        assert not thread.is_alive(), "the server did not shut down"
        wait_gone(worker_pids, SHUTDOWN_TIMEOUT_S, "worker actors after the server stopped")


# -- prompts and expected outputs ------------------------------------------------------


def words(seed: int, num_words: int) -> str:
    """A reproducible prompt of ``num_words`` words."""
    rng = random.Random(seed)
    vocabulary = " ".join(_WORDS).split()
    return " ".join(rng.choice(vocabulary) for _ in range(num_words))


@dataclass(frozen=True)
class Expected:
    """The offline engine's greedy output for one prompt."""

    token_ids: list[int]
    text: str
    token_texts: list[str]  # each token decoded alone, as the API's logprobs show it


class Offline:
    """Greedy references from ``LLM`` and the router's tokenization of prompts."""

    def __init__(self) -> None:
        self.llm = LLM(model=MODEL, device="cpu", num_gpu_blocks_override=NUM_BLOCKS)
        self.tokenizer = self.llm.tokenizer
        self._cache: dict[tuple[tuple[int, ...], int], Expected] = {}

    def completion_ids(self, prompt: str) -> list[int]:
        (ids,) = encode_completion_prompts(self.tokenizer, prompt)
        return ids

    def chat_ids(self, content: str) -> list[int]:
        return render_chat_prompt(self.tokenizer, [ChatMessage(role="user", content=content)])

    def greedy_many(self, prompts: list[list[int]], max_tokens: int) -> list[Expected]:
        todo = [p for p in prompts if (tuple(p), max_tokens) not in self._cache]
        if todo:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in todo], params)
            for prompt, output in zip(todo, outputs):
                ids = list(output.outputs[0].token_ids)
                self._cache[(tuple(prompt), max_tokens)] = Expected(
                    token_ids=ids,
                    text=output.outputs[0].text,
                    token_texts=[
                        self.tokenizer.decode([t], skip_special_tokens=False) for t in ids
                    ],
                )
        return [self._cache[(tuple(p), max_tokens)] for p in prompts]

    def greedy(self, prompt: list[int], max_tokens: int) -> Expected:
        return self.greedy_many([prompt], max_tokens)[0]


@pytest.fixture(scope="session")
def offline() -> Offline:
    return Offline()


# -- requests --------------------------------------------------------------------------


@dataclass
class Answer:
    """One choice as the client saw it."""

    text: str
    token_texts: list[str]  # from logprobs: one entry per generated token
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def check(self, expected: Expected, num_prompt_tokens: int) -> None:
        assert self.token_texts == expected.token_texts
        assert self.text == expected.text
        assert (self.prompt_tokens, self.completion_tokens) == (
            num_prompt_tokens,
            len(expected.token_ids),
        )
        assert self.finish_reason == "length"


GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def complete(client: openai.OpenAI, prompt: str, max_tokens: int, stream: bool) -> Answer:
    """A greedy completion with per-token logprobs, streamed or not."""
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    kwargs.update(GREEDY, logprobs=0)
    if not stream:
        response = client.completions.create(**kwargs)
        (choice,) = response.choices
        return Answer(
            choice.text,
            list(choice.logprobs.tokens),
            choice.finish_reason,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    return completion_answer(chunks)


def completion_answer(chunks: list[Any]) -> Answer:
    choices = [c.choices[0] for c in chunks if c.choices]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    return Answer(
        "".join(c.text for c in choices),
        [t for c in choices if c.logprobs for t in c.logprobs.tokens],
        choices[-1].finish_reason,
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def chat(client: openai.OpenAI, content: str, max_tokens: int, stream: bool) -> Answer:
    """A greedy chat completion with per-token logprobs, streamed or not."""
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "logprobs": True,
    }
    kwargs.update(GREEDY)
    if not stream:
        response = client.chat.completions.create(**kwargs)
        (choice,) = response.choices
        return Answer(
            choice.message.content or "",
            [t.token for t in choice.logprobs.content],
            choice.finish_reason,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    return Answer(
        "".join(c.delta.content or "" for c in choices),
        [t.token for c in choices if c.logprobs for t in c.logprobs.content or ()],
        choices[-1].finish_reason,
        usage.prompt_tokens,
        usage.completion_tokens,
    )
