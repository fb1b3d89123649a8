"""The byte layout of KV blocks on the wire.

The engine keeps one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at 1). A transfer moves some blocks of one layer as a *packed* buffer
``[n, 2, block_size, num_kv_heads, head_dim]``, C order, little-endian: block after block, each
block its K then its V. ``gather_blocks`` builds it and ``scatter_blocks`` writes it back
(both from ``engine.kv_cache``, the owner of the cache layout); ``payload_bytes`` /
``packed_from_bytes`` convert it to and from bytes. The Triton kernels
``engine.kernels.kv_pack.kv_pack`` / ``kv_unpack`` move the same buffer with the same
signatures; ``pack_fns(device)`` picks them on CUDA and the torch functions elsewhere.

Prefill and decode workers must agree on the layout: ``KVLayout.signature`` names it, and a
transfer between different signatures is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import crc32c
import numpy as np
import torch

from engine.kv_cache import TORCH_DTYPES, gather_blocks, kv_cache_shape, scatter_blocks

# Received payloads are immutable bytes; the packed view of them is only ever read (scattered).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# (kv_layer, block_ids, out) -> packed; see gather_blocks.
PackFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (packed, kv_layer, block_ids) -> None; see scatter_blocks.
UnpackFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one worker's KV cache, as far as a transfer needs it."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(TORCH_DTYPES)}, got {self.dtype!r}")

    @property
    def signature(self) -> str:
        """Names the packed layout; prefill and decode must have the same one."""
        return (
            f"kv-v1:n,2,{self.block_size},{self.num_kv_heads},{self.head_dim}"
            f":{self.dtype}:layers={self.num_layers}"
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer, K and V."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def packed_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        return (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_kv_caches(cls, kv_caches: Sequence[torch.Tensor]) -> KVLayout:
        """The layout of an engine KV cache: one ``[2, num_blocks, B, H, D]`` tensor per layer."""
        if not kv_caches:
            raise ValueError("kv_caches is empty: need one tensor per layer")
        first = kv_caches[0]
        names = {v: k for k, v in TORCH_DTYPES.items()}
        if first.dtype not in names:
            raise ValueError(f"KV cache dtype {first.dtype} is not one of {tuple(TORCH_DTYPES)}")
        if first.dim() != 5:
            raise ValueError(f"KV cache layer must be 5-D, got shape {tuple(first.shape)}")
        _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
        layout = cls(len(kv_caches), block_size, num_kv_heads, head_dim, names[first.dtype])
        expected = cache_layer_shape(layout, num_blocks)
        for i, layer in enumerate(kv_caches):
            if tuple(layer.shape) != expected or layer.dtype != first.dtype:
                raise ValueError(
                    f"KV cache layer {i} is {tuple(layer.shape)} {layer.dtype}, "
                    f"expected {expected} {first.dtype}"
                )
        return layout


def cache_layer_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    """The engine's shape for one layer of the cache."""
    return kv_cache_shape(num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)


def pack_fns(device: torch.device) -> tuple[PackFn, UnpackFn]:
    """The Triton pack/unpack kernels on CUDA, the torch functions above elsewhere."""
    if device.type != "cuda":
        return gather_blocks, scatter_blocks
    from engine.kernels.kv_pack import kv_pack, kv_unpack

    return kv_pack, kv_unpack


def payload_bytes(packed: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU packed buffer (bf16 included: viewed as uint8)."""
    if packed.device.type != "cpu" or not packed.is_contiguous():
        raise ValueError("payload_bytes needs a contiguous CPU tensor")
    return memoryview(packed.view(torch.uint8).numpy()).cast("B")


def packed_from_bytes(
    payload: bytes | bytearray | memoryview, layout: KVLayout, num_blocks: int
) -> torch.Tensor:  # [num_blocks, 2, block_size, num_kv_heads, head_dim], shares payload
    """View received bytes as a packed buffer; raises ValueError when the size is wrong."""
    expected = num_blocks * layout.block_nbytes
    if len(payload) != expected:
        raise ValueError(f"payload has {len(payload)} bytes, expected {expected}")
    if expected == 0:
        return torch.empty(layout.packed_shape(0), dtype=layout.torch_dtype)
    flat = torch.frombuffer(payload, dtype=layout.torch_dtype)
    return flat.view(layout.packed_shape(num_blocks))


def block_checksums(
    kv_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: Sequence[int],
) -> list[int]:
    """``checksum`` of each block's packed bytes (its K then its V), in ``block_ids`` order.

    On CPU it reads the cache in place (K and V of a block are each contiguous; the CRC
    chains from one to the other), so verifying a one-sided write copies nothing.
    """
    if kv_layer.device.type != "cpu":
        ids = torch.tensor(list(block_ids), dtype=torch.int64, device=kv_layer.device)
        packed = gather_blocks(kv_layer, ids).cpu()  # [n, 2, block_size, H, D]
        return [checksum(payload_bytes(packed[i])) for i in range(len(block_ids))]
    if not kv_layer.is_contiguous():
        raise ValueError("block_checksums needs the engine's contiguous cache layer")
    rows = kv_layer.view(torch.uint8).numpy().reshape(2, kv_layer.shape[1], -1)
    keys, values = rows[0], rows[1]  # [num_blocks, block bytes / 2]: one row per block
    return [checksum(values[b], checksum(keys[b])) for b in block_ids]


def checksum(payload: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of a payload, continuing from ``value``.

    Hardware CRC32C (SSE4.2 / ARMv8 CRC) runs at ~11 GB/s on one core here against 2.9 GB/s
    for zlib's CRC-32 and ~12 GB/s for xxh3_64 (``benchmarks/kv_transfer_rate.py --checksums``);
    it chains (``checksum(b, checksum(a)) == checksum(a + b)``), so per-block checksums of
    non-contiguous K and V halves need no gather, and it releases the GIL on large buffers.
    """
    return crc32c.crc32c(payload, value)
