"""The decode side of the NIXL transport: the receiver's agent and its notification poller.

``NixlEndpoint`` is a ``ReceiverEndpoint``: one NIXL agent per receiver, named
``<address>/<incarnation>`` (a fresh nanosecond clock per start, so a restarted decode worker
is a new agent even at the same address), with every layer of the KV cache registered once.
Its ``metadata`` (a ``NixlPeerInfo``) rides on ``ReceiverInfo`` and ``TransferTarget``. One
thread ("kv-nixl-recv") polls the agent, which also progresses UCX (over TCP, the incoming
WRITEs' bytes are copied into the cache by these calls), and answers hellos (load the prefill
agent, check the layout), grants (is this reservation and epoch live?) and quiesce messages
itself. Each WRITE's ``KVChunk`` and each finish go, in arrival order, to a second thread
("kv-nixl-verify"): ``KVReceiver.receive_timed`` (reservation, epoch, layout, each block's
CRC-32C over the bytes that landed), then the acknowledgement once every write was verified.
Verifying on the poller held up UCX's progress for ~85 ms per 512 MiB (RESULTS.md).
``revoke`` (a reservation dropped before completing) tells the request's writer to stop.
With a cluster secret, a hello or grant without this cluster's authenticator is refused
(the hello's agent is not loaded, the grant not given) and notifications from agents that
did not pair are dropped (see ``kv_transfer.nixl_transport``).

Quarantine: a WRITE the writer posted before it learnt of the revoke can still land, so a
revoked reservation's blocks are not safe to reuse when ``revoke`` returns. For each writer
granted and not yet finished, ``revoke`` sends ``R`` and returns a future that the poller
resolves when the writer answers ``Q`` (it is fenced and none of its WRITEs is in flight any
more), or ``QUARANTINE_GRACE_S`` after the revoke when no answer comes (the prefill worker
died: what it posted landed or died with its connection meanwhile; logged). A reservation
without a live writer (never granted, or every write notified) is safe at once: a grant
asked for after the cancel is refused, and a WRITE's notification comes after its bytes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kv_transfer import grpc_codec, security
from kv_transfer.base import (
    AuthenticationError,
    KVChunk,
    KVTransferError,
    TransferResult,
    TransportError,
)
from kv_transfer.nixl_agent import (
    ACK,
    ACTIVE_POLL_S,
    CHUNK,
    ERROR,
    FINISH,
    GRANT,
    GRANT_REPLY,
    HELLO,
    HELLO_REPLY,
    IDLE_POLL_S,
    QUARANTINE_GRACE_S,
    QUIESCED,
    REVOKE,
    NixlAgent,
    NixlPeerInfo,
    encode_message,
    peer_name,
)
from kv_transfer.receiver import KVReceiver

logger = logging.getLogger(__name__)

# Verify writes on their own thread (False: on the poller, as before; the transfer benchmark
# flips it in one variant to measure what that costs).
VERIFY_THREAD = True


@dataclass
class _Incoming:
    """One prefill agent's stream of one request, as the decode poller counts it."""

    num_chunks: int = 0
    num_blocks: int = 0
    complete: bool = False
    verify_s: float = 0.0
    expected_chunks: int | None = None  # set by F
    error: KVTransferError | None = None


@dataclass
class _Quarantine:
    """A revoked writer whose posted WRITEs may still land in the reservation's blocks."""

    safe: Future[None]  # resolved by its "Q", or at the deadline
    deadline: float  # time.monotonic(): released without the writer's word


class NixlEndpoint:
    transport = "nixl"

    def __init__(
        self,
        receiver: KVReceiver,
        kv_caches: Sequence[torch.Tensor],
        address: str,
        secret: bytes = b"",
    ) -> None:
        self._receiver = receiver
        self._secret = secret
        self.address = address or f"nixl-{uuid.uuid4().hex[:12]}"
        self._agent = NixlAgent(f"{self.address}/{time.time_ns()}", kv_caches)
        self.metadata = NixlPeerInfo(
            agent_name=self._agent.name,
            agent_metadata=self._agent.agent.get_agent_metadata(),
            layout_signature=self._agent.layout.signature,
            num_blocks=self._agent.num_blocks,
            layer_addresses=self._agent.layer_addresses,
            mem_type=self._agent.mem_type,
            device_id=self._agent.device_id,
            auth=(
                security.authenticator(secret, "nixl-receiver", self._agent.name) if secret else ""
            ),
        ).encode()
        self._peers: set[str] = set()
        self._incoming: dict[tuple[str, str, int], _Incoming] = {}
        self._writers_lock = threading.Lock()
        # request id -> the (prefill agent, epoch) granted and not finished: more than one
        # when a stale grant races a new reservation's.
        self._writers: dict[str, set[tuple[str, int]]] = {}
        self._quarantine: dict[tuple[str, str, int], _Quarantine] = {}  # by (agent, id, epoch)
        self._stop = threading.Event()
        # CHUNK and FINISH messages, in arrival order, for the verify thread (None: stop).
        self._verify_jobs: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._verifier = None
        if VERIFY_THREAD:
            self._verifier = threading.Thread(
                target=self._verify, name="kv-nixl-verify", daemon=True
            )
            self._verifier.start()
        self._thread = threading.Thread(target=self._run, name="kv-nixl-recv", daemon=True)
        self._thread.start()
        logger.info("NIXL KV receiver %s (agent %s)", self.address, self._agent.name)

    def revoke(self, request_id: str) -> Future[None] | None:
        """Fence the request's writers; the future resolves once their WRITEs cannot land."""
        deadline = time.monotonic() + QUARANTINE_GRACE_S
        with self._writers_lock:
            writers = self._writers.pop(request_id, set())
            held = []
            for sender, epoch in writers:
                key = (sender, request_id, epoch)
                held.append(self._quarantine.setdefault(key, _Quarantine(Future(), deadline)))
        for sender, epoch in writers:
            try:
                self._agent.agent.send_notif(
                    sender, encode_message(REVOKE, request_id=request_id, epoch=epoch)
                )
            except Exception:  # the writer is gone: its quarantine ends at the grace period
                logger.warning("cannot tell writer %s to stop %r", sender, request_id, exc_info=1)
        if not held:
            return None
        if len(held) == 1:
            return held[0].safe
        return _all_of([q.safe for q in held])

    @property
    def num_quarantined(self) -> int:
        with self._writers_lock:
            return len(self._quarantine)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._verifier is not None:
            self._verify_jobs.put(None)
            self._verifier.join()
        self._agent.close()
        with self._writers_lock:  # the cache is going away with the agent
            held, self._quarantine = list(self._quarantine.values()), {}
        for quarantine in held:
            _resolve(quarantine.safe)

    def _run(self) -> None:
        agent = self._agent.agent
        while not self._stop.is_set():
            notifications = agent.get_new_notifs()  # also progresses UCX (incoming WRITEs)
            if self._quarantine:
                self._release_overdue()
            if not notifications:
                expecting = self._receiver.num_reservations > 0 or bool(self._quarantine)
                time.sleep(ACTIVE_POLL_S if expecting else IDLE_POLL_S)
                continue
            for sender, messages in notifications.items():
                for message in messages:
                    if self._verifier is not None and message[:1] in (CHUNK, FINISH):
                        self._verify_jobs.put((peer_name(sender), message))
                    else:
                        self._handle_logged(peer_name(sender), message)

    def _verify(self) -> None:
        while (job := self._verify_jobs.get()) is not None:
            self._handle_logged(*job)

    def _handle_logged(self, sender: str, message: bytes) -> None:
        try:
            self._handle(sender, message)
        except Exception:  # a bad message must not stop the receiver
            logger.exception("NIXL notification from %s dropped", sender)

    def _handle(self, sender: str, message: bytes) -> None:
        kind, body = message[:1], message[1:]
        if self._secret and kind != HELLO and sender not in self._peers:
            logger.warning(
                "NIXL notification %r from %s, which did not pair: dropped", kind, sender
            )
            return
        if kind == CHUNK:
            self._on_chunk(sender, grpc_codec.decode_chunk(body))
        elif kind == FINISH:
            fields = json.loads(body)
            key = (sender, fields["request_id"], fields["epoch"])
            self._incoming.setdefault(key, _Incoming()).expected_chunks = fields["num_chunks"]
            self._maybe_ack(key)
        elif kind == GRANT:
            self._on_grant(sender, json.loads(body))
        elif kind == QUIESCED:
            fields = json.loads(body)
            with self._writers_lock:
                key = (sender, fields["request_id"], fields["epoch"])
                quarantine = self._quarantine.pop(key, None)
            if quarantine is not None:  # None: released at its deadline already
                _resolve(quarantine.safe)
        elif kind == HELLO:
            self._on_hello(sender, json.loads(body))
        else:
            logger.warning("unknown NIXL notification %r from %s", kind, sender)

    def _authentic(self, fields: dict, purpose: str, sender: str, *parts: str | int) -> bool:
        if not self._secret:
            return True
        token = fields.get("auth") or ""
        return security.verify(
            self._secret, token, f"nixl-{purpose}", sender, self._agent.name, *parts
        )

    def _on_hello(self, sender: str, fields: dict) -> None:
        if not self._authentic(fields, "hello", sender, fields["metadata"]):
            # Not loaded, so not answered: the prefill side's handshake times out.
            logger.warning(
                "refused NIXL pairing from %s: %s this cluster's KV authenticator",
                sender,
                "wrong" if fields.get("auth") else "without",
            )
            return
        if sender in self._peers:  # the prefill worker re-handshakes: reload its agent
            self._agent.agent.remove_remote_agent(sender)
        self._agent.agent.add_remote_agent(bytes.fromhex(fields["metadata"]))
        self._peers.add(sender)
        error = ""
        if fields["layout"] != self._agent.layout.signature:
            error = (
                f"decode worker {self.address}: prefill layout {fields['layout']!r} != "
                f"decode layout {self._agent.layout.signature!r}"
            )
        self._agent.agent.send_notif(sender, encode_message(HELLO_REPLY, error=error))

    def _on_grant(self, sender: str, fields: dict) -> None:
        request_id, epoch = fields["request_id"], fields["epoch"]
        error = ""
        try:
            if not self._authentic(fields, "grant", sender, request_id, epoch):
                raise AuthenticationError(
                    f"grant of {request_id!r} from {sender}: wrong KV authenticator"
                )
            with self._writers_lock:  # recorded first: a cancel from now on revokes it
                self._writers.setdefault(request_id, set()).add((sender, epoch))
            self._receiver.check_epoch(request_id, epoch)
        except KVTransferError as refused:
            self._forget_writer(request_id, sender, epoch)
            error = type(refused).__name__
            fields["message"] = str(refused)
        reply = encode_message(
            GRANT_REPLY,
            request_id=request_id,
            epoch=epoch,
            error=error,
            message=fields.get("message", ""),
        )
        self._agent.agent.send_notif(sender, reply)

    def _on_chunk(self, sender: str, chunk: KVChunk) -> None:
        key = (sender, chunk.request_id, chunk.epoch)
        incoming = self._incoming.setdefault(key, _Incoming())
        incoming.num_chunks += 1
        if incoming.error is not None:
            return  # fenced: reported once
        try:
            if chunk.payload is not None:
                raise TransportError("a NIXL notification carries no payload")
            incoming.complete, seconds = self._receiver.receive_timed(chunk)
            incoming.num_blocks += len(chunk.block_ids)
            incoming.verify_s += seconds
        except KVTransferError as error:
            incoming.error = error
            self._agent.agent.send_notif(
                sender,
                encode_message(
                    ERROR,
                    request_id=chunk.request_id,
                    epoch=chunk.epoch,
                    error=type(error).__name__,
                    message=str(error),
                ),
            )
        self._maybe_ack(key)

    def _maybe_ack(self, key: tuple[str, str, int]) -> None:
        incoming = self._incoming[key]
        if incoming.expected_chunks is None or incoming.num_chunks < incoming.expected_chunks:
            return
        del self._incoming[key]
        sender, request_id, epoch = key
        self._forget_writer(request_id, sender, epoch)  # every WRITE of it has landed
        if incoming.error is None:
            result = TransferResult(
                request_id,
                epoch,
                incoming.num_chunks,
                incoming.num_blocks,
                incoming.complete,
                incoming.verify_s,
            )
            self._agent.agent.send_notif(sender, ACK + grpc_codec.encode_ack(result))

    def _forget_writer(self, request_id: str, sender: str, epoch: int) -> None:
        with self._writers_lock:
            writers = self._writers.get(request_id, set())
            writers.discard((sender, epoch))
            if not writers:
                self._writers.pop(request_id, None)

    def _release_overdue(self) -> None:
        now = time.monotonic()
        with self._writers_lock:
            overdue = [key for key, q in self._quarantine.items() if q.deadline <= now]
            released = [self._quarantine.pop(key) for key in overdue]
        for (sender, request_id, epoch), quarantine in zip(overdue, released, strict=True):
            logger.warning(
                "writer %s of %r (epoch %d) did not confirm it stopped within %.0f s: "
                "releasing its blocks",
                sender,
                request_id,
                epoch,
                QUARANTINE_GRACE_S,
            )
            _resolve(quarantine.safe)


def _resolve(future: Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _all_of(futures: list[Future[None]]) -> Future[None]:
    """Resolves once every one of ``futures`` has (none of them ever fails)."""
    combined: Future[None] = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[None]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            _resolve(combined)

    for future in futures:
        future.add_done_callback(one_done)
    return combined
