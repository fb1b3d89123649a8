"""The Triton attention backend (default on CUDA).

Per layer and step: the KV store kernel writes the step's K/V at ``slot_mapping``; the split
decode kernel serves sequences ``[0, num_decodes)`` (one query token each, first in the batch);
the paged prefill kernel serves the remaining chunks. Only device tensors and host ints of the
metadata are read (never ``seq_lens_cpu``), so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.kernels.kv_store import kv_store
from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.paged_prefill_attention import paged_prefill_attention


class TritonAttentionBackend:
    name = "triton"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        kv_store(key, value, kv_cache, metadata.slot_mapping)
        output = torch.empty_like(query)
        num_decodes = metadata.num_decodes
        if num_decodes > 0:
            paged_decode_attention(
                query[:num_decodes],
                kv_cache,
                metadata.block_tables[:num_decodes],
                metadata.seq_lens[:num_decodes],
                scale,
                max_seq_len=metadata.max_seq_len,
                out=output[:num_decodes],
            )
        if metadata.seq_lens.shape[0] > num_decodes:
            paged_prefill_attention(
                query[metadata.num_decode_tokens :],
                kv_cache,
                metadata.block_tables[num_decodes:],
                metadata.query_start_loc[num_decodes:],
                metadata.seq_lens[num_decodes:],
                scale,
                max_query_len=metadata.max_query_len,
                out=output[metadata.num_decode_tokens :],
            )
        return output
