"""kv_transfer.receiver: reservations, verification, and the one-sided (payload-less) path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kv_transfer import KVChunk, KVTransferConfig, TransferStatus, get_transport
from kv_transfer.base import ChecksumError, InvalidChunkError, LayoutMismatchError
from kv_transfer.layout import (
    KVLayout,
    cache_layer_shape,
    checksum,
    gather_blocks,
    payload_bytes,
    scatter_blocks,
)
from kv_transfer.receiver import KVReceiver

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")


@pytest.fixture
def kv_caches() -> list[torch.Tensor]:
    return [torch.zeros(cache_layer_shape(LAYOUT, 6), dtype=torch.float16) for _ in range(2)]


@pytest.fixture
def receiver(kv_caches: list[torch.Tensor]) -> Iterator[KVReceiver]:
    receiver = get_transport("local").create_receiver(kv_caches, KVTransferConfig(lease_s=5.0))
    yield receiver
    receiver.close()


def _notification(target, layer: int, packed: torch.Tensor) -> KVChunk:
    """What a one-sided writer sends after the bytes landed: per-block checksums, no payload."""
    sums = tuple(checksum(payload_bytes(packed[i])) for i in range(packed.shape[0]))
    return _chunk(target, layer, packed, payload=None, checksum=0, block_checksums=sums)


def _chunk(target, layer: int, packed: torch.Tensor, **overrides) -> KVChunk:
    payload = payload_bytes(packed)
    fields = dict(
        request_id=target.request_id,
        epoch=target.epoch,
        layer=layer,
        block_ids=target.block_ids,
        layout_signature=LAYOUT.signature,
        dtype=LAYOUT.dtype,
        shape=tuple(packed.shape),
        payload=payload,
        checksum=checksum(payload),
    )
    fields.update(overrides)
    return KVChunk(**fields)


def test_expect_returns_the_target(receiver: KVReceiver) -> None:
    target = receiver.expect("r", [4, 1])
    assert target.transport == "local" and target.address == receiver.address
    assert target.block_ids == (4, 1) and target.layout_signature == LAYOUT.signature
    with pytest.raises(ValueError, match=r"\[6\]"):
        receiver.expect("s", [0, 6])


def test_header_problems_fail_the_reservation(receiver: KVReceiver) -> None:
    packed = torch.ones(LAYOUT.packed_shape(1), dtype=torch.float16)
    target = receiver.expect("a", [2])
    with pytest.raises(LayoutMismatchError):
        receiver.receive(_chunk(target, 0, packed, layout_signature="kv-v1:other"))
    assert receiver.status("a") is TransferStatus.FAILED

    target = receiver.expect("b", [3])
    with pytest.raises(InvalidChunkError, match="expected float16"):
        receiver.receive(_chunk(target, 0, packed, shape=(1, 2, 4, 2, 4)))
    target = receiver.expect("c", [4])
    with pytest.raises(InvalidChunkError, match="bytes"):
        receiver.receive(_chunk(target, 0, packed, payload=b"\x00" * 10))


def test_one_sided_write_is_verified_against_the_cache(
    receiver: KVReceiver, kv_caches: list[torch.Tensor]
) -> None:
    """A NIXL-style writer puts the bytes in place, then notifies with the checksum only."""
    target = receiver.expect("r", [5, 0])
    ids = torch.tensor(target.block_ids)
    for layer in range(2):
        packed = torch.randn(LAYOUT.packed_shape(2)).to(torch.float16)
        scatter_blocks(packed, kv_caches[layer], ids)  # the one-sided write
        notification = _notification(target, layer, packed)
        assert receiver.receive(notification) is (layer == 1)
        assert torch.equal(gather_blocks(kv_caches[layer], ids), packed)
    assert receiver.is_complete("r")

    target = receiver.expect("bad", [3, 4])
    packed = torch.randn(LAYOUT.packed_shape(2)).to(torch.float16)
    scatter_blocks(packed[:1], kv_caches[0], torch.tensor([3]))  # block 4 never landed
    with pytest.raises(ChecksumError, match=r"blocks landed corrupt \[\(4, "):
        receiver.receive(_notification(target, 0, packed))
    assert receiver.status("bad") is TransferStatus.FAILED

    target = receiver.expect("short", [2])
    with pytest.raises(InvalidChunkError, match="0 block checksums for 1 blocks"):
        receiver.receive(_chunk(target, 0, packed[:1], payload=None))
