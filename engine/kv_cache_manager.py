"""Per-request KV block bookkeeping between the scheduler and the block pool (pure Python).

The manager writes ``request.block_ids`` (the request's block table); nothing else does.

Lifecycle of one request's blocks:

1. ``get_computed_blocks`` looks up the request's full blocks in the prefix cache. At least
   one token is always left to compute (the runner needs it to sample), so a prompt that is
   all full, all cached blocks gets its last block back as a miss.
2. ``allocate_slots`` takes references on those hit blocks and allocates fresh blocks for
   the tokens the step computes. All or nothing: ``None`` when the pool lacks room.
3. After the runner computed a step, ``cache_full_blocks`` files the blocks that became full
   under their hashes (incrementally: each block is hashed once per request).
4. ``free`` (finish, abort, preemption) drops the request's references, tail block first, so
   its blocks stay in the prefix cache until evicted, last blocks going first.

Counters (in TOKENS, as vLLM reports them), once per admission, i.e. per successful
``allocate_slots`` into an empty block table: ``prefix_cache_queries`` adds the request's
``num_tokens``, ``prefix_cache_hits`` the tokens its hit blocks hold.

``reserve`` is the decode role's path: allocate a prompt's whole block table up front (hits
allowed), for KV that another worker will write; the scheduler later marks it computed.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import extend_block_hashes
from engine.block_pool import BlockPool
from engine.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self._block_hashes: dict[str, list[int]] = {}  # request_id -> hashes of full blocks
        self._num_cached_blocks: dict[str, int] = {}  # request_id -> leading blocks cached
        self._pins: dict[int, int] = {}  # block id -> references held by pin()
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_pool.num_used_blocks

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks held by at least one ``pin`` (not yet unpinned)."""
        return len(self._pins)

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Prefix-cache hits for a request without blocks: ``(block_ids, num_computed_tokens)``.

        Takes no references; pass the block ids to ``allocate_slots``.
        """
        if not self.enable_prefix_caching:
            return [], 0
        block_hashes = self._update_block_hashes(request)
        # Leave at least one token to compute: only blocks ending before the last token count.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_ids = self.block_pool.find_cached_blocks(block_hashes[:max_hit_blocks])
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after the computed ones.

        ``new_computed_blocks`` are prefix-cache hits from ``get_computed_blocks`` (only for a
        request holding no blocks yet); their tokens count as computed, after
        ``request.num_computed_tokens``. Returns the newly allocated block ids (possibly
        empty: test ``is None``), or ``None`` with nothing changed when the pool lacks room.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        assert not new_computed_blocks or not request.block_ids, "hits only for a new request"
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = self.num_blocks_for(num_computed + num_new_tokens)
        num_new_blocks = max(0, num_required - len(request.block_ids) - len(new_computed_blocks))
        # Hit blocks that are free leave the free queue when touched: they need room too.
        pool = self.block_pool
        num_free_hits = sum(1 for b in new_computed_blocks if pool.ref_count(b) == 0)
        if num_new_blocks + num_free_hits > pool.num_free_blocks:
            return None
        if self.enable_prefix_caching and not request.block_ids:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        if new_computed_blocks:
            pool.touch(new_computed_blocks)  # before allocate, so they cannot be evicted
            request.block_ids.extend(new_computed_blocks)
            self._num_cached_blocks[request.request_id] = len(new_computed_blocks)
        new_block_ids = pool.allocate(num_new_blocks)
        request.block_ids.extend(new_block_ids)
        return new_block_ids

    def reserve(self, request: Request, num_tokens: int) -> int | None:
        """Allocate blocks for the first ``num_tokens`` tokens of a request holding none.

        For KV another worker computes. Prefix-cache hits are reused (and keep the
        one-token-to-compute rule), so the writer can skip them. Returns the number of
        leading tokens already present in the blocks, or ``None`` when the pool lacks room.
        """
        assert not request.block_ids and request.num_computed_tokens == 0
        if not 0 < num_tokens <= request.num_tokens:
            raise ValueError(f"num_tokens must be in [1, {request.num_tokens}], got {num_tokens}")
        hit_block_ids, num_hit_tokens = self.get_computed_blocks(request)
        num_hit_tokens = min(num_hit_tokens, num_tokens)
        hit_block_ids = hit_block_ids[: num_hit_tokens // self.block_size]
        if self.allocate_slots(request, num_tokens - num_hit_tokens, hit_block_ids) is None:
            self._block_hashes.pop(request.request_id, None)  # not admitted: keep no state
            return None
        return num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """File the request's blocks that became full of computed tokens since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = request.num_computed_tokens // self.block_size
        num_cached = self._num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= num_cached:
            return
        block_hashes = self._update_block_hashes(request)
        for i in range(num_cached, num_full_blocks):
            self.block_pool.cache_block(request.block_ids[i], block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Drop the request's references, tail block first, and forget its hashes."""
        self.block_pool.free(reversed(request.block_ids))
        request.block_ids = []
        self._block_hashes.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)

    def pin(self, block_ids: Sequence[int]) -> None:
        """Hold an extra reference on blocks that something outside the scheduler still reads
        (a KV transfer in flight), so that finishing their request cannot recycle them."""
        self.block_pool.touch(block_ids)
        for block_id in block_ids:
            self._pins[block_id] = self._pins.get(block_id, 0) + 1

    def unpin(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            count = self._pins.get(block_id, 0)
            assert count > 0, f"block {block_id} unpinned more often than pinned"
            if count == 1:
                del self._pins[block_id]
            else:
                self._pins[block_id] = count - 1
        self.block_pool.free(reversed(block_ids))

    def _update_block_hashes(self, request: Request) -> list[int]:
        block_hashes = self._block_hashes.setdefault(request.request_id, [])
        if request.num_tokens // self.block_size > len(block_hashes):
            extend_block_hashes(block_hashes, request.all_token_ids, self.block_size)
        return block_hashes
