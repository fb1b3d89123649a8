"""KV pack/unpack equal their references, and unpack(pack(x)) moves blocks exactly."""

import pytest
import torch

from engine.kernels.kv_pack import kv_pack, kv_pack_reference, kv_unpack, kv_unpack_reference


def random_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> torch.Tensor:  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype)


def check_pack_unpack(
    block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"
) -> None:
    num_blocks = 12
    src = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, 0).to(device)
    dst = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, 1).to(device)
    src_ids = torch.tensor([7, 2, 11, 0], dtype=torch.int32, device=device)
    dst_ids = torch.tensor([3, 9, 1, 4], dtype=torch.int64, device=device)

    buffer = kv_pack(src, src_ids)
    assert torch.equal(buffer, kv_pack_reference(src, src_ids))
    # The documented wire layout: per block, K then V.
    assert torch.equal(buffer[1, 0], src[0, 2]) and torch.equal(buffer[1, 1], src[1, 2])

    expected = dst.clone()
    kv_unpack_reference(buffer, expected, dst_ids)
    kv_unpack(buffer, dst, dst_ids)
    assert torch.equal(dst, expected)
    assert torch.equal(dst[:, dst_ids.long()], src[:, src_ids.long()])


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "dtype"),
    [
        (8, 2, 64, torch.float32),
        (16, 1, 128, torch.float16),
        (32, 3, 64, torch.float16),  # block of 6144 elements: 3 programs per K/V
    ],
)
def test_pack_unpack_match_reference(
    block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    check_pack_unpack(block_size, num_kv_heads, head_dim, dtype)


def test_pack_into_given_buffer_and_empty_list() -> None:
    cache = random_cache(4, 8, 2, 64, torch.float32, 2)
    out = torch.empty(2, 2, 8, 2, 64)
    assert kv_pack(cache, torch.tensor([3, 1]), out=out) is out
    assert torch.equal(out, kv_pack_reference(cache, torch.tensor([3, 1])))
    assert kv_pack(cache, torch.tensor([], dtype=torch.int64)).shape == (0, 2, 8, 2, 64)


def test_rejects_bad_arguments() -> None:
    cache = random_cache(4, 8, 2, 64, torch.float32, 3)
    with pytest.raises(ValueError, match="block_ids"):
        kv_pack(cache, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="buffer"):
        kv_unpack(torch.zeros(1, 2, 8, 2, 32), cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous"):
        kv_pack(cache.transpose(2, 3), torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_pack_unpack_match_reference_gpu(block_size: int, dtype: torch.dtype) -> None:
    check_pack_unpack(block_size, 8, 128, dtype, device="cuda")
