"""The committed protobuf/gRPC code matches what grpcio-tools generates from the .proto now."""

from __future__ import annotations

from pathlib import Path

from kv_transfer.pb import generate as proto_generate


def test_committed_code_is_fresh(tmp_path: Path) -> None:
    fresh = proto_generate.generate(tmp_path)
    committed = proto_generate.generated_paths(proto_generate.OUT_DIR)
    assert [p.name for p in fresh] == [p.name for p in committed]
    pairs = zip(fresh, committed, strict=True)
    stale = [c.name for f, c in pairs if f.read_bytes() != c.read_bytes()]
    hint = "run `.venv/bin/python -m kv_transfer.pb.generate`"
    assert not stale, f"stale generated code {stale}: {hint}"


def test_generated_code_imports_from_the_package() -> None:
    from kv_transfer.pb import kv_transfer_pb2, kv_transfer_pb2_grpc

    chunk = kv_transfer_pb2.KVChunk(request_id="r", layer=3, block_ids=[7, 9], payload=b"\x00\x01")
    assert kv_transfer_pb2.KVChunk.FromString(chunk.SerializeToString()) == chunk
    assert hasattr(kv_transfer_pb2_grpc, "KVTransferStub")
