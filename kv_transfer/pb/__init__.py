"""The KV stream's protobuf/gRPC code, generated from ``proto/kv_transfer.proto``.

Lives inside ``kv_transfer`` (not as a top-level ``proto`` package, which would collide with
the ``proto`` package of proto-plus that ``ray[default]`` installs). Only
``kv_transfer/grpc_codec.py`` and ``kv_transfer/grpc_transport.py`` import it: protobuf types
stop there.
"""
