"""Paged decode attention: one query token per sequence, split across the context (split-K).

Decode reads every cached K/V byte once per step and does little math on it, so it is bound by
memory bandwidth; the kernel's job is to keep every SM streaming K/V.

- **GQA**: one program serves all ``GROUP = num_heads // num_kv_heads`` query heads that share
  a KV head (padded to 16 rows for ``tl.dot``), so each K/V tile is read once.
- **Split-K (flash-decoding)**: the context is cut into partitions of ``partition_size``
  tokens; program ``(seq, kv_head, partition)`` writes its partial softmax max, sum and
  normalised output, and a reduce kernel rescales and combines them. With one partition the
  first kernel writes the output directly and the reduce is skipped.
- **Graph-safe**: the grid depends only on host ints (``num_seqs``, ``max_seq_len``), never on
  ``seq_lens`` values; partitions past a sequence's end do nothing. A sequence with
  ``seq_len == 0`` (CUDA-graph padding) gets a zero output.

``max_seq_len`` must bound every ``seq_lens`` entry (a CUDA-graph capture passes the largest
possible length).

Order as in llm.c: reference, kernel(s), launcher.
"""

from __future__ import annotations

import functools
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
from engine.kernels.paged_prefill_attention import paged_attention_reference

# Tunables (check on the GPU with benchmarks/kernels.py).
PARTITION_SIZES = (512, 256, 128)  # tried in order; see _choose_partition_size
PROGRAMS_PER_SM = 4  # enough (seq, kv_head, partition) programs to fill the GPU
BLOCK_N = 64  # keys per tile
NUM_WARPS = 4
NUM_STAGES = 2
REDUCE_BLOCK_P = 32  # partitions combined per step of the reduce


def paged_decode_attention_reference(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode is prefill with one query token per sequence (at position ``seq_len - 1``)."""
    num_seqs = query.shape[0]
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
    return paged_attention_reference(
        query, kv_cache, block_tables, query_start_loc, seq_lens, scale
    )


@triton.jit
def _paged_decode_partition_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,  # final output when not SPLIT, else partial outputs
    part_max_ptr,
    part_sum_ptr,
    scale_log2e,
    stride_q_seq,
    stride_q_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    stride_o_part,  # partial outputs only
    stride_pm_seq,
    stride_pm_head,
    head_dim,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * PARTITION_SIZE
    end = tl.minimum(start + PARTITION_SIZE, seq_len)
    live = start < seq_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    head = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + offs_d[None, :],
        mask=(g_mask & live)[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_ptr = cache_ptr + kv_head * stride_c_head
    bt_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for kv_start in range(start, end, BLOCK_N):
        kpos = kv_start + offs_n
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_ptr, stride_c_kv, stride_c_block, stride_c_slot, bt_ptr,
            kpos, kpos < end, offs_g, offs_d, d_mask, scale_log2e,
            BLOCK_SIZE, True, False, INPUT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_seq + head[:, None] * stride_o_head
    if SPLIT:
        # Partitions past the end write nothing: the reduce reads only the live ones.
        row_mask = g_mask & live
        o_ptrs += part * stride_o_part
        pm_offs = seq.to(tl.int64) * stride_pm_seq + head * stride_pm_head + part
        tl.store(part_max_ptr + pm_offs, m_i, mask=row_mask)
        tl.store(part_sum_ptr + pm_offs, l_i, mask=row_mask)
    else:
        row_mask = g_mask  # seq_len == 0 writes zeros
    tl.store(
        o_ptrs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    seq_lens_ptr,
    stride_o_seq,
    stride_o_head,
    stride_po_seq,
    stride_po_head,
    stride_po_part,
    stride_pm_seq,
    stride_pm_head,
    head_dim,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_parts = tl.cdiv(tl.load(seq_lens_ptr + seq), PARTITION_SIZE)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    pm_ptr = part_max_ptr + seq * stride_pm_seq + head * stride_pm_head
    ps_ptr = part_sum_ptr + seq * stride_pm_seq + head * stride_pm_head
    po_ptr = part_out_ptr + seq * stride_po_seq + head * stride_po_head

    max_seen = tl.full([BLOCK_P], NEG_INIT, tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p_mask = p0 + offs_p < num_parts
        max_seen = tl.maximum(max_seen, tl.load(pm_ptr + p0 + offs_p, mask=p_mask, other=NEG_INIT))
    global_max = tl.max(max_seen, 0)

    weights = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        parts = p0 + offs_p
        p_mask = parts < num_parts
        part_max = tl.load(pm_ptr + parts, mask=p_mask, other=NEG_INIT)
        part_sum = tl.load(ps_ptr + parts, mask=p_mask, other=0.0)
        w = part_sum * tl.exp2(part_max - global_max)
        o = tl.load(
            po_ptr + parts[:, None] * stride_po_part + offs_d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * o, 0)
        weights += w
    total = tl.sum(weights, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_partition_size(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """The largest partition that still gives every SM ``PROGRAMS_PER_SM`` programs.

    Larger partitions mean less partial-result traffic and reduce work; smaller ones let a
    few long sequences fill the GPU.
    """
    target = PROGRAMS_PER_SM * _num_sms(device)
    for size in PARTITION_SIZES:
        if num_seqs * num_kv_heads * triton.cdiv(max_seq_len, size) >= target:
            return size
    return PARTITION_SIZES[-1]


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, each <= max_seq_len
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    partition_size: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of each sequence's single query token over its ``seq_len`` cached tokens."""
    num_heads, num_kv_heads, head_dim, block_size = check_attention_inputs(query, kv_cache, out)
    num_seqs = query.shape[0]
    check_int32("seq_lens", seq_lens, (num_seqs,))
    check_int32("block_tables", block_tables, (num_seqs, -1))
    check_same_device(query, block_tables=block_tables, seq_lens=seq_lens)
    if partition_size is None:
        partition_size = _choose_partition_size(num_seqs, num_kv_heads, max_seq_len, query.device)
    if not is_power_of_2(partition_size) or partition_size < 16:
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    split = num_partitions > 1
    block_d = triton.next_power_of_2(head_dim)
    if split:
        part_out = torch.empty(
            (num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32, device=out.device
        )
        part_max = torch.empty(
            (num_seqs, num_heads, num_partitions), dtype=torch.float32, device=out.device
        )
        part_sum = torch.empty_like(part_max)
        dst, pm = part_out, part_max
        stride_o = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
    else:
        dst, pm, part_sum = out, out, out  # partial buffers unused
        stride_o = (out.stride(0), out.stride(1), 0)
    _paged_decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        dst,
        pm,
        part_sum,
        scale * math.log2(math.e),
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        *stride_o,
        pm.stride(0) if split else 0,
        pm.stride(1) if split else 0,
        head_dim,
        GROUP=group,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=min(BLOCK_N, partition_size),
        BLOCK_D=block_d,
        PARTITION_SIZE=partition_size,
        SPLIT=split,
        INPUT_PRECISION=input_precision(query.dtype == torch.float32),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if split:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_out,
            part_max,
            part_sum,
            seq_lens,
            out.stride(0),
            out.stride(1),
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_max.stride(0),
            part_max.stride(1),
            head_dim,
            PARTITION_SIZE=partition_size,
            BLOCK_P=min(REDUCE_BLOCK_P, triton.next_power_of_2(num_partitions)),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
