"""The paged KV cache tensors: their layout, their size in bytes, and how many blocks fit.

Layout (the one definition; KV transfer imports it): per layer
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, K at index 0 and V at index 1. All
layers live in one contiguous ``[num_layers, 2, ...]`` tensor; each layer's cache is a
contiguous view of it. The cache is zero-filled, so a padded read never meets NaN.

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

DEFAULT_CPU_KV_CACHE_GIB = 1.0
_GIB = 1 << 30


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int, int, int, int]:
    """The shape of one layer's cache."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


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
