"""CUDA graphs for the decode step: capture once per batch size, replay every step.

A decode step launches a few kernels per layer for very little work each, so at small batch
the GPU idles between launches; replaying a captured graph removes the launch overhead.

Lifecycle:

1. ``CudaGraphDecodeRunner(model, kv_caches, ...)`` allocates static input buffers sized for
   the largest capture size.
2. ``capture()`` runs the model once per capture size (warm-up, so Triton compiles and cuBLAS
   picks its kernels), then captures it into a ``torch.cuda.CUDAGraph``; all graphs share one
   memory pool, largest first. Capture writes nothing into the KV cache (every slot is -1).
3. ``run(input_ids, positions, metadata)`` handles a decode-only batch of ``n`` sequences: it
   copies the inputs into the static buffers, pads them up to the next captured size (padding
   sequences have ``seq_len == 0`` and slot ``-1``, which the Triton kernels skip), replays
   and returns the first ``n`` rows of the static output. The returned tensor is overwritten
   by the next ``run``: consume it (compute logits) first. It returns ``None`` when the batch
   cannot be replayed (prefill chunks, too many sequences, a longer context than captured);
   the caller then runs the model eagerly.

The attention backend must read only device tensors and host ints of the metadata (the Triton
backend does; the torch reference loops over ``seq_lens_cpu`` and cannot be captured).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import torch

from engine.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)

DecodeModel = Callable[..., torch.Tensor]  # model(input_ids, positions, kv_caches, metadata)
DEFAULT_MAX_SEQ_LEN_TO_CAPTURE = 8192


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to and including ``max_num_seqs`` (as vLLM)."""
    sizes = [s for s in (1, 2, 4, *range(8, max_num_seqs + 1, 8)) if s <= max_num_seqs]
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphDecodeRunner:
    def __init__(
        self,
        model: DecodeModel,
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, kv_heads, dim]
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        capture_sizes: Sequence[int] | None = None,
        max_seq_len_to_capture: int = DEFAULT_MAX_SEQ_LEN_TO_CAPTURE,
    ) -> None:
        if not kv_caches or kv_caches[0].device.type != "cuda":
            raise ValueError("CUDA graphs need the KV caches on a CUDA device")
        if max_num_seqs <= 0 or max_num_blocks_per_seq <= 0:
            raise ValueError(
                f"max_num_seqs ({max_num_seqs}) and max_num_blocks_per_seq "
                f"({max_num_blocks_per_seq}) must be positive"
            )
        sizes = sorted(set(capture_sizes or default_capture_sizes(max_num_seqs)))
        if sizes[0] <= 0:
            raise ValueError(f"capture sizes must be positive, got {sizes}")
        self.model = model
        self.kv_caches = kv_caches
        self.capture_sizes = sizes
        block_size = kv_caches[0].shape[2]
        self.max_seq_len = min(max_num_blocks_per_seq * block_size, max_seq_len_to_capture)
        self.max_num_blocks = -(-self.max_seq_len // block_size)
        device = kv_caches[0].device
        max_bs = sizes[-1]
        with torch.inference_mode():
            self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
            self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
            self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
            self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros(
                (max_bs, self.max_num_blocks), dtype=torch.int32, device=device
            )
            self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=batch_size,
            num_decode_tokens=batch_size,
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            slot_mapping=self.slot_mapping[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_seq_len,  # an upper bound: it fixes the kernels' grids
            query_start_loc_cpu=list(range(batch_size + 1)),
            seq_lens_cpu=[self.max_seq_len] * batch_size,  # placeholder, not read on replay
        )

    def _forward(self, batch_size: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:batch_size],
            self.positions[:batch_size],
            self.kv_caches,
            self._metadata(batch_size),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        # All-padding inputs: every slot is -1 and every seq_len 0, so nothing is written.
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.capture_sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(batch_size)  # warm-up: compile, pick cuBLAS kernels
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[batch_size] = self._forward(batch_size)
            self._graphs[batch_size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured decode CUDA graphs for batch sizes %s (context <= %d)",
            self.capture_sizes,
            self.max_seq_len,
        )

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that holds ``num_seqs``, or None."""
        i = bisect.bisect_left(self.capture_sizes, num_seqs)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        metadata: AttentionMetadata,
    ) -> torch.Tensor | None:  # [num_tokens, hidden_size], valid until the next run
        """Replay the graph for a decode-only batch; None if it cannot (run eagerly then)."""
        n = metadata.num_seqs
        batch_size = self.padded_size(n)
        if (
            n == 0
            or metadata.num_decodes != n
            or batch_size not in self._graphs
            or metadata.max_seq_len > self.max_seq_len
        ):
            return None
        cols = min(metadata.block_tables.shape[1], self.max_num_blocks)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        # Columns past ``cols`` keep stale ids: only blocks below ceil(seq_len / block_size)
        # are read, and those are all within ``cols``.
        self.block_tables[:n, :cols].copy_(metadata.block_tables[:, :cols])
        if batch_size > n:
            self.slot_mapping[n:batch_size].fill_(-1)
            self.seq_lens[n:batch_size].zero_()
        self._graphs[batch_size].replay()
        return self._outputs[batch_size][:n]
