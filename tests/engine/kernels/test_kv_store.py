"""The KV store kernel writes exactly what its reference writes, and nothing else."""

import pytest
import torch

from engine.kernels.kv_store import kv_store, kv_store_reference


def check_store(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    num_tokens: int,
    device: str = "cpu",
    with_padding: bool = True,
) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    # A fused projection output: key and value are strided views, as in the model.
    kv = torch.randn((num_tokens, 2 * num_kv_heads, head_dim), generator=gen).to(dtype).to(device)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if with_padding:
        slots[::3] = -1  # padding tokens write nothing
    slots = slots.to(device)
    expected = kv_cache.clone()
    kv_store_reference(key, value, expected, slots)
    kv_store(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "dtype", "num_tokens"),
    [
        (8, 2, 64, torch.float32, 13),
        (16, 1, 64, torch.float16, 40),
        (32, 3, 128, torch.float32, 7),  # odd head count: masked head rows
        (16, 4, 80, torch.float16, 9),  # head_dim not a power of two: masked columns
    ],
)
def test_store_matches_reference(
    block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, num_tokens: int
) -> None:
    check_store(6, block_size, num_kv_heads, head_dim, dtype, num_tokens)


def test_store_rejects_bad_arguments() -> None:
    kv_cache = torch.zeros(2, 4, 8, 2, 64)
    key = torch.zeros(3, 2, 64)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store(key, key, kv_cache, slots.int())
    with pytest.raises(ValueError, match="value"):
        kv_store(key, torch.zeros(3, 2, 32), kv_cache, slots)
    with pytest.raises(ValueError, match="dtype"):
        kv_store(key.half(), key.half(), kv_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        kv_store(torch.zeros(3, 64, 2).transpose(1, 2), key, kv_cache, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_store_matches_reference_gpu(dtype: torch.dtype, block_size: int) -> None:
    check_store(512, block_size, 8, 128, dtype, 2048, device="cuda")
