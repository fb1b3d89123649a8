"""What both halves of the NIXL transport share: the agent, the regions, the messages.

``NixlAgent`` wraps one ``nixl_agent`` (UCX backend, ``NIXL_THREAD_SYNC_STRICT``: NIXL
serializes calls, so the sender thread, a control thread and a poller may all use it; no
progress thread: the pollers' calls progress UCX) with one KV cache registered. A cache's
(layer, K/V, block) regions are described once as an ``[num_layers * 2 * num_blocks, 3]``
array (``NixlAgent.regions``) and addressed by ``region_indices``. ``NixlPeerInfo`` is what a
decode worker publishes about its agent and cache. The notifications both sides exchange
(first byte: the kind) are listed in ``kv_transfer.nixl_transport``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kv_transfer.base import KVTransferError, TransportError
from kv_transfer.layout import KVLayout

HANDSHAKE_TIMEOUT_S = 10.0
# A poller's sleep between polls while transfers are in flight (its polls also progress
# UCX: the agents run without NIXL's progress thread, which spins a core) and when idle.
ACTIVE_POLL_S = 0.0002
IDLE_POLL_S = 0.002
# Notification kinds (see kv_transfer.nixl_transport for the protocol).
HELLO, HELLO_REPLY, GRANT, GRANT_REPLY = b"H", b"h", b"G", b"g"
CHUNK, FINISH, ACK, ERROR, REVOKE = b"C", b"F", b"A", b"E", b"R"
ERRORS_BY_NAME = {
    cls.__name__: cls
    for cls in (KVTransferError, *KVTransferError.__subclasses__())  # one level: all of them
}


@dataclass(frozen=True)
class NixlPeerInfo:
    """What a remote writer needs about a decode worker's NIXL agent and cache."""

    agent_name: str
    agent_metadata: bytes  # nixl_agent.get_agent_metadata()
    layout_signature: str
    num_blocks: int
    layer_addresses: tuple[int, ...]  # data_ptr() of each layer's [2, num_blocks, B, H, D]
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int
    auth: str = ""  # security.authenticator(secret, "nixl-receiver", agent_name); "" without

    def encode(self) -> bytes:
        fields = asdict(self) | {"agent_metadata": self.agent_metadata.hex()}
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, raw: bytes) -> NixlPeerInfo:
        try:
            fields = json.loads(raw)
            fields["agent_metadata"] = bytes.fromhex(fields["agent_metadata"])
            fields["layer_addresses"] = tuple(fields["layer_addresses"])
            return cls(**fields)
        except (ValueError, KeyError, TypeError) as error:
            raise TransportError(f"malformed NIXL peer metadata: {error}") from error


def peer_name(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def encode_message(kind: bytes, **fields: object) -> bytes:
    return kind + json.dumps(fields).encode()


class NixlAgent:
    """A NIXL agent with one KV cache registered, and region descriptors over it."""

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor]) -> None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as error:  # the registry turns this into "not available"
            raise ModuleNotFoundError(f"the nixl package is not installed: {error}") from error
        config = nixl_agent_config(
            # No progress thread: NIXL runs it without a delay, so it takes ~20% of a core
            # even when idle, from the engine on a CPU worker; our pollers progress UCX.
            enable_prog_thread=False,
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.agent = nixl_agent(name, config)
        if "UCX" not in self.agent.backends:
            raise TransportError("NIXL's UCX backend did not start (see UCX_TLS in the README)")
        self.name = name
        self.layout = KVLayout.from_kv_caches(kv_caches)
        self.num_blocks = int(kv_caches[0].shape[1])
        self.mem_type = "DRAM" if kv_caches[0].device.type == "cpu" else "VRAM"
        self.device_id = max(0, kv_caches[0].get_device())
        self.layer_addresses = tuple(int(t.data_ptr()) for t in kv_caches)
        self._registered = self.agent.register_memory(list(kv_caches))

    def regions(
        self, layer_addresses: Sequence[int], num_blocks: int, device_id: int
    ) -> np.ndarray:  # [num_layers * 2 * num_blocks, 3]
        """(address, length, device) of every (layer, K/V, block) region of a cache in this
        layout, in ``region_indices`` order."""
        half = self.layout.block_nbytes // 2  # one block's K (or V) of one layer
        starts = np.arange(2 * num_blocks, dtype=np.int64) * half  # within a layer
        addresses = (np.asarray(layer_addresses, dtype=np.int64)[:, None] + starts).reshape(-1)
        rows = np.empty((addresses.shape[0], 3), dtype=np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2] = addresses, half, device_id
        return rows

    def close(self) -> None:
        self.agent.deregister_memory(self._registered)


def region_indices(
    layer: int, block_ids: Sequence[int], num_blocks: int
) -> np.ndarray:  # [2 * len(block_ids)] int32: the K regions, then the V regions
    ids = np.asarray(block_ids, dtype=np.int64)
    base = 2 * layer * num_blocks
    return np.concatenate((base + ids, base + num_blocks + ids)).astype(np.int32)
