"""Causal prefill attention over a paged prefix, for a variable-length batch of chunks.

Sequence ``i`` brings ``q_len = query_start_loc[i + 1] - query_start_loc[i]`` new query
tokens and has ``seq_len = seq_lens[i]`` tokens in the cache after this step (its cached
prefix plus the chunk, whose K/V the KV store kernel has already written). Query token ``j``
sits at position ``seq_len - q_len + j`` and attends to every key at a position ``<=`` its
own, all read from the paged cache through ``block_tables[i]``.

``query_start_loc`` may start at a non-zero offset (``query_start_loc[i] -
query_start_loc[0]`` is where sequence ``i`` starts in ``query``), so a backend can pass the
prefill tail of a mixed batch as slices without rebuilding the offsets.

Kernel layout: one program per (tile of ``BLOCK_Q`` query tokens, sequence, KV head). The
tile's rows are ``BLOCK_Q`` tokens x the ``GROUP`` query heads that share the KV head (GQA),
so each K/V tile is loaded once for all of them. Keys before the tile's first query position
need no causal mask and run in an unmasked loop; the rest run masked.

Order as in llm.c: reference, kernel, launcher.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels._checks import (
    check_attention_inputs,
    check_int32,
    check_same_device,
    is_power_of_2,
)
from engine.kernels._paged_tile import NEG_INIT, attend_kv_tile, input_precision


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain torch, one sequence at a time, in fp32. A sequence with ``seq_len == 0`` gives 0."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = query.shape[1] // num_kv_heads
    out = torch.zeros_like(query)
    starts = (query_start_loc - query_start_loc[0]).tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        if seq_len == 0 or q_end == q_start:
            continue
        blocks = block_tables[i, : math.ceil(seq_len / block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()  # [q_len, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    scale_log2e,
    stride_q_tok,
    stride_q_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    head_dim,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_base = tl.load(query_start_loc_ptr)
    q_start = tl.load(query_start_loc_ptr + seq) - q_base
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_base - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    tok = q_tile * BLOCK_Q + offs_m // GROUP  # token index within the chunk
    head = kv_head * GROUP + offs_m % GROUP
    m_mask = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_rows = (q_start + tok).to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(
        q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
    )
    q_pos = prefix_len + tok

    m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptr = cache_ptr + kv_head * stride_c_head
    bt_ptr = block_tables_ptr + seq * stride_bt_seq

    first_pos = prefix_len + q_tile * BLOCK_Q  # smallest query position in this tile
    tile_live = q_tile * BLOCK_Q < q_len
    # Keys every row sees: [0, unmasked_end). Keys some rows see: [unmasked_end, kv_end).
    unmasked_end = tl.where(tile_live, (first_pos + 1) // BLOCK_N * BLOCK_N, 0)
    kv_end = tl.where(tile_live, tl.minimum(seq_len, first_pos + BLOCK_Q), 0)
    for kv_start in range(0, unmasked_end, BLOCK_N):
        kpos = kv_start + offs_n
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_ptr, stride_c_kv, stride_c_block, stride_c_slot, bt_ptr,
            kpos, kpos < kv_end, q_pos, offs_d, d_mask, scale_log2e,
            BLOCK_SIZE, False, False, INPUT_PRECISION,
        )  # fmt: skip
    for kv_start in range(unmasked_end, kv_end, BLOCK_N):
        kpos = kv_start + offs_n
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_ptr, stride_c_kv, stride_c_block, stride_c_slot, bt_ptr,
            kpos, kpos < kv_end, q_pos, offs_d, d_mask, scale_log2e,
            BLOCK_SIZE, True, True, INPUT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(
        out_ptr + o_rows[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _default_tiles(head_dim: int, group: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(block_m, block_n, num_warps)``, sized for Hopper (re-check on a GPU: benchmarks).

    16-bit inputs use tensor cores (wgmma) with the usual flash-attention tiles; fp32 takes an
    exact (non-tf32) path that needs small tiles to stay in registers.
    """
    if dtype == torch.float32:
        block_m, block_n, num_warps = 32, 32, 8 if head_dim > 64 else 4
    else:
        block_m, block_n, num_warps = 128, 64 if head_dim <= 128 else 32, 8
    return max(block_m, triton.next_power_of_2(group)), block_n, num_warps


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each chunk over its cached prefix and itself (see module doc).

    ``max_query_len`` is an upper bound of the chunks' lengths (it sizes the grid).
    """
    num_heads, num_kv_heads, head_dim, block_size = check_attention_inputs(query, kv_cache, out)
    num_seqs = seq_lens.shape[0]
    check_int32("seq_lens", seq_lens, (num_seqs,))
    check_int32("query_start_loc", query_start_loc, (num_seqs + 1,))
    check_int32("block_tables", block_tables, (num_seqs, -1))
    check_same_device(
        query, block_tables=block_tables, query_start_loc=query_start_loc, seq_lens=seq_lens
    )
    group = num_heads // num_kv_heads
    default_m, default_n, num_warps = _default_tiles(head_dim, group, query.dtype)
    block_m = block_m or default_m
    block_n = block_n or default_n
    if (
        not (is_power_of_2(block_m) and is_power_of_2(block_n))
        or block_m < max(16, group)
        or block_n < 16
    ):
        raise ValueError(
            f"block_m ({block_m}) and block_n ({block_n}) must be powers of two, "
            f"block_m >= max(16, group={group}), block_n >= 16"
        )
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or max_query_len <= 0:
        return out
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        query,
        kv_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * math.log2(math.e),
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        head_dim,
        GROUP=group,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        INPUT_PRECISION=input_precision(query.dtype == torch.float32),
        num_warps=num_warps,
        num_stages=2,
    )
    return out
