"""KV cache layout, sizing and allocation."""

from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig
from engine.kv_cache import (
    DEFAULT_CPU_KV_CACHE_GIB,
    allocate_kv_caches,
    bytes_per_block,
    kv_cache_shape,
    num_blocks_for_budget,
)

CPU = torch.device("cpu")
GEOMETRY = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 8}


def test_shape_and_bytes():
    assert kv_cache_shape(10, 16, 2, 8) == (2, 10, 16, 2, 8)
    assert bytes_per_block(4, 16, 2, 8, torch.float16) == 2 * 4 * 16 * 2 * 8 * 2
    assert bytes_per_block(1, 4, 1, 2, torch.float32) == 64


def test_blocks_from_the_configured_size():
    config = CacheConfig(block_size=4, kv_cache_size_gib=1 / 1024)  # 1 MiB
    block_bytes = bytes_per_block(block_size=4, dtype=torch.float32, **GEOMETRY)
    num_blocks = num_blocks_for_budget(config, dtype=torch.float32, device=CPU, **GEOMETRY)
    assert num_blocks == (1 << 20) // block_bytes == 512


def test_cpu_default_budget_and_override():
    num_blocks = num_blocks_for_budget(CacheConfig(), dtype=torch.float32, device=CPU, **GEOMETRY)
    block_bytes = bytes_per_block(block_size=16, dtype=torch.float32, **GEOMETRY)
    assert num_blocks == int(DEFAULT_CPU_KV_CACHE_GIB * (1 << 30)) // block_bytes
    config = CacheConfig(num_gpu_blocks_override=7, kv_cache_size_gib=1.0)
    assert num_blocks_for_budget(config, dtype=torch.float32, device=CPU, **GEOMETRY) == 7


def test_budget_below_one_block_is_an_error():
    config = CacheConfig(kv_cache_size_gib=1e-9)
    with pytest.raises(ValueError, match="no room for a KV cache block"):
        num_blocks_for_budget(config, dtype=torch.float32, device=CPU, **GEOMETRY)


def test_allocate_gives_zeroed_contiguous_views_of_one_tensor():
    caches = allocate_kv_caches(3, 5, 4, 2, 8, torch.bfloat16, CPU)
    assert len(caches) == 3
    base = caches[0].untyped_storage().data_ptr()
    for i, layer in enumerate(caches):
        assert layer.shape == kv_cache_shape(5, 4, 2, 8)
        assert layer.dtype == torch.bfloat16
        assert layer.is_contiguous()
        assert layer.untyped_storage().data_ptr() == base
        assert layer.data_ptr() == base + i * layer.numel() * layer.element_size()
        assert not layer.any()


@pytest.mark.gpu
def test_cuda_budget_follows_gpu_memory_utilization():
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    used_fraction = (total - free) / total
    config = CacheConfig(gpu_memory_utilization=min(1.0, used_fraction + 0.05))
    num_blocks = num_blocks_for_budget(config, dtype=torch.float16, device=device, **GEOMETRY)
    block_bytes = bytes_per_block(block_size=16, dtype=torch.float16, **GEOMETRY)
    assert abs(num_blocks * block_bytes - 0.05 * total) < 0.01 * total
