"""Moving KV blocks from prefill to decode workers: block byte layout, sender, receiver,
transports.

- ``layout``: ``KVLayout`` and the one definition of a block's bytes on the wire
  (``gather_blocks`` / ``scatter_blocks``: ``[n, 2, block_size, num_kv_heads, head_dim]``).
- ``base``: the contracts - ``TransferTarget``, ``KVChunk``, ``TransferResult``,
  ``KVTransferConfig``, ``KVSender`` and the ``KVTransferError`` family.
- ``reservations``: the decode side's bookkeeping (epochs, leases, exactly-once), pure Python.
- ``receiver``: ``KVReceiver``, which verifies writes and puts them in the decode cache.
- ``sender``: ``StreamingKVSender``, the background pack/checksum/stream thread.
- ``transport``: ``get_transport(name)``; ``grpc_transport`` (default; its messages are
  encoded by ``grpc_codec``), ``nixl_transport`` (one-sided NIXL/UCX WRITEs cache to cache;
  ``nixl_receiver``, ``nixl_agent``), ``local_transport`` (in-process).

Decode worker::

    transport = get_transport(config.transport)
    receiver = transport.create_receiver(kv_caches, config, address="127.0.0.1:0")
    target = receiver.expect(request_id, block_ids)  # after reserving the blocks
    ...  # hand target to the prefill worker
    receiver.wait_complete(request_id, timeout=...)  # or poll is_complete()

Prefill worker::

    sender = get_transport(target.transport).create_sender(kv_caches, config)
    sender.begin(target)
    sender.send_layer(request_id, layer, src_block_ids, dst_block_ids)  # per finished layer
    sender.flush(request_id).result()  # before its source blocks may change
"""

from kv_transfer.base import (
    KVChunk,
    KVSender,
    KVTransferConfig,
    KVTransferError,
    TransferResult,
    TransferStatus,
    TransferTarget,
)
from kv_transfer.layout import KVLayout, gather_blocks, scatter_blocks
from kv_transfer.receiver import KVReceiver
from kv_transfer.transport import Transport, available_transports, get_transport

__all__ = [
    "KVChunk",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "KVTransferConfig",
    "KVTransferError",
    "TransferResult",
    "TransferStatus",
    "TransferTarget",
    "Transport",
    "available_transports",
    "gather_blocks",
    "get_transport",
    "scatter_blocks",
]
