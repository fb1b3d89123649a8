"""kv_transfer.grpc_codec: the hand-written encoding is the protobuf message, both ways."""

from __future__ import annotations

import dataclasses

import pytest

from kv_transfer import grpc_codec
from kv_transfer.base import InvalidChunkError, KVChunk, TransferResult
from kv_transfer.pb import kv_transfer_pb2

SIZES = [0, 1, 127, 128, 300, 16384, 1 << 20]


def _payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _chunk(payload: bytes | memoryview | None) -> KVChunk:
    return KVChunk("req", 2**40 + 3, 3, (9, 1, 300), "sig", "float16", (3, 2, 4, 2, 8), payload, 77)


def _protobuf(payload: bytes) -> kv_transfer_pb2.KVChunk:
    return kv_transfer_pb2.KVChunk(
        request_id="req",
        epoch=2**40 + 3,
        layer=3,
        block_ids=[9, 1, 300],
        layout_signature="sig",
        dtype="float16",
        shape=[3, 2, 4, 2, 8],
        payload=payload,
        checksum=77,
    )


@pytest.mark.parametrize("size", SIZES)
def test_encode_is_the_protobuf_message(size: int) -> None:
    payload = _payload(size)
    expected = _protobuf(payload)
    assert kv_transfer_pb2.KVChunk.FromString(grpc_codec.encode_chunk(_chunk(payload))) == expected
    from_view = grpc_codec.encode_chunk(_chunk(memoryview(payload)))
    assert kv_transfer_pb2.KVChunk.FromString(from_view) == expected


@pytest.mark.parametrize("size", SIZES)
def test_decode_reads_protobufs_encoding(size: int) -> None:
    payload = _payload(size)
    raw = _protobuf(payload).SerializeToString()  # payload in the middle, protobuf's order
    chunk = grpc_codec.decode_chunk(raw)
    # proto3 writes no empty bytes field: an empty payload reads back as absent (None).
    assert (chunk.payload is None) == (size == 0)
    assert bytes(chunk.payload or b"") == payload
    assert chunk == _chunk(chunk.payload)
    assert grpc_codec.decode_chunk(grpc_codec.encode_chunk(_chunk(payload))) == chunk


def test_payloadless_notification_round_trip() -> None:
    chunk = dataclasses.replace(_chunk(None), checksum=0, block_checksums=(1, 2**32 - 1, 5))
    raw = grpc_codec.encode_chunk(chunk)
    assert kv_transfer_pb2.KVChunk.FromString(raw).block_checksums == [1, 2**32 - 1, 5]
    assert grpc_codec.decode_chunk(raw) == chunk


def test_decode_takes_the_last_payload_like_protobuf() -> None:
    raw = _protobuf(b"first").SerializeToString() + _protobuf(b"second").SerializeToString()
    assert bytes(grpc_codec.decode_chunk(raw).payload) == b"second"
    assert kv_transfer_pb2.KVChunk.FromString(raw).payload == b"second"


def test_decode_refuses_malformed_bytes() -> None:
    raw = grpc_codec.encode_chunk(_chunk(_payload(300)))
    with pytest.raises(InvalidChunkError, match="truncated"):
        grpc_codec.decode_chunk(raw[:-1])
    with pytest.raises(InvalidChunkError, match="varint"):
        grpc_codec.decode_chunk(b"\x80")
    with pytest.raises(InvalidChunkError, match="wire type"):
        grpc_codec.decode_chunk(bytes([1 << 3 | 3]))


def test_ack_round_trip() -> None:
    result = TransferResult("req", 2**50, 12, 96, True)
    assert grpc_codec.decode_ack(grpc_codec.encode_ack(result)) == result
    assert kv_transfer_pb2.KVAck.FromString(grpc_codec.encode_ack(result)).num_blocks == 96
