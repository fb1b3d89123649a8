"""The pairing policy: which decode worker, which prefill worker, or prefill locally on D.

Pure Python (no torch): it reads worker snapshots and a prefix-affinity index and returns a
``PairingDecision``. The rules, in order:

1. **Decode worker D**: among workers with room for the prompt's blocks, the one with the
   fewest waiting requests, then the most free KV blocks, then the fewest running requests,
   then the smallest id. When none has room, the one with the most free blocks (it queues
   the request; admission is the backend's call).
2. **Local prefill** (conditional disaggregation): when ``enable_local_prefill`` and the part
   of the prompt not already cached on D, plus what D still has to prefill of the local
   prefills already sent to it (``num_local_prefill_tokens``), is at most
   ``local_prefill_threshold`` tokens, D prefills it itself (``SHORT_PROMPT``): a short
   prompt costs D's running requests one slightly longer step, but a burst of them would all
   land in one long step of D's while P idles, so past the threshold they go to P. Unless P
   would compute more than the threshold beyond what D would (D holds a prefix P does not,
   as in a chat's next turn): then D prefills it anyway. With no prefill workers at all,
   always local.
3. **Prefill worker P**: the worker with the longest cached prefix (in whole blocks) wins,
   unless its queue is more than ``affinity_max_queue_gap`` requests longer than the
   shortest queue: then the least-queued worker wins (``LEAST_LOADED``). Ties: shorter
   queue, then smaller id.

"Cached" means recorded in the router's ``PrefixAffinityIndex``: after each decision the
prompt's full-block hashes (``engine.block_hash.hash_full_blocks``, the engine's own) are
recorded for the prefill worker that will compute them and for D, which will hold them. The
index is a bounded LRU of (worker, block hash) entries, an estimate of the workers' real
prefix caches: a wrong guess costs a recomputation, never a wrong answer.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import hash_full_blocks


@dataclass(frozen=True)
class DecodeWorkerSnapshot:
    worker_id: str
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int
    # Uncached prompt tokens of the local prefills sent to it that have not produced their
    # first token yet (the router's own count: stats would be a refresh late).
    num_local_prefill_tokens: int = 0


@dataclass(frozen=True)
class PrefillWorkerSnapshot:
    worker_id: str
    num_queued: int  # requests waiting or prefilling


class DecisionReason(str, enum.Enum):
    AFFINITY = "affinity"  # remote prefill on the worker holding the longest prefix
    LEAST_LOADED = "least_loaded"  # remote prefill on the shortest queue
    SHORT_PROMPT = "short_prompt"  # local prefill: little left to compute
    NO_PREFILL_WORKERS = "no_prefill_workers"  # local prefill: nobody else can


@dataclass(frozen=True)
class PairingDecision:
    decode_id: str
    prefill_id: str | None  # None: D prefills locally
    reason: DecisionReason
    num_cached_tokens_expected: int  # on the worker that prefills

    @property
    def is_local(self) -> bool:
        return self.prefill_id is None


@dataclass(frozen=True)
class PolicyConfig:
    block_size: int = 16  # must equal the workers' --block-size for hashes to agree
    enable_local_prefill: bool = True
    # Uncached prompt tokens at most this, with D's unfinished local prefills: prefill on D.
    local_prefill_threshold: int = 64
    affinity_max_queue_gap: int = 4  # queued requests an affinity choice may exceed the min by
    affinity_index_capacity: int = 100_000  # (worker, block hash) entries kept

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )
        if self.affinity_max_queue_gap < 0:
            raise ValueError(
                f"affinity_max_queue_gap must be >= 0, got {self.affinity_max_queue_gap}"
            )
        if self.affinity_index_capacity <= 0:
            raise ValueError(
                f"affinity_index_capacity must be positive, got {self.affinity_index_capacity}"
            )


class PrefixAffinityIndex:
    """Which worker recently computed or received which blocks: a bounded LRU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        for block_hash in block_hashes:
            key = (worker_id, block_hash)
            self._entries[key] = None
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def num_cached_blocks(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Length of the longest prefix of ``block_hashes`` recorded for ``worker_id``."""
        count = 0
        for block_hash in block_hashes:
            if (worker_id, block_hash) not in self._entries:
                break
            count += 1
        return count

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it died or restarted with an empty cache)."""
        for key in [key for key in self._entries if key[0] == worker_id]:
            del self._entries[key]


class PairingPolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.index = PrefixAffinityIndex(config.affinity_index_capacity)

    def choose(
        self,
        prompt_token_ids: Sequence[int],
        decode_workers: Sequence[DecodeWorkerSnapshot],
        prefill_workers: Sequence[PrefillWorkerSnapshot],
    ) -> PairingDecision:
        """Pick D and P (or local prefill) for one prompt, and record it in the index."""
        if not decode_workers:
            raise ValueError("no decode workers to choose from")
        block_size = self.config.block_size
        block_hashes = hash_full_blocks(prompt_token_ids, block_size)
        num_prompt_tokens = len(prompt_token_ids)
        decode = self._choose_decode(num_prompt_tokens, decode_workers)
        cached_on_decode = self.index.num_cached_blocks(decode.worker_id, block_hashes)
        num_uncached = num_prompt_tokens - cached_on_decode * block_size

        decision: PairingDecision
        if not prefill_workers:
            decision = PairingDecision(
                decode.worker_id,
                None,
                DecisionReason.NO_PREFILL_WORKERS,
                cached_on_decode * block_size,
            )
        else:
            threshold = self.config.local_prefill_threshold
            short = self.config.enable_local_prefill and num_uncached <= threshold
            local = short and num_uncached + decode.num_local_prefill_tokens <= threshold
            if not local:
                prefill, reason, num_cached_blocks = self._choose_prefill(
                    block_hashes, prefill_workers
                )
                # D's share of local prefills is taken: P prefills it, unless P would compute
                # more than that share beyond what D would (D holds a prefix P does not).
                num_uncached_on_prefill = num_prompt_tokens - num_cached_blocks * block_size
                local = short and num_uncached_on_prefill - num_uncached > threshold
            if local:
                decision = PairingDecision(
                    decode.worker_id,
                    None,
                    DecisionReason.SHORT_PROMPT,
                    cached_on_decode * block_size,
                )
            else:
                decision = PairingDecision(
                    decode.worker_id, prefill.worker_id, reason, num_cached_blocks * block_size
                )

        if decision.prefill_id is not None:
            self.index.record(decision.prefill_id, block_hashes)
        self.index.record(decision.decode_id, block_hashes)
        return decision

    def _choose_decode(
        self, num_prompt_tokens: int, workers: Sequence[DecodeWorkerSnapshot]
    ) -> DecodeWorkerSnapshot:
        # The prompt's blocks plus one for the first generated token.
        num_blocks_needed = num_prompt_tokens // self.config.block_size + 1
        fitting = [w for w in workers if w.num_free_blocks >= num_blocks_needed]
        if not fitting:
            return min(workers, key=lambda w: (-w.num_free_blocks, w.num_waiting, w.worker_id))
        return min(
            fitting,
            key=lambda w: (w.num_waiting, -w.num_free_blocks, w.num_running, w.worker_id),
        )

    def _choose_prefill(
        self, block_hashes: list[int], workers: Sequence[PrefillWorkerSnapshot]
    ) -> tuple[PrefillWorkerSnapshot, DecisionReason, int]:
        cached = {
            w.worker_id: self.index.num_cached_blocks(w.worker_id, block_hashes) for w in workers
        }
        least_loaded = min(workers, key=lambda w: (w.num_queued, w.worker_id))
        best = min(workers, key=lambda w: (-cached[w.worker_id], w.num_queued, w.worker_id))
        if (
            cached[best.worker_id] > 0
            and best.num_queued - least_loaded.num_queued <= self.config.affinity_max_queue_gap
        ):
            return best, DecisionReason.AFFINITY, cached[best.worker_id]
        return least_loaded, DecisionReason.LEAST_LOADED, cached[least_loaded.worker_id]
