"""KV store: write one step's new K/V rows into their slots of the paged cache.

Token ``t`` goes to block ``slot_mapping[t] // block_size``, offset ``slot_mapping[t] %
block_size``. A negative slot (``-1``) means "padding, write nothing": CUDA-graph replays pad
a batch with such tokens.

Order as in llm.c: reference, kernel, launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.torch_backend import write_kv_cache
from engine.kernels._checks import check_kv_cache, check_last_dim_contiguous, check_same_device


def kv_store_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """The torch backend's store is the reference (one function serves both)."""
    write_kv_cache(key, value, kv_cache, slot_mapping)


@triton.jit
def _kv_store_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    num_kv_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: copies its [num_kv_heads, head_dim] K and V rows.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim) & (slot >= 0)
    k = tl.load(
        key_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=mask
    )
    v = tl.load(
        value_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :],
        mask=mask,
    )
    dst = cache_ptr + block * stride_c_block + offset * stride_c_slot
    dst += heads[:, None] * stride_c_head + dims[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_c_kv, v, mask=mask)


def kv_store(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write ``key``/``value`` into ``kv_cache`` at ``slot_mapping`` (in place)."""
    _, _, block_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    num_tokens = key.shape[0]
    for name, t in (("key", key), ("value", value)):
        if t.shape != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [{num_tokens}, {num_kv_heads}, {head_dim}] to match the cache, "
                f"got {list(t.shape)}"
            )
        if t.dtype != kv_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != kv_cache dtype {kv_cache.dtype}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be int64 [{num_tokens}], "
            f"got {slot_mapping.dtype} {list(slot_mapping.shape)}"
        )
    check_last_dim_contiguous(key=key, value=value)
    check_same_device(kv_cache, key=key, value=value, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    _kv_store_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_kv_heads,
        head_dim,
        block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
