"""Fault injection (test only): a KV payload corrupted in flight is caught, every time.

Over real gRPC on loopback and the in-process transport: with ``fault_corrupt_rate=1.0``
every transfer's bytes differ from the source while its checksums are the source's; the
receiver refuses it (``ChecksumError``), the reservation is FAILED (its completion raises,
so the decode side never decodes from it) and the source cache is untouched.
``fault_corrupt_first`` limits it to the sender's first N transfers, so a retry succeeds.
The NIXL case is in ``test_nixl_security.py`` (it needs a decode process).
"""

from __future__ import annotations

import random

import pytest
import torch

from kv_transfer import KVTransferConfig, TransferStatus, get_transport
from kv_transfer.base import ChecksumError, TransferFailedError
from kv_transfer.faults import FaultInjector
from kv_transfer.layout import KVLayout, cache_layer_shape, gather_blocks

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
SRC, DST = [0, 1, 2], [5, 6, 7]
NUM_TRANSFERS = 8


def _landed(caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    return torch.stack([gather_blocks(layer, torch.tensor(block_ids)) for layer in caches])


@pytest.mark.parametrize("transport", ["grpc", "local"])
def test_every_corrupted_transfer_is_detected_and_fails_its_reservation(transport: str) -> None:
    config = KVTransferConfig(transport=transport, secret=b"k" * 32, fault_corrupt_rate=1.0)
    torch.manual_seed(0)
    src = [torch.randn(cache_layer_shape(LAYOUT, 4)).to(torch.bfloat16) for _ in range(2)]
    source_before = [layer.clone() for layer in src]
    dst = [torch.zeros(cache_layer_shape(LAYOUT, 8), dtype=torch.bfloat16) for _ in range(2)]
    receiver = get_transport(transport).create_receiver(
        dst, config, address="127.0.0.1:0" if transport == "grpc" else ""
    )
    sender = get_transport(transport).create_sender(src, config)
    try:
        for i in range(NUM_TRANSFERS):
            target = receiver.expect(f"r{i}", DST)
            sender.begin(target)
            for layer in range(LAYOUT.num_layers):
                sender.send_layer(target.request_id, layer, SRC, DST)
            with pytest.raises(ChecksumError, match="checksum"):
                sender.flush(target.request_id).result(timeout=20)
            assert receiver.status(target.request_id) is TransferStatus.FAILED
            with pytest.raises(TransferFailedError):
                receiver.completion(target.request_id).result(timeout=5)
            assert receiver.cancel(target.request_id)
        assert all(torch.equal(a, b) for a, b in zip(src, source_before))  # source untouched
    finally:
        sender.close()
        receiver.close()


def test_only_the_first_transfers_are_corrupted_so_a_retry_succeeds() -> None:
    config = KVTransferConfig(secret=b"k" * 32, fault_corrupt_rate=1.0, fault_corrupt_first=2)
    src = [torch.randn(cache_layer_shape(LAYOUT, 4)).to(torch.bfloat16) for _ in range(2)]
    dst = [torch.zeros(cache_layer_shape(LAYOUT, 8), dtype=torch.bfloat16) for _ in range(2)]
    receiver = get_transport("grpc").create_receiver(dst, config, address="127.0.0.1:0")
    sender = get_transport("grpc").create_sender(src, config)
    outcomes = []
    try:
        for _attempt in range(3):  # the same request, retried into a fresh reservation
            target = receiver.expect("r", DST)
            sender.begin(target)
            for layer in range(LAYOUT.num_layers):
                sender.send_layer("r", layer, SRC, DST)
            try:
                outcomes.append(sender.flush("r").result(timeout=20).complete)
            except ChecksumError:
                outcomes.append("corrupt")
                receiver.cancel("r")
    finally:
        sender.close()
        receiver.close()
    assert outcomes == ["corrupt", "corrupt", True]
    assert torch.equal(_landed(dst, DST), _landed(src, SRC))


def test_injector_picks_by_rate_within_the_first_n() -> None:
    off = FaultInjector(KVTransferConfig())
    assert not off.enabled and not any(off.pick(str(i)) for i in range(100))
    half = FaultInjector(KVTransferConfig(fault_corrupt_rate=0.5), random.Random(1))
    picks = sum(half.pick(str(i)) for i in range(2000))
    assert 900 < picks < 1100
    first = FaultInjector(KVTransferConfig(fault_corrupt_rate=1.0, fault_corrupt_first=3))
    assert [first.pick(str(i)) for i in range(5)] == [True, True, True, False, False]


def test_fault_flags_are_validated() -> None:
    with pytest.raises(ValueError, match=r"fault_corrupt_rate must be in \[0, 1\], got 1.5"):
        KVTransferConfig(fault_corrupt_rate=1.5)
    with pytest.raises(ValueError, match="fault_corrupt_first must be >= 0, got -1"):
        KVTransferConfig(fault_corrupt_first=-1)
    with pytest.raises(ValueError, match="fault_corrupt_first=2 needs a fault_corrupt_rate > 0"):
        KVTransferConfig(fault_corrupt_first=2)
