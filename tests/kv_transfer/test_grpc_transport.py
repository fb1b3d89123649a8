"""The gRPC transport at the wire: corrupt messages, status codes, message limits."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from kv_transfer import KVTransferConfig, TransferStatus, get_transport
from kv_transfer.base import ChecksumError, TransferFailedError, TransportError
from kv_transfer.layout import (
    KVLayout,
    cache_layer_shape,
    checksum,
    gather_blocks,
    payload_bytes,
)
from kv_transfer.pb import kv_transfer_pb2, kv_transfer_pb2_grpc
from kv_transfer.receiver import KVReceiver

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    caches = [torch.zeros(cache_layer_shape(LAYOUT, 8), dtype=torch.bfloat16) for _ in range(2)]
    receiver = get_transport("grpc").create_receiver(
        caches, KVTransferConfig(), address="127.0.0.1:0"
    )
    yield receiver
    receiver.close()


@pytest.fixture
def stub(receiver: KVReceiver) -> Iterator[kv_transfer_pb2_grpc.KVTransferStub]:
    with grpc.insecure_channel(receiver.address) as channel:
        yield kv_transfer_pb2_grpc.KVTransferStub(channel)


def _message(
    request_id: str, epoch: int, layer: int, block_ids: list[int]
) -> kv_transfer_pb2.KVChunk:
    source = torch.randn(cache_layer_shape(LAYOUT, 4)).to(torch.bfloat16)
    payload = bytes(payload_bytes(gather_blocks(source, torch.arange(len(block_ids)))))
    return kv_transfer_pb2.KVChunk(
        request_id=request_id,
        layer=layer,
        block_ids=block_ids,
        dtype=LAYOUT.dtype,
        shape=LAYOUT.packed_shape(len(block_ids)),
        payload=payload,
        checksum=checksum(payload),
        epoch=epoch,
        layout_signature=LAYOUT.signature,
    )


def test_receiver_binds_the_port_it_reports(receiver: KVReceiver) -> None:
    host, _, port = receiver.address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_well_formed_messages_are_acknowledged(receiver: KVReceiver, stub) -> None:
    target = receiver.expect("r", [5, 6])
    messages = [_message("r", target.epoch, layer, [5, 6]) for layer in range(2)]
    ack = stub.PushKV(iter(messages), timeout=10)
    assert (ack.request_id, ack.epoch, ack.num_chunks, ack.num_blocks, ack.complete) == (
        "r",
        target.epoch,
        2,
        4,
        True,
    )
    assert receiver.is_complete("r")


def test_corrupted_payload_is_rejected_and_fails_the_request(receiver: KVReceiver, stub) -> None:
    target = receiver.expect("r", [5, 6])
    message = _message("r", target.epoch, 0, [5, 6])
    corrupt = bytearray(message.payload)
    corrupt[17] ^= 0x40  # one flipped bit on the wire
    message.payload = bytes(corrupt)
    with pytest.raises(grpc.RpcError) as raised:
        stub.PushKV(iter([message]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS
    assert ("pdserve-kv-error", ChecksumError.__name__) in raised.value.trailing_metadata()
    assert receiver.status("r") is TransferStatus.FAILED
    with pytest.raises(TransferFailedError, match="checksum"):
        receiver.wait_complete("r", timeout=1)
    # Later, well-formed writes cannot revive it.
    with pytest.raises(grpc.RpcError) as raised:
        stub.PushKV(iter([_message("r", target.epoch, 1, [5, 6])]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.ABORTED


def test_status_codes_for_unknown_request_and_stale_epoch(receiver: KVReceiver, stub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.PushKV(iter([_message("ghost", 1, 0, [0])]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    target = receiver.expect("r", [0])
    with pytest.raises(grpc.RpcError) as raised:
        stub.PushKV(iter([_message("r", target.epoch + 1, 0, [0])]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert receiver.status("r") is TransferStatus.RECEIVING


def test_one_call_carries_one_request(receiver: KVReceiver, stub) -> None:
    a, b = receiver.expect("a", [0]), receiver.expect("b", [1])
    messages = [_message("a", a.epoch, 0, [0]), _message("b", b.epoch, 0, [1])]
    with pytest.raises(grpc.RpcError) as raised:
        stub.PushKV(iter(messages), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_messages_above_grpcs_default_4mb_limit_go_through() -> None:
    layout = KVLayout(num_layers=1, block_size=16, num_kv_heads=8, head_dim=64, dtype="float32")
    config = KVTransferConfig(chunk_bytes=6 << 20, max_message_bytes=8 << 20)
    assert config.chunk_bytes // layout.block_nbytes == 96  # one 6 MiB message per layer
    src = [torch.randn(cache_layer_shape(layout, 96))]
    dst = [torch.zeros(cache_layer_shape(layout, 100))]
    transport = get_transport("grpc")
    receiver = transport.create_receiver(dst, config, address="127.0.0.1:0")
    sender = transport.create_sender(src, config)
    try:
        sender.begin(receiver.expect("big", list(range(4, 100))))
        sender.send_layer("big", 0, list(range(96)), list(range(4, 100)))
        result = sender.flush("big").result(30)
        assert result.complete and result.num_chunks == 1
        assert torch.equal(dst[0][:, 4:], src[0])
    finally:
        sender.close()
        receiver.close()


def test_wildcard_bind_advertises_the_node_address() -> None:
    """``--kv-host 0.0.0.0`` (across nodes): the receiver advertises the address Ray knows
    this node by, unless told another; either way prefill workers can dial it."""
    import ray.util

    caches = [torch.zeros(cache_layer_shape(LAYOUT, 2), dtype=torch.bfloat16) for _ in range(2)]
    for advertise, expected in ((None, ray.util.get_node_ip_address()), ("127.0.0.1",) * 2):
        receiver = get_transport("grpc").create_receiver(
            caches, KVTransferConfig(), address="0.0.0.0:0", advertise_host=advertise
        )
        try:
            host, _, port = receiver.expect("r", [0]).address.rpartition(":")
            assert host == expected
            socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()  # bound to all
        finally:
            receiver.close()


def test_unreachable_receiver_and_ended_lease_surface_from_flush(receiver: KVReceiver) -> None:
    src = [torch.randn(cache_layer_shape(LAYOUT, 2)).to(torch.bfloat16) for _ in range(2)]
    sender = get_transport("grpc").create_sender(src, KVTransferConfig())
    try:
        target = receiver.expect("r", [0])
        receiver.close()  # nobody listens there any more
        sender.begin(target)
        sender.send_layer("r", 0, [1], [0])
        with pytest.raises(TransportError, match="UNAVAILABLE"):
            sender.flush("r").result(30)

        late = dataclasses.replace(target, request_id="late", deadline=time.time() - 1)
        sender.begin(late)
        sender.send_layer("late", 0, [1], [0])
        with pytest.raises(TransportError, match="lease"):
            sender.flush("late").result(30)
    finally:
        sender.close()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        KVTransferConfig(chunk_bytes=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        KVTransferConfig(chunk_bytes=8 << 20, max_message_bytes=8 << 20)
    with pytest.raises(ValueError, match="lease_s"):
        KVTransferConfig(lease_s=0)
