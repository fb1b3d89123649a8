"""One step of online-softmax attention over a tile of keys read from the paged KV cache.

Shared by the decode and prefill kernels (a ``@triton.jit`` helper, not a kernel): both walk
a sequence's keys in tiles of ``BLOCK_N`` token positions, gather each tile's K/V rows
through the block table, and fold them into a running ``(max, sum, acc)`` per query row.

Scores are kept in the log2 domain: ``scale_log2e = scale * log2(e)`` is folded into the dot
product so the softmax uses ``exp2`` (one MUFU instruction on NVIDIA GPUs).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Running max before any key was seen: finite, so a row that sees only masked keys keeps
# ``exp2(m_old - m_new) == 1`` and ``p == 0`` instead of turning into NaN.
NEG_INIT = tl.constexpr(-1.0e30)


@triton.jit
def attend_kv_tile(
    q,  # [BLOCK_M, BLOCK_D] query rows, cache dtype
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum of exp2
    acc,  # [BLOCK_M, BLOCK_D] fp32 running weighted sum of V
    cache_ptr,  # K of this KV head: cache base + kv_head * stride_c_head
    stride_c_kv,  # offset from K to V
    stride_c_block,
    stride_c_slot,
    block_table_ptr,  # this sequence's row of the block table
    kpos,  # [BLOCK_N] key positions of this tile
    n_mask,  # [BLOCK_N] kpos < end of the keys to read (used when MASKED)
    q_pos,  # [BLOCK_M] position of each query row (used when CAUSAL)
    offs_d,  # [BLOCK_D]
    d_mask,  # [BLOCK_D] offs_d < head_dim
    scale_log2e,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    if MASKED:
        block_ids = tl.load(block_table_ptr + kpos // BLOCK_SIZE, mask=n_mask, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        block_ids = tl.load(block_table_ptr + kpos // BLOCK_SIZE)
        kv_mask = d_mask[None, :]
    rows = block_ids.to(tl.int64) * stride_c_block + (kpos % BLOCK_SIZE) * stride_c_slot
    k_ptrs = cache_ptr + rows[:, None] + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2e
    if MASKED:
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(k_ptrs + stride_c_kv, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


def input_precision(dtype_is_fp32: bool) -> str:
    """fp32 inputs get exact ``ieee`` dots (the default tf32 would not match the reference)."""
    return "ieee" if dtype_is_fp32 else "tf32"
