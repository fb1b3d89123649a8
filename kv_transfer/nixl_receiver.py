"""The decode side of the NIXL transport: the receiver's agent and its notification poller.

``NixlEndpoint`` is a ``ReceiverEndpoint``: one NIXL agent per receiver, named
``<address>/<incarnation>`` (a fresh nanosecond clock per start, so a restarted decode worker
is a new agent even at the same address), with every layer of the KV cache registered once.
Its ``metadata`` (a ``NixlPeerInfo``) rides on ``ReceiverInfo`` and ``TransferTarget``. One
thread ("kv-nixl-recv") reads the agent's notifications: hellos (load the prefill agent,
check the layout), grants (is this reservation and epoch live?), each WRITE's ``KVChunk``
(handed to ``KVReceiver.receive_timed``: reservation, epoch, layout, each block's checksum
over the bytes that landed) and finishes (acknowledge once every write was verified).
``revoke`` (a reservation dropped before completing) tells the request's writer to stop.
With a cluster secret, a hello or grant without this cluster's authenticator is refused
(the hello's agent is not loaded, the grant not given) and notifications from agents that
did not pair are dropped (see ``kv_transfer.nixl_transport``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
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
    REVOKE,
    NixlAgent,
    NixlPeerInfo,
    encode_message,
    peer_name,
)
from kv_transfer.receiver import KVReceiver

logger = logging.getLogger(__name__)


@dataclass
class _Incoming:
    """One prefill agent's stream of one request, as the decode poller counts it."""

    num_chunks: int = 0
    num_blocks: int = 0
    complete: bool = False
    verify_s: float = 0.0
    expected_chunks: int | None = None  # set by F
    error: KVTransferError | None = None


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
        self._writers: dict[str, tuple[str, int]] = {}  # request id -> (prefill agent, epoch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-nixl-recv", daemon=True)
        self._thread.start()
        logger.info("NIXL KV receiver %s (agent %s)", self.address, self._agent.name)

    def revoke(self, request_id: str) -> None:
        with self._writers_lock:
            writer = self._writers.pop(request_id, None)
        if writer is not None:
            sender, epoch = writer
            self._agent.agent.send_notif(
                sender, encode_message(REVOKE, request_id=request_id, epoch=epoch)
            )

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._agent.close()

    def _run(self) -> None:
        agent = self._agent.agent
        while not self._stop.is_set():
            notifications = agent.get_new_notifs()  # also progresses UCX (incoming WRITEs)
            if not notifications:
                expecting = self._receiver.num_reservations > 0
                time.sleep(ACTIVE_POLL_S if expecting else IDLE_POLL_S)
                continue
            for sender, messages in notifications.items():
                for message in messages:
                    try:
                        self._handle(peer_name(sender), message)
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
                self._writers[request_id] = (sender, epoch)
            self._receiver.check_epoch(request_id, epoch)
        except KVTransferError as refused:
            with self._writers_lock:
                if self._writers.get(request_id) == (sender, epoch):
                    del self._writers[request_id]
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
        with self._writers_lock:
            if self._writers.get(request_id) == (sender, epoch):
                del self._writers[request_id]
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
