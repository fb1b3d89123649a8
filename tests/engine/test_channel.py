"""The worker channel (``engine.channel``) on real loopback sockets: calls, outputs, errors,
the token, and a lost connection. A Ray worker's channel is exercised end to end by the
serving tests (``tests/serving``), whose Ray clusters send every request verb over it."""

from __future__ import annotations

import asyncio
import functools
import pickle
import struct
import time

import pytest
import uvloop

from engine import channel as channel_module
from engine.channel import (
    STATS_PUSH_INTERVAL_S,
    TOKEN_BYTES,
    ChannelAddress,
    ChannelClient,
    ChannelClosedError,
    ChannelServer,
)
from engine.outputs import RequestDelta
from engine.worker import RequestAbortedError


class Worker:
    """Stand-in verbs with observable effects (every name is a channel verb)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.outbox: asyncio.Queue[list] = asyncio.Queue()
        self.release = asyncio.Event()

    def abort(self, request_id: str) -> str:  # sync: answered as returned
        self.calls.append(request_id)
        return f"aborted {request_id}"

    async def reserve(self, request_id: str) -> None:
        raise RequestAbortedError(f"request {request_id!r} was aborted before this call")

    async def wait_transfer(self, request_id: str, timeout_s: float | None) -> str:
        await self.release.wait()
        return request_id

    async def prefill(self, request_id: str) -> object:
        return lambda: None  # does not pickle

    async def decode(self, request_id: str, first_token_id: int) -> None:
        self.outbox.put_nowait([RequestDelta(request_id, [first_token_id], None, None, 3, 0)])

    async def outputs(self):
        while True:
            yield await self.outbox.get()


def _sync(test):
    """An async test run to its end in a fresh event loop: asyncio's, then uvloop's (the
    loop ``pdserve serve`` runs on; its transports are not asyncio's classes)."""

    @functools.wraps(test)
    def run(*args, **kwargs) -> None:
        for loop_factory in (asyncio.new_event_loop, uvloop.new_event_loop):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(test(*args, **kwargs))

    return run


async def _pair(worker: Worker):
    server = ChannelServer(worker, worker.outputs)
    address = await server.open("127.0.0.1")
    batches: asyncio.Queue[list] = asyncio.Queue()
    closed: list[ChannelClosedError] = []
    client = await ChannelClient.connect(address, batches.put_nowait, closed.append)
    return server, address, client, batches, closed


@_sync
async def test_calls_answer_in_order_and_outputs_arrive() -> None:
    worker = Worker()
    server, _, client, batches, closed = await _pair(worker)
    answers = await asyncio.gather(*(client.call("abort", f"r{i}") for i in range(200)))
    assert answers == [f"aborted r{i}" for i in range(200)]
    assert worker.calls == [f"r{i}" for i in range(200)]  # started in the order sent

    await client.call("decode", "r7", 42)
    batch = await asyncio.wait_for(batches.get(), 5)
    assert batch == [RequestDelta("r7", [42], None, None, 3, 0)]
    client.close()
    server.close()
    assert closed and isinstance(closed[0], ChannelClosedError)


@_sync
async def test_errors_keep_their_class_and_an_unsendable_answer_is_an_error() -> None:
    server, _, client, _, closed = await _pair(Worker())
    with pytest.raises(RequestAbortedError, match="aborted before this call"):
        await client.call("reserve", "r1")
    with pytest.raises(RuntimeError, match="prefill: unsendable answer"):
        await client.call("prefill", "r2")
    assert await client.call("abort", "r3") == "aborted r3"  # the channel goes on
    assert not closed
    client.close()
    server.close()


@_sync
async def test_a_lost_connection_fails_calls_in_flight_and_later_calls() -> None:
    worker = Worker()
    server, _, client, _, closed = await _pair(worker)
    waiting = asyncio.ensure_future(client.call("wait_transfer", "r1", None))
    await asyncio.sleep(0.05)
    server.close()  # the worker's side goes away, as a killed process's does
    with pytest.raises(ChannelClosedError):
        await asyncio.wait_for(waiting, 5)
    assert len(closed) == 1
    with pytest.raises(ChannelClosedError):
        await client.call("abort", "r2")
    assert worker.calls == []


def _raw_call(verb: str) -> bytes:
    payload = pickle.dumps(("call", 1, verb, ("r1",)))
    return struct.pack("<I", len(payload)) + payload


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(lambda a: b"\0" * TOKEN_BYTES + _raw_call("abort"), id="wrong-token"),
        pytest.param(lambda a: a.token + _raw_call("shutdown"), id="not-a-channel-verb"),
    ],
)
@_sync
async def test_a_wrong_token_or_verb_is_refused_and_runs_nothing(opening) -> None:
    worker = Worker()
    server = ChannelServer(worker, worker.outputs)
    address: ChannelAddress = await server.open("127.0.0.1")
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(opening(address))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
    assert worker.calls == []

    # The worker still serves a router that has the token.
    client = await ChannelClient.connect(address, lambda batch: None, lambda error: None)
    assert await client.call("abort", "r2") == "aborted r2"
    client.close()
    server.close()


@_sync
async def test_a_newer_router_connection_replaces_the_older_one() -> None:
    worker = Worker()
    server, address, first, _, first_closed = await _pair(worker)
    await first.call("abort", "r1")
    batches: asyncio.Queue[list] = asyncio.Queue()
    second = await ChannelClient.connect(address, batches.put_nowait, lambda error: None)
    assert await second.call("abort", "r2") == "aborted r2"
    await asyncio.wait_for(_until(lambda: bool(first_closed)), 5)
    await second.call("decode", "r3", 5)  # outputs go to the newer connection
    assert (await asyncio.wait_for(batches.get(), 5))[0].new_token_ids == [5]
    second.close()
    server.close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


class BusyWorker(Worker):
    """A worker with stats: each answer says how many times it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.num_stats = 0

    async def stats(self) -> dict:
        self.num_stats += 1
        return {"asked": self.num_stats}


@_sync
async def test_an_idle_worker_pushes_its_stats_every_heartbeat(monkeypatch) -> None:
    heartbeat_s = 0.25  # above STATS_PUSH_INTERVAL_S, as the real one (2 s) is
    monkeypatch.setattr(channel_module, "STATS_HEARTBEAT_S", heartbeat_s)
    worker = BusyWorker()
    server = ChannelServer(worker, worker.outputs)
    address = await server.open("127.0.0.1")
    pushed: list[float] = []
    client = await ChannelClient.connect(
        address, [].append, [].append, lambda stats: pushed.append(time.monotonic())
    )
    start = time.monotonic()
    await asyncio.sleep(1.1)  # no call, no output: the heartbeat alone
    assert 3 <= len(pushed) <= 5, pushed
    gaps = [b - a for a, b in zip([start, *pushed], pushed)]
    assert all(heartbeat_s - 0.05 <= gap <= heartbeat_s + 0.2 for gap in gaps), gaps

    await asyncio.sleep(heartbeat_s * 0.6)  # a frame's push now puts the next beat off
    await client.call("decode", "r1", 1)
    await _until(lambda: len(pushed) == 5 or pushed[-1] > start + 1.2)
    traffic_push = pushed[-1]
    await asyncio.sleep(heartbeat_s * 0.8)
    assert pushed[-1] == traffic_push  # not a beat on the old schedule
    await _until(lambda: pushed[-1] > traffic_push)
    assert pushed[-1] - traffic_push >= heartbeat_s - 0.05

    client.close()
    await asyncio.sleep(0.1)
    asked = worker.num_stats
    await asyncio.sleep(2 * heartbeat_s)
    assert worker.num_stats == asked  # the connection's heartbeat stopped with it
    server.close()


@_sync
async def test_a_busy_worker_pushes_its_stats_at_most_every_interval() -> None:
    worker = BusyWorker()
    server = ChannelServer(worker, worker.outputs)
    address = await server.open("127.0.0.1")
    batches: asyncio.Queue[list] = asyncio.Queue()
    pushed: asyncio.Queue[dict] = asyncio.Queue()
    client = await ChannelClient.connect(address, batches.put_nowait, [].append, pushed.put_nowait)
    assert await client.call("stats") == {"asked": 1}  # a poll's answer pushes nothing
    await asyncio.sleep(0.05)
    assert pushed.empty()

    start = time.monotonic()
    for token in range(20):  # answers and outputs in quick succession: one push per interval
        await client.call("decode", "r1", token)
    for _ in range(20):
        await asyncio.wait_for(batches.get(), 5)
    assert await asyncio.wait_for(pushed.get(), 5) == {"asked": 2}
    await asyncio.sleep(0.05)
    num_pushes = worker.num_stats - 1
    assert num_pushes <= 1 + (time.monotonic() - start) // STATS_PUSH_INTERVAL_S
    assert pushed.qsize() == num_pushes - 1  # every push arrived, newest last

    await asyncio.sleep(STATS_PUSH_INTERVAL_S)  # the interval is over: the next frame pushes
    asked = worker.num_stats
    await client.call("decode", "r1", 99)
    while True:  # the newest push is the one this frame sent
        if (await asyncio.wait_for(pushed.get(), 5))["asked"] == asked + 1:
            break
    client.close()
    server.close()


@_sync
async def test_a_worker_without_stats_still_serves_and_pushes_nothing() -> None:
    worker = Worker()  # no stats verb: the push fails quietly, outputs flow on
    server = ChannelServer(worker, worker.outputs)
    address = await server.open("127.0.0.1")
    batches: asyncio.Queue[list] = asyncio.Queue()
    pushed: list = []
    client = await ChannelClient.connect(address, batches.put_nowait, [].append, pushed.append)
    await client.call("decode", "r1", 5)
    assert await asyncio.wait_for(batches.get(), 5) == [RequestDelta("r1", [5], None, None, 3, 0)]
    assert await client.call("abort", "r1") == "aborted r1"
    await asyncio.sleep(0.05)
    assert pushed == []
    client.close()
    server.close()


def _raw_frame(message: tuple) -> bytes:
    payload = pickle.dumps(message)
    return struct.pack("<I", len(payload)) + payload


@pytest.mark.parametrize("piece", [1, 7, 10_000], ids=["byte-by-byte", "7-bytes", "whole"])
@_sync
async def test_the_client_reads_frames_split_or_joined_across_reads(piece: int) -> None:
    """Frames cut anywhere by TCP, or several in one read, reach the client whole and in order."""
    delta = RequestDelta("r1", [5], None, None, 3, 0)
    frames = b"".join(_raw_frame(("out", [delta])) for _ in range(3)) + _raw_frame(("stats", 7))
    token = b"t" * TOKEN_BYTES
    sent = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(TOKEN_BYTES) == token
        for start in range(0, len(frames), piece):
            writer.write(frames[start : start + piece])
            await writer.drain()
            await asyncio.sleep(0)
        sent.set()
        await reader.read()  # until the client closes

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = ChannelAddress("127.0.0.1", server.sockets[0].getsockname()[1], token)
    batches: list[list] = []
    pushed: list[object] = []
    closed: list[ChannelClosedError] = []
    client = await ChannelClient.connect(address, batches.append, closed.append, pushed.append)
    await asyncio.wait_for(sent.wait(), 5)
    for _ in range(100):
        if pushed:
            break
        await asyncio.sleep(0.01)
    assert batches == [[delta]] * 3
    assert pushed == [7]
    assert not closed
    client.close()
    server.close()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack("<I", (1 << 30) + 1), id="oversized-frame"),
        pytest.param(struct.pack("<I", 4) + b"\xffnot", id="not-a-pickle"),
    ],
)
@_sync
async def test_a_broken_frame_closes_the_client_and_fails_its_calls(garbage: bytes) -> None:
    token = b"t" * TOKEN_BYTES
    got_call = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(TOKEN_BYTES)
        await reader.readexactly(4)  # the call's frame header: the client is waiting now
        got_call.set()
        writer.write(garbage)
        await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = ChannelAddress("127.0.0.1", server.sockets[0].getsockname()[1], token)
    closed: list[ChannelClosedError] = []
    client = await ChannelClient.connect(address, lambda batch: None, closed.append)
    with pytest.raises(ChannelClosedError, match="broken frame"):
        await asyncio.wait_for(client.call("abort", "r1"), 5)
    assert len(closed) == 1
    with pytest.raises(ChannelClosedError):
        await client.call("abort", "r2")
    server.close()
