from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVChunk(_message.Message):
    __slots__ = ("request_id", "layer", "block_ids", "dtype", "shape", "payload", "checksum", "epoch", "layout_signature", "block_checksums")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    checksum: int
    epoch: int
    layout_signature: str
    block_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., checksum: _Optional[int] = ..., epoch: _Optional[int] = ..., layout_signature: _Optional[str] = ..., block_checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("request_id", "epoch", "num_chunks", "num_blocks", "complete", "verify_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    num_chunks: int
    num_blocks: int
    complete: bool
    verify_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., epoch: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., complete: _Optional[bool] = ..., verify_seconds: _Optional[float] = ...) -> None: ...
