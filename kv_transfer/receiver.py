"""The decode side of a KV transfer: reservations in, verified blocks written into the cache.

The receiver owns (registers) the decode worker's KV cache for writing. Its endpoint - a gRPC
server, an in-process name, a NIXL agent - delivers each ``KVChunk`` to ``receive``,
from the endpoint's own threads. ``receive`` admits the write against the reservation
(``kv_transfer.reservations``), checks the payload's layout and checksum, scatters it into the
reserved blocks and records it; any problem raises a ``KVTransferError`` for the endpoint to
report to the sender. A chunk without a payload is the notification of a one-sided write
that already landed: each block's checksum is verified against the bytes in the cache.

The decode worker drives the rest: ``expect`` (after reserving blocks in its block pool),
``completion`` (a future) / ``is_complete`` / ``wait_complete``, ``cancel`` (abort, or the
request joined the decode batch) and ``expire`` (leases; it frees the returned requests'
blocks).

Late bytes never land in reused blocks (the seam with the decode worker, which owns the
blocks): ``cancel`` returns a ``CancelledReservation`` whose ``safe`` future resolves once no
write can land in its blocks any more; the decode worker keeps the blocks out of reuse
(``engine.pin_blocks``) until then. gRPC and local writes go through ``receive``, which
holds the reservation's ``write_lock`` while copying and rechecks the status under it, so
``safe`` is resolved when ``cancel`` returns. A one-sided transport's WRITEs bypass
``receive``: its endpoint's ``revoke`` returns the future (NIXL: resolved when the writer
confirms it stopped and its posted WRITEs completed, or after a grace period; see
``kv_transfer.nixl_receiver``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from kv_transfer.base import (
    ChecksumError,
    InvalidChunkError,
    KVChunk,
    KVTransferConfig,
    LayoutMismatchError,
    ReceiverInfo,
    StaleEpochError,
    TransferFailedError,
    TransferStatus,
    TransferTarget,
    UnknownRequestError,
)
from kv_transfer.layout import (
    KVLayout,
    UnpackFn,
    block_checksums,
    checksum,
    pack_fns,
    packed_from_bytes,
)
from kv_transfer.reservations import Reservation, ReservationTable

logger = logging.getLogger(__name__)


class ReceiverEndpoint(Protocol):
    """How senders reach a receiver; made by a transport for one receiver."""

    transport: str  # the transport's registry name
    address: str  # where senders connect (bound address: a port 0 is resolved)
    metadata: bytes  # anything else a remote writer needs (NIXL: agent metadata)

    def revoke(self, request_id: str) -> Future[None] | None:
        """The reservation was dropped before it completed: stop its writer (one-sided
        transports; the others refuse later writes in ``receive``). Returns a future that
        resolves once none of the writer's writes can land any more, or None when none can
        already."""

    def close(self) -> None: ...


EndpointFactory = Callable[["KVReceiver"], ReceiverEndpoint]


@dataclass(frozen=True)
class CancelledReservation:
    """What ``KVReceiver.cancel`` hands back: the dropped reservation's blocks and when the
    decode worker may reuse them (it keeps them out of its free pool until ``safe``)."""

    request_id: str
    block_ids: tuple[int, ...]  # the reservation's destination blocks
    safe: Future[None]  # resolved (never failed) once no write can land in block_ids any more

    @property
    def quarantined(self) -> bool:
        """Writes may still land: the blocks must not be reused yet."""
        return not self.safe.done()


def _resolved() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


class KVReceiver:
    """Decode side: verifies incoming writes into reserved blocks and tracks completion."""

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        endpoint: EndpointFactory,
        *,
        unpack_fn: UnpackFn | None = None,
    ) -> None:
        self.layout = KVLayout.from_kv_caches(kv_caches)
        self._kv_caches = list(kv_caches)
        self._num_blocks = int(kv_caches[0].shape[1])
        self._device = kv_caches[0].device
        self._config = config
        self._unpack_fn = unpack_fn or pack_fns(self._device)[1]
        self._table = ReservationTable(self.layout.num_layers)
        self._endpoint = endpoint(self)

    @property
    def address(self) -> str:
        return self._endpoint.address

    def expect(
        self, request_id: str, block_ids: Sequence[int], *, lease_s: float | None = None
    ) -> TransferTarget:
        """Reserve ``block_ids`` (already allocated by the caller) for a request's KV."""
        bad = [b for b in block_ids if not 0 <= b < self._num_blocks]
        if bad:
            raise ValueError(f"block ids {bad} outside the cache's {self._num_blocks} blocks")
        lease_s = self._config.lease_s if lease_s is None else lease_s
        reservation = self._table.reserve(request_id, block_ids, lease_s)
        return TransferTarget(
            transport=self._endpoint.transport,
            address=self._endpoint.address,
            request_id=request_id,
            block_ids=reservation.block_ids,
            layout_signature=self.layout.signature,
            epoch=reservation.epoch,
            deadline=time.time() + lease_s,
            metadata=self._endpoint.metadata,
        )

    def receive(self, chunk: KVChunk) -> bool:
        """Verify one write and put it in the cache; True when the request is now complete."""
        return self.receive_timed(chunk)[0]

    def receive_timed(self, chunk: KVChunk) -> tuple[bool, float]:
        """``receive``, and the seconds its checks (checksum included) took."""
        reservation = self._table.admit(chunk.request_id, chunk.epoch, chunk.layer, chunk.block_ids)
        try:
            start = time.perf_counter()
            packed = self._verified_packed(chunk)
            verify_s = time.perf_counter() - start
            with reservation.write_lock:
                _check_live(reservation)
                if packed is not None:
                    self._write(chunk, packed)
        except Exception as error:
            if not isinstance(error, UnknownRequestError | TransferFailedError):
                self._table.fail(reservation, str(error))
            logger.warning("rejected KV write: %s", error)
            raise
        return self._table.record(reservation, len(chunk.block_ids)), verify_s

    def status(self, request_id: str) -> TransferStatus | None:
        """The reservation's status, or None when there is none (never made, or dropped)."""
        reservation = self._table.get(request_id)
        return None if reservation is None else reservation.status

    def is_complete(self, request_id: str) -> bool:
        return self.status(request_id) is TransferStatus.COMPLETE

    def wait_complete(self, request_id: str, timeout: float | None = None) -> bool:
        """True once complete, False on timeout; raises when failed, cancelled or unknown."""
        reservation = self._table.get(request_id)
        if reservation is None:
            raise UnknownRequestError(f"no reservation for request {request_id!r}")
        if not reservation.done.wait(timeout):
            return False
        _check_live(reservation)
        return True

    def check_epoch(self, request_id: str, epoch: int) -> None:
        """Raise unless ``epoch`` is the live reservation's (a one-sided writer asks first)."""
        reservation = self._table.get(request_id)
        if reservation is None:
            raise UnknownRequestError(f"no reservation for request {request_id!r}")
        if reservation.epoch != epoch:
            raise StaleEpochError(
                f"request {request_id!r}: write for epoch {epoch}, "
                f"current epoch is {reservation.epoch}"
            )
        _check_live(reservation)

    def completion(self, request_id: str) -> Future[None]:
        """Resolves once every write arrived (None), or with the error when the transfer
        failed or the reservation was dropped; ``UnknownRequestError`` when there is none."""
        reservation = self._table.get(request_id)
        if reservation is None:
            raise UnknownRequestError(f"no reservation for request {request_id!r}")
        return reservation.completion

    def cancel(self, request_id: str) -> CancelledReservation | None:
        """Drop the reservation; None if there is none. Once it returns no write through
        ``receive`` touches its blocks; a one-sided writer's posted WRITEs may still land
        until the returned ``safe`` future resolves (incomplete reservations only)."""
        reservation = self._table.cancel(request_id)
        if reservation is None:
            return None
        safe = None
        if reservation.num_recorded < reservation.num_expected:
            safe = self._endpoint.revoke(request_id)
        return CancelledReservation(request_id, reservation.block_ids, safe or _resolved())

    def expire(self, now: float | None = None) -> list[str]:
        """Drop incomplete reservations whose lease ended (``time.monotonic()`` clock).

        Their writers are revoked, but a caller that frees blocks should ``cancel`` each
        reservation instead (the decode worker does, after its engine's own lease expiry):
        only ``cancel`` hands back the future that says when the blocks are safe."""
        expired = self._table.expire(now)
        if expired:
            logger.warning("KV reservations expired before completing: %s", expired)
        for request_id in expired:
            self._endpoint.revoke(request_id)
        return expired

    def info(self) -> ReceiverInfo:
        """What a sender needs to connect ahead of any request (pairing-time handshake)."""
        return ReceiverInfo(
            transport=self._endpoint.transport,
            address=self._endpoint.address,
            layout_signature=self.layout.signature,
            metadata=self._endpoint.metadata,
        )

    @property
    def num_reservations(self) -> int:
        return len(self._table)

    def close(self) -> None:
        self._endpoint.close()

    def _verified_packed(self, chunk: KVChunk) -> torch.Tensor | None:
        """The payload as a packed tensor after every check; None for a one-sided write."""
        if chunk.layout_signature != self.layout.signature:
            raise LayoutMismatchError(
                f"sender layout {chunk.layout_signature!r} != receiver {self.layout.signature!r}"
            )
        num_blocks = len(chunk.block_ids)
        shape = self.layout.packed_shape(num_blocks)
        if chunk.dtype != self.layout.dtype or tuple(chunk.shape) != shape:
            raise InvalidChunkError(
                f"chunk is {chunk.dtype} {tuple(chunk.shape)}, expected {self.layout.dtype} {shape}"
            )
        if chunk.payload is None:
            self._check_block_checksums(chunk)
            return None
        if len(chunk.payload) != num_blocks * self.layout.block_nbytes:
            raise InvalidChunkError(
                f"payload has {len(chunk.payload)} bytes, "
                f"expected {num_blocks * self.layout.block_nbytes}"
            )
        self._check_checksum(chunk, chunk.payload)
        return packed_from_bytes(chunk.payload, self.layout, num_blocks)

    def _check_checksum(self, chunk: KVChunk, payload: bytes | memoryview) -> None:
        actual = checksum(payload)
        if actual != chunk.checksum:
            raise ChecksumError(
                f"request {chunk.request_id!r} layer {chunk.layer} blocks {list(chunk.block_ids)}:"
                f" checksum {actual:#010x} != sent {chunk.checksum:#010x}"
            )

    def _check_block_checksums(self, chunk: KVChunk) -> None:
        """A one-sided write: each block's checksum over the bytes that landed in the cache."""
        if len(chunk.block_checksums) != len(chunk.block_ids):
            raise InvalidChunkError(
                f"notification has {len(chunk.block_checksums)} block checksums for "
                f"{len(chunk.block_ids)} blocks"
            )
        actual = block_checksums(self._kv_caches[chunk.layer], chunk.block_ids)
        bad = [
            (block, f"{got:#010x} != sent {sent:#010x}")
            for block, got, sent in zip(chunk.block_ids, actual, chunk.block_checksums, strict=True)
            if got != sent
        ]
        if bad:
            raise ChecksumError(
                f"request {chunk.request_id!r} layer {chunk.layer}: blocks landed corrupt {bad}"
            )

    def _write(self, chunk: KVChunk, packed: torch.Tensor) -> None:
        block_ids = torch.tensor(chunk.block_ids, dtype=torch.int64, device=self._device)
        self._unpack_fn(packed, self._kv_caches[chunk.layer], block_ids)
        if self._device.type == "cuda":  # recorded as arrived only once it is in the cache
            torch.cuda.current_stream(self._device).synchronize()


def _check_live(reservation: Reservation) -> None:
    """Raise unless the reservation may still be written to / used."""
    if reservation.status is TransferStatus.CANCELLED:
        raise UnknownRequestError(f"reservation for {reservation.request_id!r} was dropped")
    if reservation.status is TransferStatus.FAILED:
        raise TransferFailedError(f"request {reservation.request_id!r}: {reservation.error}")
