"""The torch attention backend against a dense causal attention computed in float64."""

from __future__ import annotations

import pytest
import torch

from engine.attention import get_attention_backend
from engine.attention.torch_backend import TorchAttentionBackend, write_kv_cache
from engine.kv_cache import kv_cache_shape
from tests.helpers import assign_block_tables, make_attention_metadata

HEAD_DIM = 16
NUM_BLOCKS = 40
# (cached tokens, new tokens): decodes first (one of them a 1-token prompt), then a fresh
# prefill, a chunk after a cached prefix, and a chunk that starts mid-block.
SEQS = [(5, 1), (16, 1), (0, 1), (0, 7), (9, 6), (16, 16)]


def dense_reference(
    query: torch.Tensor,  # [query_len, num_heads, head_dim]
    keys: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [query_len, num_heads, head_dim] float64
    query_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.double().transpose(0, 1)  # [heads, q, d]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q @ k.transpose(1, 2) * scale  # [heads, q, s]
    query_pos = torch.arange(query_len)[:, None] + (seq_len - query_len)
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > query_pos, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(0, 1)


def _run(
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: str = "cpu",
):
    gen = torch.Generator().manual_seed(seed)
    context_lens = [cached + new for cached, new in SEQS]
    tables = assign_block_tables(context_lens, block_size, NUM_BLOCKS, seed=seed)
    kv_cache = torch.zeros(
        kv_cache_shape(NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM), dtype=dtype
    )
    keys = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for n in context_lens]
    values = [torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for n in context_lens]
    queries = [torch.randn(new, num_heads, HEAD_DIM, generator=gen).to(dtype) for _, new in SEQS]
    # The cached prefixes, as earlier steps would have written them.
    cached = [c for c, _ in SEQS]
    _, prefix_meta = make_attention_metadata([0] * len(SEQS), cached, tables, block_size)
    write_kv_cache(
        torch.cat([k[:c] for k, c in zip(keys, cached)]),
        torch.cat([v[:c] for v, c in zip(values, cached)]),
        kv_cache,
        prefix_meta.slot_mapping,
    )
    _, metadata = make_attention_metadata(cached, [n for _, n in SEQS], tables, block_size, device)
    scale = HEAD_DIM**-0.5
    out = TorchAttentionBackend().forward(
        torch.cat(queries).to(device),
        torch.cat([k[c:] for k, c in zip(keys, cached)]).to(device),
        torch.cat([v[c:] for v, c in zip(values, cached)]).to(device),
        kv_cache.to(device),
        metadata,
        scale,
    )
    expected = torch.cat(
        [dense_reference(q, k, v, scale) for q, k, v in zip(queries, keys, values)]
    )
    return out.cpu(), expected, kv_cache, keys, values, tables


@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_matches_dense_reference(block_size, num_heads, num_kv_heads):
    out, expected, *_ = _run(block_size, num_heads, num_kv_heads, torch.float32)
    assert out.shape == expected.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_cache_holds_every_token_at_its_slot(block_size):
    _, _, kv_cache, keys, values, tables = _run(block_size, 4, 2, torch.float32, seed=3)
    for k, v, table in zip(keys, values, tables):
        gathered = kv_cache[:, table].flatten(1, 2)[:, : k.shape[0]]
        assert torch.equal(gathered[0], k)
        assert torch.equal(gathered[1], v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_dense_reference(dtype):
    out, expected, *_ = _run(16, 8, 2, dtype, seed=2, device="cuda")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    out, expected, *_ = _run(8, 4, 2, dtype, seed=1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_negative_slots_are_not_written():
    kv_cache = torch.zeros(kv_cache_shape(4, 4, 1, 2))
    key = torch.ones(3, 1, 2)
    write_kv_cache(key, 2 * key, kv_cache, torch.tensor([5, -1, 0]))
    written = kv_cache.flatten(1, 2)  # [2, slots, heads, dim]
    assert written[0, 5].eq(1).all() and written[1, 0].eq(2).all()
    assert written.abs().sum() == 2 * (1 + 2) * 2  # only slots 5 and 0


def test_registry_returns_the_torch_backend():
    backend = get_attention_backend("torch", "cpu")
    assert isinstance(backend, TorchAttentionBackend)
    assert backend.name == "torch"
