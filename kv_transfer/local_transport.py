"""In-process transport: the sender hands each chunk straight to the receiver's ``receive``.

For tests and for prefill and decode sharing one process. Receivers register under a name in
this module; a chunk's payload is a view of the sender's packed buffer, written into the
decode cache on the sender's thread - with the same checks (epoch, layout, checksum, exactly
once) as over the wire.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from kv_transfer.base import (
    KVChunk,
    KVSender,
    KVTransferConfig,
    TransferAbortedError,
    TransferResult,
    TransferTarget,
    TransportError,
)
from kv_transfer.layout import PackFn, UnpackFn
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import ChunkStream, StreamingKVSender, StreamOpener
from kv_transfer.transport import Transport

_registry_lock = threading.Lock()
_receivers: dict[str, KVReceiver] = {}
_names = itertools.count()


class _LocalEndpoint:
    transport = "local"
    metadata = b""

    def __init__(self, receiver: KVReceiver, address: str) -> None:
        with _registry_lock:
            self.address = address or f"local-{next(_names)}"
            if self.address in _receivers:
                raise ValueError(f"local KV receiver {self.address!r} already exists")
            _receivers[self.address] = receiver

    def revoke(self, request_id: str) -> None:
        """Nothing to do: every later write of the request is refused in ``receive``."""

    def close(self) -> None:
        with _registry_lock:
            _receivers.pop(self.address, None)


class _LocalStream(ChunkStream):
    def __init__(self, receiver: KVReceiver, target: TransferTarget) -> None:
        self._receiver = receiver
        self._target = target
        self._cancelled = False
        self._num_chunks = 0
        self._num_blocks = 0
        self._complete = False
        self._verify_s = 0.0

    def write(self, chunk: KVChunk) -> None:
        if self._cancelled:
            raise TransferAbortedError(f"stream of {chunk.request_id!r} was cancelled")
        self._complete, seconds = self._receiver.receive_timed(chunk)
        self._verify_s += seconds
        self._num_chunks += 1
        self._num_blocks += len(chunk.block_ids)

    def finish(self) -> Future[TransferResult]:
        future: Future[TransferResult] = Future()
        if self._cancelled:
            future.set_exception(TransferAbortedError(f"{self._target.request_id!r} cancelled"))
        else:
            future.set_result(
                TransferResult(
                    self._target.request_id,
                    self._target.epoch,
                    self._num_chunks,
                    self._num_blocks,
                    self._complete,
                    self._verify_s,
                )
            )
        return future

    def cancel(self) -> None:
        self._cancelled = True


class _LocalOpener(StreamOpener):
    transport = "local"

    def open(self, target: TransferTarget) -> ChunkStream:
        with _registry_lock:
            receiver = _receivers.get(target.address)
        if receiver is None:
            raise TransportError(f"no local KV receiver named {target.address!r}")
        return _LocalStream(receiver, target)

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    name = "local"

    def create_sender(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        pack_fn: PackFn | None = None,
    ) -> KVSender:
        return StreamingKVSender(kv_caches, config, _LocalOpener(), pack_fn=pack_fn)

    def create_receiver(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        address: str = "",
        advertise_host: str | None = None,  # in-process: nothing to advertise
        unpack_fn: UnpackFn | None = None,
    ) -> KVReceiver:
        return KVReceiver(
            kv_caches,
            config,
            lambda receiver: _LocalEndpoint(receiver, address),
            unpack_fn=unpack_fn,
        )
