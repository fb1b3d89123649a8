"""KV pack/unpack: gather a request's blocks of one layer into a contiguous buffer, and back.

Used by KV transfer: the sender packs the blocks it ships, the receiver unpacks them into the
blocks it reserved (whose ids differ from the sender's).

Buffer layout (the bytes on the wire): ``[num_blocks_in_request, 2, block_size, num_kv_heads,
head_dim]`` in the cache's dtype, contiguous: for each block id in the order given, that
block's K then its V. It equals ``kv_cache[:, block_ids].transpose(0, 1).contiguous()``.

One kernel copies in either direction (``PACK`` constexpr); each program moves ``BLOCK``
elements of one block's K or V, which are contiguous on both sides.

Block ids are not bounds-checked on the device (that would sync): callers validate ids that
come from the wire against the cache size first.

Order as in llm.c: reference, kernel, launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._checks import check_kv_cache, check_same_device
from engine.kv_cache import gather_blocks, scatter_blocks

BLOCK = 2048  # elements per program


# The torch reference is the engine's own packing (also KV transfer's path off CUDA).
kv_pack_reference = gather_blocks
kv_unpack_reference = scatter_blocks


@triton.jit
def _kv_copy_blocks_kernel(
    cache_ptr,
    buffer_ptr,
    block_ids_ptr,
    stride_c_kv,
    stride_c_block,
    block_numel,  # block_size * num_kv_heads * head_dim
    BLOCK: tl.constexpr,
    PACK: tl.constexpr,  # True: cache -> buffer; False: buffer -> cache
):
    i = tl.program_id(0).to(tl.int64)  # index into block_ids / the buffer
    kv = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    cache_ptrs = cache_ptr + kv * stride_c_kv + block_id * stride_c_block + offs
    buffer_ptrs = buffer_ptr + (i * 2 + kv) * block_numel + offs
    if PACK:
        tl.store(buffer_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)
    else:
        tl.store(cache_ptrs, tl.load(buffer_ptrs, mask=mask), mask=mask)


def _launch(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    buffer: torch.Tensor,  # [n, 2, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int32 or int64
    pack: bool,
) -> None:
    _, _, block_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    block_numel = block_size * num_kv_heads * head_dim
    if kv_cache.stride(2) != num_kv_heads * head_dim or kv_cache.stride(3) != head_dim:
        raise ValueError(f"kv_cache blocks must be contiguous, got strides {kv_cache.stride()}")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} "
            f"{list(block_ids.shape)}"
        )
    n = block_ids.shape[0]
    expected = (n, 2, block_size, num_kv_heads, head_dim)
    if buffer.shape != expected or buffer.dtype != kv_cache.dtype or not buffer.is_contiguous():
        raise ValueError(
            f"buffer must be contiguous {kv_cache.dtype} {list(expected)}, "
            f"got {buffer.dtype} {list(buffer.shape)} strides {buffer.stride()}"
        )
    check_same_device(kv_cache, buffer=buffer, block_ids=block_ids)
    if n == 0:
        return
    _kv_copy_blocks_kernel[(n, 2, triton.cdiv(block_numel, BLOCK))](
        kv_cache,
        buffer,
        block_ids,
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_numel,
        BLOCK=BLOCK,
        PACK=pack,
        num_warps=4,
    )


def kv_pack(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int32 or int64, on the cache's device
    out: torch.Tensor | None = None,  # [n, 2, block_size, num_kv_heads, head_dim]
) -> torch.Tensor:  # [n, 2, block_size, num_kv_heads, head_dim]
    """Gather ``block_ids``' K/V of one layer into a contiguous buffer (layout: module doc)."""
    if out is None:
        shape = (block_ids.shape[0], 2, *kv_cache.shape[2:])
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    _launch(kv_cache, out, block_ids, pack=True)
    return out


def kv_unpack(
    buffer: torch.Tensor,  # [n, 2, block_size, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int32 or int64, on the cache's device
) -> None:
    """Scatter a packed buffer into ``block_ids`` of ``kv_cache`` (in place)."""
    _launch(kv_cache, buffer, block_ids, pack=False)
