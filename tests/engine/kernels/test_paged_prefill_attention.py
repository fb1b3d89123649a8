"""The paged prefill kernel equals its torch reference (CPU: Triton interpreter; GPU: bf16)."""

import pytest
import torch

from engine.kernels.paged_prefill_attention import (
    paged_attention_reference,
    paged_prefill_attention,
)
from tests.engine.kernels.test_paged_decode_attention import TOLERANCE, make_paged_kv


def check_prefill(
    query_lens: list[int],
    prefix_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    block_m: int | None,
    block_n: int | None,
    device: str = "cpu",
    query_offset: int = 0,
) -> None:
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    kv_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, dtype, device
    )
    starts = [query_offset]
    for n in query_lens:
        starts.append(starts[-1] + n)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn((starts[-1] - query_offset, num_heads, head_dim), generator=gen)
    query = query.to(dtype).to(device)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = paged_prefill_attention(
        query, kv_cache, block_tables, query_start_loc, lens, scale, max(query_lens),
        block_m=block_m, block_n=block_n,
    )  # fmt: skip
    expected = paged_attention_reference(
        query, kv_cache, block_tables, query_start_loc, lens, scale
    )
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("query_lens", "prefix_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype",
     "block_m", "block_n"),
    [
        ([5, 20], [0, 13], 4, 4, 64, 16, torch.float32, None, None),  # default tiles
        ([33, 1, 17], [40, 7, 0], 4, 2, 64, 8, torch.float16, 16, 16),  # many q and kv tiles
        ([20, 9], [70, 32], 8, 2, 64, 32, torch.float32, 32, 16),  # GQA 4, block_size 32
        ([24], [30], 2, 1, 128, 16, torch.float16, 16, 32),  # head_dim 128
        ([10, 5], [20, 0], 14, 2, 64, 16, torch.float32, 16, 16),  # GQA 7: 2 tokens per tile
    ],
)  # fmt: skip
def test_prefill_matches_reference(
    query_lens: list[int],
    prefix_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    block_m: int | None,
    block_n: int | None,
) -> None:
    check_prefill(
        query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
        block_m, block_n,
    )  # fmt: skip


def test_query_start_loc_may_start_past_zero() -> None:
    """The prefill tail of a mixed batch: offsets start at num_decode_tokens."""
    check_prefill([7, 12], [9, 0], 4, 2, 64, 8, torch.float32, 16, 16, query_offset=3)


def test_launcher_rejects_bad_arguments() -> None:
    kv_cache, block_tables = make_paged_kv([10], 16, 2, 64, torch.float32)
    query = torch.randn(10, 4, 64)
    qsl = torch.tensor([0, 10], dtype=torch.int32)
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(query, kv_cache, block_tables, qsl[:1], lens, 1.0, 10)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(query, kv_cache, block_tables.long(), qsl, lens, 1.0, 10)
    with pytest.raises(ValueError, match="powers of two"):
        paged_prefill_attention(query, kv_cache, block_tables, qsl, lens, 1.0, 10, block_m=24)
    with pytest.raises(ValueError, match="kv_cache"):
        paged_prefill_attention(query, kv_cache[0], block_tables, qsl, lens, 1.0, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_matches_reference_gpu(block_size: int, dtype: torch.dtype) -> None:
    """Llama-3-8B geometry: chunks of up to 1k tokens over prefixes of up to 3k, default tiles."""
    check_prefill(
        [1024, 1, 300, 513], [0, 2000, 3000, 77], 32, 8, 128, block_size, dtype, None, None,
        device="cuda",
    )  # fmt: skip
