"""The gRPC KV stream's messages as bytes (``proto/kv_transfer.proto``); protobuf stops here.

A ``KVChunk`` message is mostly payload, so its payload is never handled by protobuf:
``encode_chunk`` serializes the header fields with protobuf and appends the payload field
(protobuf parsers accept fields in any order), copying the payload once, from the sender's
staging buffer into the message. ``decode_chunk`` walks the message's top-level fields, hands
everything but the payload to protobuf and returns the payload as a view of the received
bytes, copying it zero times. Both are tested against the protobuf library's own encoding.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from kv_transfer.base import InvalidChunkError, KVChunk, TransferResult
from kv_transfer.pb import kv_transfer_pb2

_SERVICE = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"]
SERVICE_NAME = _SERVICE.full_name  # "pdserve.kv_transfer.KVTransfer"
PUSH_KV = _SERVICE.methods_by_name["PushKV"].name
PUSH_KV_PATH = f"/{SERVICE_NAME}/{PUSH_KV}"

_PAYLOAD_FIELD = kv_transfer_pb2.KVChunk.DESCRIPTOR.fields_by_name["payload"].number
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_PAYLOAD_KEY = bytes([_PAYLOAD_FIELD << 3 | _LENGTH_DELIMITED])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise InvalidChunkError("malformed KVChunk message: bad varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def encode_chunk(chunk: KVChunk) -> bytes:
    """A serialized ``KVChunk`` message: the header fields, then the payload field if any."""
    header = kv_transfer_pb2.KVChunk(
        request_id=chunk.request_id,
        layer=chunk.layer,
        block_ids=chunk.block_ids,
        dtype=chunk.dtype,
        shape=chunk.shape,
        checksum=chunk.checksum,
        epoch=chunk.epoch,
        layout_signature=chunk.layout_signature,
        block_checksums=chunk.block_checksums,
    )
    payload = chunk.payload
    if not payload:  # absent or empty: proto3 writes no field for an empty bytes value
        return header.SerializeToString()
    return b"".join((header.SerializeToString(), _PAYLOAD_KEY, _varint(len(payload)), payload))


def decode_chunk(raw: bytes) -> KVChunk:
    """Parse a ``KVChunk`` message; its payload is a view of ``raw`` (None when absent).

    Raises InvalidChunkError for a malformed message.
    """
    view = memoryview(raw)
    header = bytearray()  # every field but the payload
    payload: memoryview | None = None
    pos = 0
    while pos < len(raw):
        start = pos
        key, pos = _read_varint(raw, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _read_varint(raw, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(raw, pos)
            pos += length
        else:
            raise InvalidChunkError(f"malformed KVChunk message: wire type {wire_type}")
        if pos > len(raw):
            raise InvalidChunkError("malformed KVChunk message: truncated")
        if field == _PAYLOAD_FIELD and wire_type == _LENGTH_DELIMITED:
            payload = view[pos - length : pos]  # the last occurrence wins, as in protobuf
        else:
            header += view[start:pos]
    try:
        message = kv_transfer_pb2.KVChunk.FromString(bytes(header))
    except DecodeError as error:
        raise InvalidChunkError(f"malformed KVChunk message: {error}") from error
    return KVChunk(
        request_id=message.request_id,
        epoch=message.epoch,
        layer=message.layer,
        block_ids=tuple(message.block_ids),
        layout_signature=message.layout_signature,
        dtype=message.dtype,
        shape=tuple(message.shape),
        payload=payload,
        checksum=message.checksum,
        block_checksums=tuple(message.block_checksums),
    )


def encode_ack(result: TransferResult) -> bytes:
    return kv_transfer_pb2.KVAck(
        request_id=result.request_id,
        epoch=result.epoch,
        num_chunks=result.num_chunks,
        num_blocks=result.num_blocks,
        complete=result.complete,
        verify_seconds=result.verify_s,
    ).SerializeToString()


def decode_ack(raw: bytes) -> TransferResult:
    ack = kv_transfer_pb2.KVAck.FromString(raw)
    return TransferResult(
        ack.request_id, ack.epoch, ack.num_chunks, ack.num_blocks, ack.complete, ack.verify_seconds
    )
