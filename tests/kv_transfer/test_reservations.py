"""kv_transfer.reservations: epochs, exactly-once claims, completion, leases (pure Python)."""

from __future__ import annotations

import threading

import pytest

from kv_transfer.base import (
    InvalidChunkError,
    StaleEpochError,
    TransferFailedError,
    TransferStatus,
    UnknownRequestError,
)
from kv_transfer.reservations import ReservationTable


def test_complete_after_every_layer_and_block() -> None:
    table = ReservationTable(num_layers=2)
    reservation = table.reserve("a", [3, 7], lease_s=10.0, now=0.0)
    for layer, blocks in [(0, [3]), (0, [7]), (1, [7, 3])]:
        admitted = table.admit("a", reservation.epoch, layer, blocks)
        assert admitted is reservation
        assert not reservation.done.is_set()
        complete = table.record(reservation, len(blocks))
    assert complete and reservation.status is TransferStatus.COMPLETE
    assert reservation.done.is_set()


def test_epochs_differ_and_a_stale_one_is_rejected_without_harm() -> None:
    table = ReservationTable(num_layers=1)
    old = table.reserve("a", [1], lease_s=10.0)
    assert table.cancel("a")
    new = table.reserve("a", [1], lease_s=10.0)
    assert new.epoch != old.epoch
    with pytest.raises(StaleEpochError):
        table.admit("a", old.epoch, 0, [1])
    assert new.status is TransferStatus.RECEIVING
    table.admit("a", new.epoch, 0, [1])
    assert table.record(new, 1)


def test_duplicate_or_foreign_block_fails_the_reservation() -> None:
    table = ReservationTable(num_layers=2)
    r = table.reserve("a", [1, 2], lease_s=10.0)
    table.admit("a", r.epoch, 0, [1])
    with pytest.raises(InvalidChunkError, match=r"blocks \[1\] twice"):
        table.admit("a", r.epoch, 0, [2, 1])
    assert r.status is TransferStatus.FAILED
    with pytest.raises(TransferFailedError):
        table.admit("a", r.epoch, 1, [1])

    r = table.reserve("b", [1, 2], lease_s=10.0)
    with pytest.raises(InvalidChunkError, match=r"blocks \[5\] not reserved"):
        table.admit("b", r.epoch, 0, [5])
    assert r.status is TransferStatus.FAILED

    r = table.reserve("c", [1, 2], lease_s=10.0)
    with pytest.raises(InvalidChunkError, match="twice"):
        table.admit("c", r.epoch, 0, [2, 2])
    r = table.reserve("d", [1, 2], lease_s=10.0)
    with pytest.raises(InvalidChunkError, match="layer 2"):
        table.admit("d", r.epoch, 2, [1])


def test_unknown_and_cancelled_requests() -> None:
    table = ReservationTable(num_layers=1)
    with pytest.raises(UnknownRequestError):
        table.admit("nope", 1, 0, [0])
    r = table.reserve("a", [0], lease_s=10.0)
    with pytest.raises(ValueError, match="already reserved"):
        table.reserve("a", [1], lease_s=10.0)
    assert table.cancel("a") and not table.cancel("a")
    assert r.status is TransferStatus.CANCELLED and r.done.is_set()
    assert table.get("a") is None and len(table) == 0
    with pytest.raises(UnknownRequestError):
        table.admit("a", r.epoch, 0, [0])


def test_reserve_rejects_repeated_blocks() -> None:
    with pytest.raises(ValueError, match="repeat"):
        ReservationTable(num_layers=1).reserve("a", [4, 4], lease_s=1.0)


def test_expire_drops_only_incomplete_past_their_lease() -> None:
    table = ReservationTable(num_layers=1)
    done = table.reserve("done", [0], lease_s=5.0, now=100.0)
    table.admit("done", done.epoch, 0, [0])
    table.record(done, 1)
    table.reserve("late", [1], lease_s=5.0, now=100.0)
    table.reserve("young", [2], lease_s=50.0, now=100.0)
    failed = table.reserve("failed", [3], lease_s=5.0, now=100.0)
    table.fail(failed, "corrupt")
    assert table.expire(now=104.0) == []
    assert sorted(table.expire(now=105.0)) == ["failed", "late"]
    assert table.get("done") is done and table.get("young") is not None
    assert table.get("late") is None


def test_cancel_waits_for_a_write_in_progress() -> None:
    table = ReservationTable(num_layers=1)
    r = table.reserve("a", [0], lease_s=10.0)
    cancelled = threading.Event()
    with r.write_lock:  # a write is putting bytes into the blocks
        thread = threading.Thread(target=lambda: cancelled.set() if table.cancel("a") else None)
        thread.start()
        assert not cancelled.wait(0.2)
    thread.join(5)
    assert cancelled.is_set()
