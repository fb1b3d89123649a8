"""kv_transfer.nixl_transport: real NIXL over UCX between this process and a decode child.

The prefill side (sender) runs here; the decode side (receiver) in a spawned process
(``nixl_peer``). Covers: the WRITEs land and verify, a restarted decode worker is re-handshaked,
writes after the reservation is lost are fenced, corruption is caught over the bytes that
landed, a layout mismatch is refused at pairing, and a revoked writer's blocks stay in
quarantine until its posted WRITEs are done (or its grace period passed when it is gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl._api", reason="the nixl package is part of requirements.txt")

from kv_transfer import KVLayout, KVTransferConfig, TransferStatus, get_transport
from kv_transfer.base import (
    ChecksumError,
    KVSender,
    LayoutMismatchError,
    StaleEpochError,
    TransferAbortedError,
    UnknownRequestError,
)
from kv_transfer.layout import cache_layer_shape, gather_blocks
from tests.kv_transfer.nixl_peer import DecodePeer

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
CONFIG = KVTransferConfig(transport="nixl")
SRC = [0, 1, 5, 6, 7]
DST = [3, 4, 9, 10, 2]


@pytest.fixture(scope="module")
def peer() -> Iterator[DecodePeer]:
    peer = DecodePeer(LAYOUT, num_blocks=16, address="decode-a")
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def src_caches() -> list[torch.Tensor]:
    torch.manual_seed(0)
    shape = cache_layer_shape(LAYOUT, 12)
    return [torch.randn(shape).to(torch.bfloat16) for _ in range(LAYOUT.num_layers)]


@pytest.fixture(scope="module")
def sender(src_caches: list[torch.Tensor], peer: DecodePeer) -> Iterator[KVSender]:
    sender = get_transport("nixl").create_sender(src_caches, CONFIG)
    sender.connect(peer.info)  # pairing time: the handshake happens here, not in a request
    yield sender
    sender.close()


def _expected(src_caches: list[torch.Tensor], src: list[int]) -> torch.Tensor:
    return torch.stack([gather_blocks(layer, torch.tensor(src)) for layer in src_caches])


def _send_all(sender: KVSender, request_id: str, layers: range = range(LAYOUT.num_layers)) -> None:
    for layer in layers:
        sender.send_layer(request_id, layer, SRC, DST)


def test_blocks_land_in_the_reserved_blocks_and_verify(
    sender: KVSender,
    peer: DecodePeer,
    src_caches: list[torch.Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = peer.expect("ok", DST)
    assert target.transport == "nixl" and target.metadata == peer.info.metadata
    with caplog.at_level(logging.INFO, logger="kv_transfer.nixl_transport"):
        sender.begin(target)
        _send_all(sender, "ok")
        result = sender.flush("ok").result(timeout=30)
    assert "handshake" not in caplog.text  # done at pairing (connect), not on the request path
    assert (result.num_chunks, result.num_blocks, result.complete) == (3, 15, True)
    assert peer.wait("ok") is True
    assert torch.equal(peer.blocks(DST), _expected(src_caches, SRC))
    assert peer.cancel("ok")
    assert not peer.quarantined("ok")  # every WRITE was notified: nothing can land any more


def test_writes_after_the_reservation_is_dropped_are_fenced(
    sender: KVSender, peer: DecodePeer
) -> None:
    target = peer.expect("dropped", DST)
    sender.begin(target)
    _send_all(sender, "dropped", range(1))
    assert peer.cancel("dropped")  # the decode worker aborts: the blocks may be reused
    _send_all(sender, "dropped", range(1, LAYOUT.num_layers))
    # Fenced either way, whichever comes first: the decode worker's revoke notice stops the
    # writer ("writes fenced"), or its receiver refuses the next write ("no reservation").
    with pytest.raises(UnknownRequestError, match=r"no reservation|writes fenced"):
        sender.flush("dropped").result(timeout=30)
    assert peer.status("dropped") is None


def test_a_stale_epoch_never_counts_for_the_new_reservation(
    sender: KVSender, peer: DecodePeer, src_caches: list[torch.Tensor]
) -> None:
    old = peer.expect("again", DST)
    assert peer.cancel("again")
    new = peer.expect("again", DST)  # re-made: a new epoch over the same blocks
    assert new.epoch != old.epoch
    sender.begin(old)  # a prefill worker that lost its reservation still writes
    _send_all(sender, "again")
    with pytest.raises(StaleEpochError, match=f"current epoch is {new.epoch}"):
        sender.flush("again").result(timeout=30)
    assert peer.status("again") is TransferStatus.RECEIVING  # nothing recorded for it
    sender.begin(new)
    _send_all(sender, "again")
    assert sender.flush("again").result(timeout=30).complete
    assert torch.equal(peer.blocks(DST), _expected(src_caches, SRC))
    assert peer.cancel("again")


def test_no_write_after_the_lease_ended(sender: KVSender, peer: DecodePeer) -> None:
    target = peer.expect("late", DST, lease_s=0.3)
    sender.begin(target)
    time.sleep(0.4)
    _send_all(sender, "late")
    with pytest.raises(TransferAbortedError, match=r"lease .* ended: write of layer 0 fenced"):
        sender.flush("late").result(timeout=30)
    assert peer.status("late") is TransferStatus.RECEIVING  # the decode side's expire drops it


def test_corruption_is_caught_over_the_bytes_that_landed(
    sender: KVSender, peer: DecodePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kv_transfer.sender as sender_module

    real = sender_module.block_checksums

    def one_bad(kv_layer: torch.Tensor, block_ids: list[int]) -> list[int]:
        sums = real(kv_layer, block_ids)
        return [sums[0] ^ 1, *sums[1:]]  # as if block 0's bytes changed on the way

    monkeypatch.setattr(sender_module, "block_checksums", one_bad)
    sender.begin(peer.expect("corrupt", DST))
    _send_all(sender, "corrupt")
    # Notifications of different WRITEs may arrive in any order: the first verified fails it.
    with pytest.raises(ChecksumError, match=r"layer \d: blocks landed corrupt \[\(3, "):
        sender.flush("corrupt").result(timeout=30)
    assert peer.status("corrupt") is TransferStatus.FAILED
    assert peer.cancel("corrupt")


def test_restarted_decode_worker_is_handshaked_again(
    src_caches: list[torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    sender = get_transport("nixl").create_sender(src_caches, CONFIG)
    first = DecodePeer(LAYOUT, num_blocks=16, address="decode-b")
    try:
        sender.connect(first.info)
        sender.begin(first.expect("r1", DST))
        _send_all(sender, "r1")
        assert sender.flush("r1").result(timeout=30).complete
        first.kill()  # SIGKILL, then a new process at the same address: a new agent

        second = DecodePeer(LAYOUT, num_blocks=16, address="decode-b")
        try:
            assert second.info.address == first.info.address
            assert second.info.metadata != first.info.metadata
            with caplog.at_level(logging.WARNING, logger="kv_transfer.nixl_transport"):
                sender.begin(second.expect("r2", DST))  # learns of the new agent here
                _send_all(sender, "r2")
                assert sender.flush("r2").result(timeout=30).complete
            assert "decode worker decode-b restarted" in caplog.text
            assert torch.equal(second.blocks(DST), _expected(src_caches, SRC))
        finally:
            second.close()
    finally:
        first.close()
        sender.close()


def test_layout_mismatch_is_refused_at_pairing(peer: DecodePeer) -> None:
    other = KVLayout(LAYOUT.num_layers, 8, LAYOUT.num_kv_heads, LAYOUT.head_dim, "bfloat16")
    caches = [torch.zeros(cache_layer_shape(other, 4), dtype=torch.bfloat16) for _ in range(3)]
    sender = get_transport("nixl").create_sender(caches, CONFIG)
    try:
        start = time.monotonic()
        with pytest.raises(
            LayoutMismatchError,
            match=r"layout 'kv-v1:n,2,4,2,8.* != prefill layout 'kv-v1:n,2,8,2,8",
        ):
            sender.connect(peer.info)
        assert time.monotonic() - start < 1.0  # refused, not timed out
        with pytest.raises(LayoutMismatchError):
            sender.begin(peer.expect("mismatch", DST))
        assert peer.cancel("mismatch")
    finally:
        sender.close()


# Quarantine: 64 KiB blocks, 64 per layer (4 MiB per WRITE, 8 layers), so WRITEs are still in
# flight over UCX's TCP transport when the decode side revokes the reservation.
BIG = KVLayout(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
BIG_IDS = list(range(64))[::-1]  # no two adjacent: one descriptor per block half
NEW_OWNER = 3.0  # what the blocks' next owner writes (exact in bf16)


@pytest.fixture(scope="module")
def big_caches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [
        torch.randn(cache_layer_shape(BIG, 64)).to(torch.bfloat16) for _ in range(BIG.num_layers)
    ]


def _wait_landed(peer: DecodePeer, ids: list[int]) -> None:
    """Until layer 0 of ``ids`` holds data: the writer was granted and WRITEs land."""
    deadline = time.monotonic() + 30
    while not peer.blocks(ids)[0].any():
        assert time.monotonic() < deadline, "layer 0 never landed"
        time.sleep(0.01)


def _start_victim(sender: KVSender, peer: DecodePeer) -> None:
    """A transfer that is revoked with WRITEs posted: layer 0 landed, layers 1-7 just posted,
    no flush (so the writer is live as far as the decode side knows)."""
    sender.begin(peer.expect("victim", BIG_IDS))
    sender.send_layer("victim", 0, list(range(64)), BIG_IDS)
    _wait_landed(peer, BIG_IDS)
    for layer in range(1, BIG.num_layers):
        sender.send_layer("victim", layer, list(range(64)), BIG_IDS)


def test_a_revoked_writer_s_blocks_stay_quarantined_until_its_writes_are_done(
    big_caches: list[torch.Tensor],
) -> None:
    peer = DecodePeer(BIG, num_blocks=64, address="decode-q", grace_s=60.0)
    sender = get_transport("nixl").create_sender(big_caches, CONFIG)
    try:
        sender.connect(peer.info)
        _start_victim(sender, peer)
        assert peer.cancel("victim")  # the decode worker aborts mid-transfer
        assert peer.quarantined("victim")  # not reusable yet: WRITEs may still land
        waited = peer.wait_safe("victim", timeout=30.0)
        # Released by the writer's "fenced, nothing in flight" answer, not by the grace period.
        assert waited is not None and waited < 30.0
        with pytest.raises(UnknownRequestError, match=r"no reservation|writes fenced"):
            sender.flush("victim").result(timeout=30)
        # The blocks' next owner: written and re-reserved; nothing of the old writer lands.
        peer.fill(BIG_IDS, NEW_OWNER)
        peer.expect("next", BIG_IDS)
        time.sleep(0.5)
        assert bool((peer.blocks(BIG_IDS) == NEW_OWNER).all())
        assert peer.cancel("next") and not peer.quarantined("next")  # never granted
    finally:
        sender.close()
        peer.close()


def test_a_gone_writer_s_blocks_are_released_after_the_grace_period(
    big_caches: list[torch.Tensor],
) -> None:
    grace_s = 1.5
    peer = DecodePeer(BIG, num_blocks=64, address="decode-g", grace_s=grace_s)
    sender = get_transport("nixl").create_sender(big_caches, CONFIG)
    try:
        sender.connect(peer.info)
        _start_victim(sender, peer)
        sender.close()  # the prefill worker goes away without a word (its agent is gone)
        assert peer.cancel("victim")
        assert peer.quarantined("victim")
        waited = peer.wait_safe("victim", timeout=30.0)
        assert waited is not None and grace_s - 0.2 <= waited < grace_s + 10.0
    finally:
        sender.close()
        peer.close()
