"""The split decode kernel equals its torch reference (CPU: Triton interpreter; GPU: bf16)."""

import math

import pytest
import torch

from engine.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
)

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def make_paged_kv(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache (spare blocks included) and shuffled, zero-padded block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(
        (len(seq_lens), max(blocks_per_seq, default=0) + 1), dtype=torch.int32
    )
    start = 0
    for row, n in enumerate(blocks_per_seq):
        block_tables[row, :n] = ids[start : start + n]
        start += n
    return kv_cache.to(device), block_tables.to(device)


def check_decode(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    partition_size: int | None,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    kv_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, dtype, device, seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn((len(seq_lens), num_heads, head_dim), generator=gen).to(dtype).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = paged_decode_attention(
        query, kv_cache, block_tables, lens, scale, max(seq_lens), partition_size=partition_size
    )
    expected = paged_decode_attention_reference(query, kv_cache, block_tables, lens, scale)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "partition_size"),
    [
        ([1, 17, 40], 4, 4, 64, 16, torch.float32, None),  # MHA, one partition
        ([5, 33, 100], 4, 2, 64, 8, torch.float16, 32),  # GQA 2, up to 4 partitions
        ([64, 150, 3], 8, 2, 64, 32, torch.float32, 64),  # GQA 4, block_size 32
        ([70, 9], 2, 1, 128, 16, torch.float16, 32),  # head_dim 128
        ([30, 45], 14, 2, 64, 16, torch.float32, 32),  # GQA 7 (not a power of two)
        ([600], 4, 2, 64, 16, torch.float16, None),  # default partitions: 512 + 88
    ],
)
def test_decode_matches_reference(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    partition_size: int | None,
) -> None:
    check_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, partition_size)


@pytest.mark.parametrize("partition_size", [None, 16])
def test_padding_sequence_gives_zeros_and_leaves_others_exact(partition_size: int | None) -> None:
    kv_cache, block_tables = make_paged_kv([0, 20], 8, 2, 64, torch.float32)
    query = torch.randn(2, 4, 64)
    lens = torch.tensor([0, 20], dtype=torch.int32)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(
        query, kv_cache, block_tables, lens, 0.125, 20, out=out, partition_size=partition_size
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = paged_decode_attention_reference(query, kv_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(out[1], expected[1], atol=1e-4, rtol=1e-4)


def test_strided_query_and_out() -> None:
    """A query sliced out of a fused qkv tensor (non-contiguous rows) and an ``out`` view."""
    kv_cache, block_tables = make_paged_kv([12, 27], 16, 2, 64, torch.float32)
    qkv = torch.randn(2, 8, 64)
    query = qkv[:, :4]
    lens = torch.tensor([12, 27], dtype=torch.int32)
    out_buffer = torch.zeros(2, 6, 64)
    paged_decode_attention(
        query, kv_cache, block_tables, lens, 0.125, 27, out=out_buffer[:, 1:5], partition_size=16
    )
    expected = paged_decode_attention_reference(query, kv_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(out_buffer[:, 1:5], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(out_buffer[:, 0], torch.zeros(2, 64))


def test_launcher_rejects_bad_arguments() -> None:
    kv_cache, block_tables = make_paged_kv([10], 16, 2, 64, torch.float32)
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(torch.randn(1, 4, 64).half(), kv_cache, block_tables, lens, 1.0, 10)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.randn(1, 3, 64), kv_cache, block_tables, lens, 1.0, 10)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(torch.randn(1, 4, 64), kv_cache, block_tables, lens.long(), 1.0, 10)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention(
            torch.randn(1, 4, 64), kv_cache, block_tables, lens, 1.0, 10, partition_size=48
        )


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_seqs", [1, 16, 64])
def test_decode_matches_reference_gpu(block_size: int, num_seqs: int) -> None:
    """Llama-3-8B geometry in bf16, mixed lengths up to 5k, default (SM-count) partitions."""
    gen = torch.Generator().manual_seed(num_seqs)
    seq_lens = torch.randint(1, 5000, (num_seqs,), generator=gen).tolist()
    check_decode(seq_lens, 32, 8, 128, block_size, torch.bfloat16, None, device="cuda")
    check_decode(seq_lens, 32, 8, 128, block_size, torch.float16, 256, device="cuda", seed=1)
