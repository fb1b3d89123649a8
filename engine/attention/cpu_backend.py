"""The CPU backend: the torch backend with decodes read straight from the paged cache.

Prefill chunks and half-precision caches go through the torch backend unchanged; float32
decodes run the C++ op of ``engine.kernels.cpu_paged_decode``, which reads each cached K/V
row once instead of gathering a padded copy of every context per layer.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.kernels.cpu_paged_decode import decode_tables, load_extension, run_paged_decode


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        load_extension()  # build (or load) now, not inside the first step

    def _decode(
        self,
        query: torch.Tensor,  # [num_decodes, num_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
        if kv_cache.dtype != torch.float32:
            return super()._decode(query, kv_cache, metadata, scale)
        if "cpu_decode" not in metadata.per_step:  # checked once, used by every layer
            num_decodes = query.shape[0]
            metadata.per_step["cpu_decode"] = decode_tables(
                metadata.block_tables[:num_decodes],
                metadata.seq_lens[:num_decodes],
                kv_cache.shape[1],
                kv_cache.shape[2],
            )
        return run_paged_decode(query, kv_cache, metadata.per_step["cpu_decode"], scale)
