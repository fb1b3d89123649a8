"""The attention backend interface and the metadata the model runner builds for it.

One step is a flattened batch: the decodes (one query token each) come first, then the
prefill chunks. Every sequence attends to its cached blocks (prefix, earlier chunks) plus
its own new tokens, causally. The backend first writes the new K/V into the paged cache at
``slot_mapping``, then attends over the cache.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K at index 0,
V at index 1); see ``engine.kv_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer."""

    num_decodes: int  # sequences [0, num_decodes) have exactly one query token
    num_decode_tokens: int  # == num_decodes
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, prefix sums of query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends that loop per sequence do not sync with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Backend-private values derived from this metadata, computed by the first layer of the
    # step and reused by the others (e.g. the torch backend's decode mask).
    per_step: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store ``key``/``value`` at ``metadata.slot_mapping``, then attend over the cache."""
        ...
