"""The pool of KV cache blocks: reference counts, the free queue and the prefix cache.

Pure Python: a block is just an id in ``[0, num_blocks)``; the model runner owns the tensors.

Lifecycle of a block::

    free ---allocate---> in use (ref >= 1) ---cache_block---> in use, cached
     ^  ^                  |                                     |    ^
     |  +---free (ref 0)---+                          free (ref 0)    touch (prefix hit)
     |                                                           v    |
     +------allocate (evicts: hash dropped)------------- free, cached (findable by hash)

* ``allocate`` pops blocks from the HEAD of the free queue; a popped block that still holds
  a hash is evicted (dropped from the hash map) first.
* ``free`` decrements ref counts; a block reaching 0 is appended at the TAIL, keeping its
  hash, so the free queue is an LRU of cached blocks. Callers free a request's blocks tail
  first (the KV cache manager does), so a prefix's last blocks are evicted before its first.
* ``touch`` takes a reference on a prefix-cache hit, pulling the block out of the free queue
  when it was free.
* ``cache_block`` files a full block under its hash; when another block already holds that
  hash the first one stays and the new one remains an ordinary (uncached) block.

Counter: ``num_evictions``, cached blocks reused for other content. (Prefix cache query and
hit counters are in tokens and live in the KV cache manager, which knows the requests.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class NoFreeBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free; nothing was allocated."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        # Blocks with ref count 0, head (next to allocate) first. An OrderedDict gives O(1)
        # append, pop-head and removal from the middle.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached_blocks: dict[int, int] = {}  # block hash -> block id
        self.num_evictions = 0

    # ---- state -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not: all of them can be allocated."""
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref count > 0)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._cached_blocks)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._block_hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue, next block to allocate first."""
        return list(self._free_queue)

    # ---- operations --------------------------------------------------------------------

    def find_cached_blocks(self, block_hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest prefix of ``block_hashes``; takes no references."""
        if not self.enable_prefix_caching:
            return []
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._cached_blocks.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one reference on each block (a prefix-cache hit); free ones leave the queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self._ref_counts[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free queue, evicting cached ones.

        Each returned block has ref count 1 and no hash. Raises ``NoFreeBlocksError`` (and
        changes nothing) when fewer than ``num_blocks`` are free.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free_queue):
            raise NoFreeBlocksError(
                f"asked for {num_blocks} blocks, {len(self._free_queue)} of "
                f"{self.num_blocks} are free"
            )
        block_ids: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in order; blocks reaching 0 join the queue tail."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed with ref count 0"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_queue[block_id] = None

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """File an in-use full block under ``block_hash``; False if it was not filed.

        Not filed when prefix caching is off, or when another block already holds the same
        content (the first block stays the cached one; this one stays uncached).
        """
        assert self._ref_counts[block_id] > 0, f"caching free block {block_id}"
        if not self.enable_prefix_caching:
            return False
        current = self._block_hashes[block_id]
        if current is not None:
            assert current == block_hash, f"block {block_id} re-cached under a new hash"
            return False
        if block_hash in self._cached_blocks:
            return False
        self._cached_blocks[block_hash] = block_id
        self._block_hashes[block_id] = block_hash
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_hashes[block_id]
        if block_hash is None:
            return
        assert self._cached_blocks[block_hash] == block_id
        del self._cached_blocks[block_hash]
        self._block_hashes[block_id] = None
        self.num_evictions += 1
