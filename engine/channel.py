"""The worker channel: the router's request verbs and a worker's outputs over one TCP
connection per worker, beside Ray (pure Python, no torch).

Why not Ray for these: a Ray actor call costs the router ~0.6 ms of CPU and a Ray streaming
item ~1 ms (measured on the 2-core CI machine, ``benchmarks/channel_cost.py``), and the
actor pays as much again on a thread that competes with the engine for the GIL. A paced
server sends one outputs item per engine step per worker and makes three or four calls per
request, so Ray alone cost the router more than its whole per-token budget. Here a call or
an outputs batch is one length-prefixed pickle frame on a socket. Ray stays the control
plane: it places, starts, health-checks and kills workers, and answers the rare verbs
(``info``, ``check_health``, KV pairing); it is also how the router learns where
a worker's channel listens (``EngineWorker.open_channel``).

Frames (4-byte little-endian length, then a pickle): router -> worker
``("call", call_id, verb, args)``; worker -> router ``("ret", call_id, value)``,
``("err", call_id, exception)``, ``("out", batch)`` (one engine step's deltas of all the
worker's streamed requests, as the worker's ``outputs`` yields them) and ``("stats",
WorkerStats)``. Calls start on the worker in the order they were sent (Ray may start an
async actor's calls out of order).

Stats ride along with a busy worker's traffic: after an outputs or answer frame, at most
every ``STATS_PUSH_INTERVAL_S``, the worker sends its stats unasked, so the router need not
poll a worker that is sending anyway (a poll costs the router ~0.45 ms of CPU: a call, its
future and timeout, a wake-up for the answer; a pushed frame ~20 us). An idle worker sends
them every ``STATS_HEARTBEAT_S`` (when nothing else has carried them for that long): the
router's only news of a resting worker, one wake-up of the router where a poll costs two.

Trust: the channel's address and a fresh 32-byte token cross Ray (the trusted control
plane, see ``kv_transfer/security.py``). A connection must send the token first; the worker
compares it in constant time and reads nothing else before it matches, and only the verbs
in ``CHANNEL_VERBS`` can be called. A worker binds loopback when the router runs on its
node, else its Ray node address. One router per worker: a newer authenticated connection
replaces the older one.

A lost connection is a dead worker to the router (``ChannelClosedError``): the worker's
process died (the kernel closes its socket at once, even on SIGKILL) or the path to it did.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# The verbs a router sends on the channel; everything else is a Ray call.
# ``stats`` too: the router polls a worker whose pushed stats are stale (up to four times a
# second), which over Ray alone cost an idle router ~5 ms of CPU a second.
CHANNEL_VERBS = frozenset(
    {"reserve", "generate", "decode", "prefill", "wait_transfer", "abort", "stats"}
)

# A busy worker pushes its stats this often at most; the router polls a worker whose last
# push is older than its own stats interval (0.25 s by default).
STATS_PUSH_INTERVAL_S = 0.2
# A connected worker's stats go out at least this often, busy or idle (the heartbeat); the
# router asks a resting worker only when it has not heard from it for longer
# (``router.backends.cluster.IDLE_STATS_INTERVAL_S``).
STATS_HEARTBEAT_S = 2.0
_TIMER_SLACK_S = 0.01  # an event loop may run a timer this much before its time

TOKEN_BYTES = 32
AUTH_TIMEOUT_S = 10.0
MAX_FRAME_BYTES = 1 << 30  # a frame larger than this is a broken peer, not a message
_HEADER = struct.Struct("<I")
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


class ChannelClosedError(ConnectionError):
    """The worker channel's connection is gone: the worker (or the path to it) died."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where a worker's channel listens, and the token a connection must open with."""

    host: str
    port: int
    token: bytes = field(repr=False)


def _frame(message: tuple) -> bytes:
    payload = pickle.dumps(message, protocol=_PICKLE_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ChannelClosedError(f"frame of {size} bytes (at most {MAX_FRAME_BYTES})")
    return pickle.loads(await reader.readexactly(size))


def _no_delay(transport: asyncio.BaseTransport | asyncio.StreamWriter) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (the router then raises the same class, as Ray's
    task errors do), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error, protocol=_PICKLE_PROTOCOL))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# -- the worker's side --------------------------------------------------------------------


class ChannelServer:
    """Serves one worker's verbs and outputs on the worker's event loop (a Ray actor's)."""

    def __init__(self, worker: Any, outputs: Callable[[], AsyncIterator[list]]) -> None:
        self._worker = worker
        self._outputs = outputs
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._server: asyncio.AbstractServer | None = None
        self._address: ChannelAddress | None = None
        self._connection: _ServerConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self, host: str) -> ChannelAddress:
        """Listen on ``host`` (an ephemeral port) once; later calls return the same address."""
        if self._address is None:
            self._loop = asyncio.get_running_loop()
            self._server = await asyncio.start_server(self._serve, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self._address = ChannelAddress(host, port, self._token)
            logger.info("worker channel listening on %s:%d", host, port)
        return self._address

    def close(self) -> None:
        """Stop listening and drop the connection; from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), AUTH_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if not hmac.compare_digest(token, self._token):
            logger.warning("worker channel: refused a connection from %s (wrong token)", peer)
            writer.close()
            return
        _no_delay(writer)
        previous, self._connection = self._connection, _ServerConnection(self._worker, writer)
        if previous is not None:
            logger.warning("worker channel: a new router connection replaces the old one")
            await previous.stop()  # its outputs pump ends before the new one reads
        await self._connection.run(reader, self._outputs())


class _ServerConnection:
    def __init__(self, worker: Any, writer: asyncio.StreamWriter) -> None:
        self._worker = worker
        self._writer = writer
        self._calls: set[asyncio.Task] = set()
        self._pump: asyncio.Task | None = None
        self._closed = False
        self._stats_pushed_at = -float("inf")
        self._stats_push: asyncio.Task | None = None
        self._heartbeat: asyncio.TimerHandle | None = None

    async def run(self, reader: asyncio.StreamReader, outputs: AsyncIterator[list]) -> None:
        self._pump = asyncio.ensure_future(self._send_outputs(outputs))
        self._heartbeat = asyncio.get_running_loop().call_later(STATS_HEARTBEAT_S, self._beat)
        try:
            while not self._closed:
                kind, call_id, verb, args = await _read_frame(reader)
                if kind != "call" or verb not in CHANNEL_VERBS:
                    raise ValueError(f"not a channel call: {kind!r} {verb!r}")
                task = asyncio.ensure_future(self._answer(call_id, verb, args))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the router went away; calls in flight finish, their answers are dropped
        except Exception:
            logger.exception("worker channel: a broken frame; closing the connection")
        finally:
            await self.stop()

    async def stop(self) -> None:
        self.close()
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)

    def close(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
        if self._stats_push is not None:
            self._stats_push.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._writer.close()

    def _write(self, data: bytes) -> None:
        if not self._closed:
            self._writer.write(data)

    async def _answer(self, call_id: int, verb: str, args: tuple) -> None:
        try:
            value = getattr(self._worker, verb)(*args)
            if isinstance(value, Awaitable):
                value = await value
            message: tuple = ("ret", call_id, value)
        except Exception as error:
            message = ("err", call_id, _sendable(error))
        try:
            data = _frame(message)
        except Exception as error:  # an answer that does not pickle still ends the call
            data = _frame(("err", call_id, RuntimeError(f"{verb}: unsendable answer: {error!r}")))
        self._write(data)
        if verb != "stats":
            self._push_stats_when_due()

    def _push_stats_when_due(self) -> None:
        """Send the worker's stats unasked if the last push is ``STATS_PUSH_INTERVAL_S`` old
        (one push at a time; the stats come from the engine's thread, between steps)."""
        if self._stats_push is not None or self._closed:
            return
        now = time.monotonic()
        if now - self._stats_pushed_at < STATS_PUSH_INTERVAL_S:
            return
        self._stats_pushed_at = now
        self._stats_push = asyncio.ensure_future(self._push_stats())

    def _beat(self) -> None:
        """The heartbeat: push the stats if none went out for ``STATS_HEARTBEAT_S``, then
        come back when the last push is that old (a push still waiting on a stuck engine
        thread: look again in ``STATS_PUSH_INTERVAL_S``)."""
        if self._closed:
            return
        now = time.monotonic()
        if now - self._stats_pushed_at >= STATS_HEARTBEAT_S - _TIMER_SLACK_S:
            self._push_stats_when_due()
        delay_s = self._stats_pushed_at + STATS_HEARTBEAT_S - now
        if delay_s <= _TIMER_SLACK_S:  # no push went out: one is still waiting
            delay_s = STATS_PUSH_INTERVAL_S
        self._heartbeat = asyncio.get_running_loop().call_later(delay_s, self._beat)

    async def _push_stats(self) -> None:
        try:
            self._write(_frame(("stats", await self._worker.stats())))
        except asyncio.CancelledError:
            raise
        except Exception:  # a dying engine: the router's poll or health check will tell
            logger.debug("worker channel: no stats to push", exc_info=True)
        finally:
            self._stats_push = None

    async def _send_outputs(self, outputs: AsyncIterator[list]) -> None:
        try:
            async for batch in outputs:
                self._write(_frame(("out", batch)))
                self._push_stats_when_due()
                await self._writer.drain()  # a slow router: the worker's outbox merges steps
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # the router would wait forever: it sees a dead worker instead
            logger.exception("worker channel: cannot send outputs; closing the connection")
            self.close()
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]


# -- the router's side --------------------------------------------------------------------


class ChannelClient(asyncio.Protocol):
    """One connection to a worker's channel: ``call`` a verb; every outputs batch goes to
    ``on_outputs``, every pushed stats to ``on_stats``; a lost connection fails the calls in
    flight and calls ``on_closed``.

    An asyncio protocol, not a reader task: the frames of one read are handled in the
    socket's own callback, with no stream buffer, future or task step in between (a paced
    router reads one small frame per engine step, and each of those hand-offs cost it
    CPU on a wake-up whose caches are cold)."""

    def __init__(
        self,
        on_outputs: Callable[[list], None],
        on_closed: Callable[[ChannelClosedError], None],
        on_stats: Callable[[Any], None] | None = None,
    ) -> None:
        self._on_outputs = on_outputs
        self._on_closed = on_closed
        self._on_stats = on_stats
        self._transport: Any = None  # asyncio's or uvloop's transport
        self._buffer = bytearray()
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self.closed: ChannelClosedError | None = None

    @classmethod
    async def connect(
        cls,
        address: ChannelAddress,
        on_outputs: Callable[[list], None],
        on_closed: Callable[[ChannelClosedError], None],
        on_stats: Callable[[Any], None] | None = None,
    ) -> ChannelClient:
        loop = asyncio.get_running_loop()
        try:
            _, client = await loop.create_connection(
                lambda: cls(on_outputs, on_closed, on_stats), address.host, address.port
            )
        except OSError as error:
            raise ChannelClosedError(
                f"cannot reach the worker channel at {address.host}:{address.port}: {error}"
            ) from error
        assert client._transport is not None
        client._transport.write(address.token)
        return client

    async def call(self, verb: str, *args: Any) -> Any:
        if self.closed is not None:
            raise self.closed
        assert self._transport is not None
        call_id = self._next_id = self._next_id + 1
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._transport.write(_frame(("call", call_id, verb, args)))
            return await future
        finally:
            self._pending.pop(call_id, None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ChannelClosedError("the worker channel was closed"))

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while len(buffer) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, start)
                if size > MAX_FRAME_BYTES:
                    raise ChannelClosedError(f"frame of {size} bytes (at most {MAX_FRAME_BYTES})")
                end = start + _HEADER.size + size
                if len(buffer) < end:
                    break
                message = pickle.loads(buffer[start + _HEADER.size : end])
                start = end
                self._dispatch(message)
        except Exception as error:
            logger.exception("the worker channel sent a broken frame")
            self._transport.close()
            self._fail(ChannelClosedError(f"the worker channel sent a broken frame: {error!r}"))
        finally:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ChannelClosedError(f"the worker channel closed: {exc!r}"))

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            self._on_outputs(message[1])
            return
        if kind == "stats":
            if self._on_stats is not None:
                self._on_stats(message[1])
            return
        _, call_id, value = message
        future = self._pending.get(call_id)
        if future is None or future.done():  # its caller stopped waiting
            return
        if kind == "ret":
            future.set_result(value)
        else:
            future.set_exception(value)

    def _fail(self, error: ChannelClosedError) -> None:
        if self.closed is not None:
            return
        self.closed = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._on_closed(error)
