"""Transports by name, imported only when asked for (so optional ones cost nothing).

    transport = get_transport(config.transport)  # "grpc" (default), "nixl", "local"
    receiver = transport.create_receiver(kv_caches, config, address="0.0.0.0:50051")  # decode
    sender = transport.create_sender(kv_caches, config)  # prefill

A transport makes the two halves for one worker's KV cache: the receiver's endpoint (its
server or registration) and the sender's ``StreamOpener``. Bookkeeping and verification are
shared (``KVReceiver``, ``StreamingKVSender``); a transport only moves chunks.

``"nixl"`` (``kv_transfer/nixl_transport.py``): its receiver endpoint registers the cache with
a NIXL agent and publishes the agent metadata in ``ReceiverInfo`` / ``TransferTarget.metadata``;
its streams (``StreamOpener.one_sided``) write blocks in place into the remote blocks and
notify the receiver with payload-less ``KVChunk``s carrying per-block checksums.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kv_transfer.base import KVSender, KVTransferConfig
from kv_transfer.layout import PackFn, UnpackFn
from kv_transfer.receiver import KVReceiver

# name -> "module:class"; imported on first use.
_TRANSPORTS: dict[str, str] = {
    "grpc": "kv_transfer.grpc_transport:GrpcTransport",
    "local": "kv_transfer.local_transport:LocalTransport",
    "nixl": "kv_transfer.nixl_transport:NixlTransport",
}


class Transport(ABC):
    """Makes senders and receivers that move KV chunks one way."""

    name: str

    @abstractmethod
    def create_sender(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        pack_fn: PackFn | None = None,
    ) -> KVSender: ...

    @abstractmethod
    def create_receiver(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        address: str,
        advertise_host: str | None = None,
        unpack_fn: UnpackFn | None = None,
    ) -> KVReceiver:
        """Start receiving at ``address``; ``receiver.address`` is where senders connect.

        grpc: "host:port" (port 0 picks a free one); a wildcard host ("0.0.0.0") needs
        ``advertise_host``, the host other nodes dial. local: a name ("" picks one).
        """


def available_transports() -> tuple[str, ...]:
    return tuple(_TRANSPORTS)


def get_transport(name: str) -> Transport:
    """The transport registered as ``name``; ValueError for unknown or not installed ones."""
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {tuple(_TRANSPORTS)}")
    module_name, class_name = _TRANSPORTS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"KV transport {name!r} is not available: {error}") from error
    return getattr(module, class_name)()
