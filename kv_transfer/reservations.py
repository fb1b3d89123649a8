"""Decode-side reservations: which (layer, block) writes a request still expects (pure Python).

A reservation is made for a request's destination blocks with a fresh epoch and a lease. Each
write is first *admitted* (reservation exists, epoch current, layer in range, blocks reserved
and not claimed before: the blocks are claimed atomically, so a duplicate is caught even when
two writes race), then *recorded* once its bytes are in the cache. When every (layer, block) is
recorded the reservation is COMPLETE. A corrupt or invalid write FAILS it. ``cancel`` and
``expire`` remove it (status CANCELLED) and wait for any write in progress to leave its blocks,
so the decode worker may reuse them as soon as they return.

States: RECEIVING -> COMPLETE | FAILED; any -> CANCELLED (removed from the table).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from kv_transfer.base import (
    InvalidChunkError,
    StaleEpochError,
    TransferFailedError,
    TransferStatus,
    UnknownRequestError,
)


@dataclass
class Reservation:
    """One request's expected writes. Owned by ``ReservationTable``; read-only for others."""

    request_id: str
    epoch: int
    block_ids: tuple[int, ...]
    num_layers: int
    deadline: float  # time.monotonic() when the lease ends
    status: TransferStatus = TransferStatus.RECEIVING
    error: str | None = None
    num_recorded: int = 0
    # Per layer, the blocks admitted so far (claimed, maybe not yet written).
    claimed: list[set[int]] = field(default_factory=list)
    # Held while a write's bytes go into this reservation's blocks.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)  # COMPLETE, FAILED or gone
    # Resolved with ``done``: None when COMPLETE; the error when FAILED or CANCELLED. The
    # decode worker chains the start of decoding onto it (no thread waits per request).
    completion: Future[None] = field(default_factory=Future)

    def _signal(self) -> None:
        """Set ``done`` and resolve ``completion`` from the status (once)."""
        self.done.set()
        if self.completion.done():
            return
        if self.status is TransferStatus.COMPLETE:
            self.completion.set_result(None)
        elif self.status is TransferStatus.FAILED:
            self.completion.set_exception(
                TransferFailedError(f"request {self.request_id!r}: {self.error}")
            )
        else:
            self.completion.set_exception(
                UnknownRequestError(f"reservation for {self.request_id!r} was dropped")
            )

    @property
    def num_expected(self) -> int:
        return self.num_layers * len(self.block_ids)


class ReservationTable:
    """Thread-safe reservations by request id; epochs are unique within a process run."""

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}
        # Start from the clock so a restarted decode worker never reuses a live epoch.
        self._epochs = itertools.count(time.time_ns())

    def reserve(
        self, request_id: str, block_ids: Sequence[int], lease_s: float, now: float | None = None
    ) -> Reservation:
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"block_ids of {request_id!r} repeat a block: {list(block_ids)}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        now = time.monotonic() if now is None else now
        with self._lock:
            if request_id in self._reservations:
                raise ValueError(f"request {request_id!r} is already reserved; cancel it first")
            reservation = Reservation(
                request_id=request_id,
                epoch=next(self._epochs),
                block_ids=tuple(block_ids),
                num_layers=self._num_layers,
                deadline=now + lease_s,
                claimed=[set() for _ in range(self._num_layers)],
            )
            if reservation.num_expected == 0:
                reservation.status = TransferStatus.COMPLETE
                reservation._signal()
            self._reservations[request_id] = reservation
            return reservation

    def admit(
        self, request_id: str, epoch: int, layer: int, block_ids: Sequence[int]
    ) -> Reservation:
        """Check a write against the reservation and claim its blocks; raises on a bad one.

        Writes that reveal a sender bug (a block outside the reservation or sent twice) fail
        the reservation; a stale epoch or an unknown request leaves the current one alone.
        """
        with self._lock:
            reservation = self._reservations.get(request_id)
            if reservation is None:
                raise UnknownRequestError(f"no reservation for request {request_id!r}")
            if epoch != reservation.epoch:
                raise StaleEpochError(
                    f"request {request_id!r}: write for epoch {epoch}, "
                    f"current epoch is {reservation.epoch}"
                )
            if reservation.status is TransferStatus.FAILED:
                raise TransferFailedError(f"request {request_id!r} failed: {reservation.error}")
            if not 0 <= layer < reservation.num_layers:
                raise InvalidChunkError(
                    f"request {request_id!r}: layer {layer} not in [0, {reservation.num_layers})"
                )
            reserved = set(reservation.block_ids)
            outside = [b for b in block_ids if b not in reserved]
            claimed = reservation.claimed[layer]
            repeated = [b for b in block_ids if b in claimed] or _repeats(block_ids)
            if outside or repeated:
                what = f"blocks {outside} not reserved" if outside else f"blocks {repeated} twice"
                message = f"request {request_id!r} layer {layer}: {what}"
                self._fail_locked(reservation, message)
                raise InvalidChunkError(message)
            claimed.update(block_ids)
            return reservation

    def record(self, reservation: Reservation, num_blocks: int) -> bool:
        """Count admitted blocks as written; returns True when the reservation is complete."""
        with self._lock:
            reservation.num_recorded += num_blocks
            assert reservation.num_recorded <= reservation.num_expected
            if (
                reservation.status is TransferStatus.RECEIVING
                and reservation.num_recorded == reservation.num_expected
            ):
                reservation.status = TransferStatus.COMPLETE
                reservation._signal()
            return reservation.status is TransferStatus.COMPLETE

    def fail(self, reservation: Reservation, error: str) -> None:
        with self._lock:
            self._fail_locked(reservation, error)

    def get(self, request_id: str) -> Reservation | None:
        with self._lock:
            return self._reservations.get(request_id)

    def cancel(self, request_id: str) -> Reservation | None:
        """Remove a reservation; returns it once no write that went through ``receive`` touches
        its blocks (None if unknown). Writes admitted before and still copying hold the
        reservation's ``write_lock``; writes after see it CANCELLED under that lock."""
        with self._lock:
            reservation = self._remove_locked(request_id)
        if reservation is None:
            return None
        with reservation.write_lock:  # wait for a write in progress to leave the blocks
            pass
        return reservation

    def expire(self, now: float | None = None) -> list[str]:
        """Cancel every reservation whose lease passed before it completed; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [
                self._remove_locked(r.request_id)
                for r in list(self._reservations.values())
                if r.deadline <= now and r.status is not TransferStatus.COMPLETE
            ]
        for reservation in expired:
            with reservation.write_lock:
                pass
        return [r.request_id for r in expired]

    def __len__(self) -> int:
        with self._lock:
            return len(self._reservations)

    def _fail_locked(self, reservation: Reservation, error: str) -> None:
        if reservation.status is TransferStatus.RECEIVING:
            reservation.status = TransferStatus.FAILED
            reservation.error = error
            reservation._signal()

    def _remove_locked(self, request_id: str) -> Reservation | None:
        reservation = self._reservations.pop(request_id, None)
        if reservation is not None:
            reservation.status = TransferStatus.CANCELLED
            reservation._signal()
        return reservation


def _repeats(block_ids: Sequence[int]) -> list[int]:
    seen: set[int] = set()
    repeated = []
    for block_id in block_ids:
        if block_id in seen:
            repeated.append(block_id)
        seen.add(block_id)
    return repeated
