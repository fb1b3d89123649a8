"""Contracts between the prefill side (sender) and the decode side (receiver) of a KV transfer.

Lifecycle of one request's transfer:

1. The decode worker reserves blocks and calls ``KVReceiver.expect``: it returns a
   ``TransferTarget`` (address, destination block ids, layout signature, epoch, deadline). The
   router hands the target to the prefill worker.
2. The prefill worker calls ``KVSender.begin(target)``, then ``send_layer`` for each layer of
   each chunk as soon as it is computed. ``send_layer`` only enqueues: a background thread packs
   the blocks, checksums them and writes them into the remote blocks, while compute goes on.
   The source blocks must stay unchanged until the request's ``flush`` future resolves.
3. ``flush(request_id)`` closes the request's stream; its future resolves with a
   ``TransferResult`` when the receiver has acknowledged every write, or raises the
   ``KVTransferError`` the receiver or the wire reported. ``abort`` drops the request.
4. The receiver verifies every write (reservation, epoch, layout, checksum, each
   (layer, block) exactly once) and marks the request COMPLETE when all have arrived, or
   FAILED. The decode worker polls ``is_complete`` / ``wait_complete`` and calls ``cancel``
   when it aborts the request or has taken the blocks into its batch; ``expire`` drops
   reservations whose lease passed so their blocks can be freed.

The shape fits one-sided transports (NIXL): the receiver's memory is registered when it is
created (``TransferTarget.metadata`` carries what a remote writer needs), the sender writes into
remote blocks, and the receiver is notified per write (``KVChunk`` without a payload).
"""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.wire import TransferBreakdown  # the router reads it too: torch-free

MiB = 1 << 20


class TransferStatus(enum.Enum):
    RECEIVING = "receiving"  # reserved; some (layer, block) writes still missing
    COMPLETE = "complete"  # every (layer, block) arrived and verified
    FAILED = "failed"  # a write was corrupt or invalid; the blocks hold garbage
    CANCELLED = "cancelled"  # dropped by cancel or expire; later writes are rejected


@dataclass(frozen=True)
class KVTransferConfig:
    """How KV moves between workers. Field names are the CLI flags / YAML keys."""

    transport: str = "grpc"  # "grpc" | "local" | "nixl"
    chunk_bytes: int = 1 * MiB  # payload of one message: consecutive blocks of one layer
    max_message_bytes: int = 64 * MiB  # gRPC send/receive limit; one block must fit
    max_inflight_chunks: int = 32  # per request stream: bounds the sender's staging memory
    lease_s: float = 60.0  # a reservation not complete after this is dropped by expire()
    num_server_threads: int = 16  # gRPC receiver: concurrent incoming request streams
    num_streams: int = 2  # gRPC: concurrent calls (connections) per request's transfer
    # The cluster secret every KV stream and NIXL pairing message is authenticated with
    # (kv_transfer.security). Empty: not checked; a Cluster always fills it. Never printed.
    secret: bytes = field(default=b"", repr=False)
    # gRPC over TLS: all three PEM files, or none. The sender checks the decode worker's
    # certificate against tls_ca, for the name tls_server_name (default: the address's host).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = ""
    # TEST ONLY (fault injection): each transfer's payload is corrupted in flight with this
    # probability, among the sender's first fault_corrupt_first transfers (0: all of them).
    fault_corrupt_rate: float = 0.0
    fault_corrupt_first: int = 0

    def __post_init__(self) -> None:
        if not self.transport:
            raise ValueError("transport must be a name such as 'grpc', got an empty string")
        if self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.max_message_bytes < self.chunk_bytes + MiB:
            raise ValueError(
                f"max_message_bytes must leave 1 MiB over chunk_bytes={self.chunk_bytes}, "
                f"got {self.max_message_bytes}"
            )
        if self.max_inflight_chunks <= 0:
            raise ValueError(
                f"max_inflight_chunks must be positive, got {self.max_inflight_chunks}"
            )
        if self.lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {self.lease_s}")
        if self.num_server_threads <= 0:
            raise ValueError(f"num_server_threads must be positive, got {self.num_server_threads}")
        if self.num_streams <= 0:
            raise ValueError(f"num_streams must be positive, got {self.num_streams}")
        if not isinstance(self.secret, bytes):
            raise ValueError(f"secret must be bytes, got {type(self.secret).__name__}")
        self._check_tls()
        if not 0.0 <= self.fault_corrupt_rate <= 1.0:
            raise ValueError(f"fault_corrupt_rate must be in [0, 1], got {self.fault_corrupt_rate}")
        if self.fault_corrupt_first < 0:
            raise ValueError(f"fault_corrupt_first must be >= 0, got {self.fault_corrupt_first}")
        if self.fault_corrupt_first and not self.fault_corrupt_rate:
            raise ValueError(
                f"fault_corrupt_first={self.fault_corrupt_first} needs a fault_corrupt_rate > 0"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def _check_tls(self) -> None:
        files = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        given = [name for name, path in files.items() if path]
        if not given:
            if self.tls_server_name:
                raise ValueError("tls_server_name is set without TLS (--kv-tls-cert/key/ca)")
            return
        if self.transport != "grpc":
            raise ValueError(f"TLS (--kv-tls-*) needs the grpc transport, got {self.transport!r}")
        for name, path in files.items():
            flag = "--kv-" + name.replace("_", "-")
            if not path:
                raise ValueError(
                    f"{name} ({flag}) is missing: TLS needs --kv-tls-cert, --kv-tls-key and "
                    f"--kv-tls-ca together (given: {', '.join(given)})"
                )
            if not os.path.isfile(path):
                raise ValueError(f"{name} ({flag}) file {path!r} does not exist")


@dataclass(frozen=True)
class TransferTarget:
    """Where one request's KV goes. Set by the decode worker's ``KVReceiver.expect``."""

    transport: str  # the receiver's transport name
    address: str  # the receiver's address: "host:port" for grpc, a name for local
    request_id: str
    block_ids: tuple[int, ...]  # the reserved destination blocks, in the request's order
    layout_signature: str  # KVLayout.signature of the decode worker's cache
    epoch: int  # this reservation; a re-made reservation gets another
    deadline: float  # time.time() when the lease ends; the sender's transfer deadline
    metadata: bytes = b""  # transport-specific (NIXL: agent metadata, memory descriptors)


@dataclass(frozen=True)
class KVChunk:
    """One write: consecutive blocks of one layer. Built by the sender, verified by the receiver.

    ``payload`` is the packed buffer (``kv_transfer.layout``) as bytes; a one-sided transport
    that already wrote the blocks sends the notification with ``payload=None``.
    """

    request_id: str
    epoch: int
    layer: int
    block_ids: tuple[int, ...]  # destination block ids, in payload order
    layout_signature: str
    dtype: str
    shape: tuple[int, ...]  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    payload: bytes | memoryview | None
    checksum: int  # layout.checksum(payload); 0 without a payload
    # Without a payload: layout.block_checksums of each destination block, in block_ids order.
    block_checksums: tuple[int, ...] = ()


@dataclass(frozen=True)
class TransferResult:
    """What a flush resolves to: the receiver's acknowledgement of one request's stream."""

    request_id: str
    epoch: int
    num_chunks: int  # writes acknowledged
    num_blocks: int  # (layer, block) pairs acknowledged
    complete: bool  # the receiver holds every (layer, block) of the reservation
    verify_s: float = 0.0  # receiver time spent checking these writes' checksums
    breakdown: TransferBreakdown | None = None  # set by the sender when it resolves flush


@dataclass(frozen=True)
class ReceiverInfo:
    """What a sender needs to reach a receiver before any request: pairing-time handshake.

    Set by ``KVReceiver.info``; the router hands it to prefill workers when it pairs them
    with a decode worker, so ``KVSender.connect`` does the handshake off the request path.
    """

    transport: str
    address: str
    layout_signature: str
    metadata: bytes = b""  # as TransferTarget.metadata


class KVTransferError(Exception):
    """Base of every transfer error; each maps to one gRPC status code."""


class UnknownRequestError(KVTransferError):
    """No reservation for the request: never made, cancelled or expired (NOT_FOUND)."""


class StaleEpochError(KVTransferError):
    """A write for another epoch than the current reservation's (FAILED_PRECONDITION)."""


class LayoutMismatchError(KVTransferError):
    """Prefill and decode caches differ in layout (FAILED_PRECONDITION)."""


class ChecksumError(KVTransferError):
    """A payload does not match its checksum; the reservation is failed (DATA_LOSS)."""


class InvalidChunkError(KVTransferError):
    """A block outside the reservation, sent twice, a bad layer or size (INVALID_ARGUMENT)."""


class AuthenticationError(KVTransferError):
    """The peer did not present the cluster's KV secret (UNAUTHENTICATED)."""


class TransferFailedError(KVTransferError):
    """The reservation failed earlier; its blocks must not be used (ABORTED)."""


class TransferAbortedError(KVTransferError):
    """The sender's transfer was aborted, or never begun (CANCELLED)."""


class TransportError(KVTransferError):
    """The receiver could not be reached or did not answer in time (UNAVAILABLE)."""


class KVSender(ABC):
    """Prefill side: writes a request's KV blocks into a decode worker's reserved blocks."""

    def connect(self, receiver: ReceiverInfo) -> None:
        """Handshake with a receiver ahead of its first request (pairing time).

        Raises LayoutMismatchError when the caches differ, TransportError when the receiver
        cannot be reached. Transports without a handshake do nothing.
        """
        return None

    @abstractmethod
    def begin(self, target: TransferTarget) -> None:
        """Start a request's transfer; raises LayoutMismatchError on a foreign layout."""

    @abstractmethod
    def send_layer(
        self,
        request_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        """Enqueue one layer's blocks; returns before any byte is sent. Never blocks on I/O.

        ``src_block_ids[i]`` of the local cache goes to ``dst_block_ids[i]`` of the target,
        which must be among ``target.block_ids``. Bad arguments raise ValueError here; transfer
        errors surface from ``flush``.
        """

    @abstractmethod
    def flush(self, request_id: str) -> Future[TransferResult]:
        """Close the request's stream; the future resolves when the receiver acknowledged it."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop the request: stop sending; its flush future (if any) raises."""

    @abstractmethod
    def close(self) -> None:
        """Abort everything in flight and stop the background thread."""
