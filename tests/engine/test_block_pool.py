"""engine.block_pool: exact block ids, LRU eviction, prefix hits, ref counts."""

import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError


def test_allocate_from_head_and_fail_cleanly() -> None:
    pool = BlockPool(10)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 5
    assert pool.usage == 0.5
    with pytest.raises(NoFreeBlocksError, match="asked for 6 blocks, 5 of 10 are free"):
        pool.allocate(6)
    assert pool.free_block_ids() == [5, 6, 7, 8, 9]  # nothing taken by the failed call
    assert pool.allocate(0) == []
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]


def test_freed_blocks_go_to_tail() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)  # [0, 1, 2]
    pool.free(reversed(a))  # tail first, as the KV cache manager frees a request
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]


def test_cached_blocks_survive_free_and_lru_eviction() -> None:
    pool = BlockPool(6)
    a = pool.allocate(2)  # [0, 1]: request A's prefix
    b = pool.allocate(2)  # [2, 3]: request B's prefix
    for block_id, block_hash in zip(a + b, [100, 101, 200, 201], strict=True):
        assert pool.cache_block(block_id, block_hash)
    pool.free(reversed(a))  # A finishes first
    pool.free(reversed(b))
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 4
    assert pool.free_block_ids() == [4, 5, 1, 0, 3, 2]
    assert pool.find_cached_blocks([100, 101]) == [0, 1]
    assert pool.find_cached_blocks([200, 201, 999]) == [2, 3]
    assert pool.find_cached_blocks([101]) == [1]  # hash map lookup is per block hash
    assert pool.find_cached_blocks([999, 200]) == []  # longest prefix only

    # Uncached free blocks go first, then the least recently freed: A's tail, then A's head.
    assert pool.allocate(3) == [4, 5, 1]
    assert pool.num_evictions == 1
    assert pool.block_hash(1) is None
    assert pool.find_cached_blocks([100, 101]) == [0]
    assert pool.find_cached_blocks([200, 201]) == [2, 3]
    assert pool.allocate(1) == [0]
    assert pool.num_evictions == 2 and pool.num_cached_blocks == 2


def test_touch_shares_and_protects_from_eviction() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.cache_block(block, 7)
    pool.touch([block])  # a second request hits it while the first still holds it
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 3
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.free_block_ids() == [1, 2, 3, 0]

    # A hit on a free cached block takes it out of the free queue (from the middle).
    pool.allocate(1)  # block 1
    assert pool.find_cached_blocks([7]) == [0]
    pool.touch([0])
    assert pool.free_block_ids() == [2, 3]
    assert pool.allocate(2) == [2, 3]  # block 0 is not evicted while referenced
    assert pool.num_evictions == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_duplicate_content_keeps_first_block() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    assert pool.cache_block(first, 42)
    assert not pool.cache_block(second, 42)  # same content computed twice
    assert pool.block_hash(second) is None
    assert pool.find_cached_blocks([42]) == [first]
    pool.free([first, second])
    # Reusing the duplicate evicts nothing; reusing the first drops the hash.
    assert pool.free_block_ids() == [2, 3, 0, 1]
    pool.allocate(3)
    assert pool.num_evictions == 1 and pool.find_cached_blocks([42]) == []
    assert pool.allocate(1) == [1]
    assert pool.num_evictions == 1


def test_caching_a_cached_block_again_is_a_noop() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    assert pool.cache_block(block, 5)
    assert not pool.cache_block(block, 5)
    assert pool.num_cached_blocks == 1


def test_prefix_caching_disabled() -> None:
    pool = BlockPool(4, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    assert not pool.cache_block(block, 5)
    pool.free([block])
    assert pool.find_cached_blocks([5]) == []
    assert pool.num_cached_blocks == 0


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks must be positive, got 0"):
        BlockPool(0)
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        BlockPool(2).allocate(-1)
