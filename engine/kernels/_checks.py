"""Argument checks shared by the kernel launchers: shapes, strides, dtypes, devices.

A launcher raises ``ValueError`` naming the bad argument before anything is launched, so a
wrong call never reaches a kernel that would read out of bounds.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_kv_cache(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
) -> tuple[int, int, int, int, int]:
    """Return the cache's shape after checking its rank, K/V dim, dtype and innermost stride."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {list(kv_cache.shape)}"
        )
    if kv_cache.dtype not in KERNEL_DTYPES:
        raise ValueError(f"kv_cache dtype must be one of {KERNEL_DTYPES}, got {kv_cache.dtype}")
    check_last_dim_contiguous(kv_cache=kv_cache)
    return tuple(kv_cache.shape)  # type: ignore[return-value]


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_same_device(reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device}, expected {reference.device}")


def check_int32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t`` must be int32 with exactly ``shape`` (``-1`` in ``shape`` matches any size)."""
    ok = t.dim() == len(shape) and all(s in (-1, n) for s, n in zip(shape, t.shape))
    if t.dtype != torch.int32 or not ok:
        raise ValueError(f"{name} must be int32 {list(shape)}, got {t.dtype} {list(t.shape)}")


def check_attention_inputs(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor | None,  # [num_tokens, num_heads, head_dim]
) -> tuple[int, int, int, int]:
    """Return ``(num_heads, num_kv_heads, head_dim, block_size)`` after checking the pairing."""
    _, _, block_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(
            f"query must be [num_tokens, num_heads, {head_dim}], got {list(query.shape)}"
        )
    num_heads = query.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} != kv_cache dtype {kv_cache.dtype}")
    check_last_dim_contiguous(query=query)
    if out is not None:
        if out.shape != query.shape or out.dtype != query.dtype:
            raise ValueError(
                f"out must be {query.dtype} {list(query.shape)}, got {out.dtype} {list(out.shape)}"
            )
        check_last_dim_contiguous(out=out)
        check_same_device(query, out=out)
    check_same_device(query, kv_cache=kv_cache)
    return num_heads, num_kv_heads, head_dim, block_size
