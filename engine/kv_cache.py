"""The paged KV cache tensors: their layout, their size in bytes, and how many blocks fit.

Layout (the one definition; KV transfer imports it): per layer
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, K at index 0 and V at index 1. All
layers live in one contiguous ``[num_layers, 2, ...]`` tensor; each layer's cache is a
contiguous view of it. The cache is zero-filled, so a padded read never meets NaN.
``gather_blocks`` / ``scatter_blocks`` move some blocks of a layer to and from a packed
``[n, 2, block_size, num_kv_heads, head_dim]`` buffer (the order KV transfer ships).

Sizing (``num_blocks_for_budget``):

- ``num_gpu_blocks_override`` wins, on any device;
- else ``kv_cache_size_gib`` when set, on any device;
- else on CUDA: ``gpu_memory_utilization * total`` minus what is already in use (the model is
  loaded first, so its weights count), minus ``reserved_bytes`` (activation headroom);
- else on CPU: ``DEFAULT_CPU_KV_CACHE_GIB``.
"""

from __future__ import annotations

import logging

import torch

from engine.config import CacheConfig

logger = logging.getLogger(__name__)

# Config dtype names (``ModelConfig.dtype``, the wire's dtype names) and their torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

DEFAULT_CPU_KV_CACHE_GIB = 1.0
_GIB = 1 << 30


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int, int, int, int]:
    """The shape of one layer's cache."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def gather_blocks(
    kv_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, on kv_layer's device
    out: torch.Tensor | None = None,  # [n, 2, block_size, num_kv_heads, head_dim]
) -> torch.Tensor:  # [n, 2, block_size, num_kv_heads, head_dim], contiguous
    """Pack blocks of one layer into ``[n, 2, block_size, num_kv_heads, head_dim]``: for each
    block id in order, its K then its V (what KV transfer ships; the Triton ``kv_pack``
    kernel does the same on CUDA).

    Each block's K (and V) must be contiguous in the cache, as the engine allocates it. The
    flat 3-D ``index_select`` into a contiguous ``out`` is a row copy: ~10x faster on CPU
    than selecting on the 5-D transposed view.
    """
    num_kv, num_blocks = kv_layer.shape[:2]
    rows = kv_layer.view(num_kv, num_blocks, -1).transpose(0, 1)  # [num_blocks, 2, B*H*D]
    if out is None:
        shape = (block_ids.shape[0], *kv_layer.shape[:1], *kv_layer.shape[2:])
        out = torch.empty(shape, dtype=kv_layer.dtype, device=kv_layer.device)
    torch.index_select(rows, 0, block_ids, out=out.view(block_ids.shape[0], num_kv, -1))
    return out


def scatter_blocks(
    packed: torch.Tensor,  # [n, 2, block_size, num_kv_heads, head_dim]
    kv_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64, on kv_layer's device
) -> None:
    """Write a packed buffer into blocks of one layer: the inverse of ``gather_blocks``.

    One ``index_copy_`` per K and V into the contiguous half of the cache: on the transposed
    view, ``index_copy_`` would copy the whole layer.
    """
    packed = packed.to(kv_layer.device)
    for kv in range(kv_layer.shape[0]):
        kv_layer[kv].index_copy_(0, block_ids, packed[:, kv])


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes across all layers (K and V)."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def _budget_bytes(cache_config: CacheConfig, device: torch.device, reserved_bytes: int) -> int:
    if cache_config.kv_cache_size_gib is not None:
        return int(cache_config.kv_cache_size_gib * _GIB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        return int(total * cache_config.gpu_memory_utilization) - in_use - reserved_bytes
    return int(DEFAULT_CPU_KV_CACHE_GIB * _GIB)


def num_blocks_for_budget(
    cache_config: CacheConfig,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    reserved_bytes: int = 0,
) -> int:
    """How many blocks of ``cache_config.block_size`` tokens the cache gets (see module doc)."""
    if cache_config.num_gpu_blocks_override is not None:
        return cache_config.num_gpu_blocks_override
    block_bytes = bytes_per_block(
        num_layers, cache_config.block_size, num_kv_heads, head_dim, dtype
    )
    budget = _budget_bytes(cache_config, device, reserved_bytes)
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"no room for a KV cache block on {device}: budget {budget / _GIB:.3f} GiB, "
            f"one block needs {block_bytes} bytes; raise gpu_memory_utilization or set "
            "kv_cache_size_gib / num_gpu_blocks_override"
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB) on %s",
        num_blocks,
        cache_config.block_size,
        num_blocks * block_bytes / _GIB,
        device,
    )
    return num_blocks


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:  # num_layers x [2, num_blocks, block_size, num_kv_heads, head_dim]
    """One zeroed contiguous tensor; returns its per-layer views."""
    shape = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    storage = torch.zeros((num_layers, *shape), dtype=dtype, device=device)
    return list(storage.unbind(0))
