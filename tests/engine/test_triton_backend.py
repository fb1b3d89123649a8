"""The Triton backend's forward on a mixed batch (decodes, then prefill chunks over cached
prefixes) equals the plain-torch answer: K/V stored at slot_mapping, then causal attention."""

import math

import pytest
import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.attention.triton_backend import TritonAttentionBackend
from engine.kernels.kv_store import kv_store_reference
from engine.kernels.paged_prefill_attention import paged_attention_reference

# (cached tokens before this step, new tokens): three decodes, then three prefill chunks.
BATCH = [(16, 1), (0, 1), (39, 1), (13, 9), (0, 20), (32, 5)]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 64, 8


def make_step(
    dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(0)
    seq_lens = [cached + new for cached, new in BATCH]
    blocks_per_seq = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros((len(BATCH), max(blocks_per_seq)), dtype=torch.int32)
    slot_mapping: list[int] = []
    query_start_loc = [0]
    for row, ((cached, new), n) in enumerate(zip(BATCH, blocks_per_seq)):
        table, ids = ids[:n], ids[n:]
        block_tables[row, :n] = torch.tensor(table)
        slot_mapping += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                         for p in range(cached, cached + new)]  # fmt: skip
        query_start_loc.append(query_start_loc[-1] + new)
    num_tokens = query_start_loc[-1]
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = torch.randn(shape, generator=gen).to(dtype).to(device)  # random "cached" K/V

    def rand(heads: int) -> torch.Tensor:
        return torch.randn((num_tokens, heads, HEAD_DIM), generator=gen).to(dtype).to(device)

    query, key, value = rand(NUM_HEADS), rand(NUM_KV_HEADS), rand(NUM_KV_HEADS)
    metadata = AttentionMetadata(
        num_decodes=3,
        num_decode_tokens=3,
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        max_query_len=max(new for _, new in BATCH),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return query, key, value, kv_cache, metadata


def reference_forward(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    kv_store_reference(key, value, kv_cache, metadata.slot_mapping)
    return paged_attention_reference(
        query, kv_cache, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens, scale
    )


def check_against(
    other_forward, dtype: torch.dtype, device: str = "cpu", atol: float = 1e-4
) -> None:
    query, key, value, kv_cache, metadata = make_step(dtype, device)
    expected_cache = kv_cache.clone()
    scale = HEAD_DIM**-0.5
    expected = other_forward(query, key, value, expected_cache, metadata, scale)
    out = TritonAttentionBackend().forward(query, key, value, kv_cache, metadata, scale)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=1e-2)
    assert torch.equal(kv_cache, expected_cache)


def test_registry_resolves_triton() -> None:
    backend = get_attention_backend("triton", "cpu")
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float16, 3e-3)])
def test_mixed_batch_matches_reference(dtype: torch.dtype, atol: float) -> None:
    check_against(reference_forward, dtype, atol=atol)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float16, 3e-3)])
def test_mixed_batch_matches_torch_backend(dtype: torch.dtype, atol: float) -> None:
    check_against(get_attention_backend("torch", "cpu").forward, dtype, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_matches_reference_gpu(dtype: torch.dtype) -> None:
    check_against(reference_forward, dtype, device="cuda", atol=2e-2)
