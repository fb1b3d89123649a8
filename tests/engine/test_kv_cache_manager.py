"""engine.kv_cache_manager: prefix hits (capped), incremental caching, reserve, free."""

from engine.block_hash import hash_full_blocks
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8))


def run_prefill(kv: KVCacheManager, request: Request) -> list[int] | None:
    """Admit a request and compute its whole prompt in one step, as the scheduler would."""
    hits, num_computed = kv.get_computed_blocks(request)
    new_blocks = kv.allocate_slots(request, request.num_tokens - num_computed, hits)
    if new_blocks is not None:
        request.num_computed_tokens = request.num_tokens
        kv.cache_full_blocks(request)
    return new_blocks


def test_allocate_grows_block_table() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    request = make_request("a", list(range(6)))
    assert kv.get_computed_blocks(request) == ([], 0)
    assert kv.allocate_slots(request, 6) == [0, 1]
    request.num_computed_tokens = 6
    request.output_token_ids.append(99)
    assert kv.allocate_slots(request, 1) == []  # token 7 fits in block 1
    request.num_computed_tokens = 7
    request.output_token_ids.append(98)
    assert kv.allocate_slots(request, 1) == []
    request.num_computed_tokens = 8
    request.output_token_ids.append(97)
    assert kv.allocate_slots(request, 1) == [2]
    assert request.block_ids == [0, 1, 2]
    assert kv.num_free_blocks == 7 and kv.num_used_blocks == 3


def test_allocate_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    request = make_request("a", list(range(13)))
    assert kv.allocate_slots(request, 13) is None
    assert request.block_ids == [] and kv.num_free_blocks == 3
    assert kv.allocate_slots(request, 12) == [0, 1, 2]


def test_prefix_sharing_and_counters() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, a) == [0, 1, 2]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    pool = kv.block_pool
    assert [pool.block_hash(b) for b in a.block_ids] == [
        *hash_full_blocks(a.all_token_ids, 4),
        None,
    ]

    # Same first 8 tokens, different tail: shares blocks 0 and 1.
    b = make_request("b", [*range(8), 50, 51, 52])
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert kv.allocate_slots(b, 3, [0, 1]) == [3]
    assert b.block_ids == [0, 1, 3]
    assert [pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (21, 8)

    # Freeing A keeps the shared blocks in use for B; freeing B makes everything free.
    kv.free(a)
    assert a.block_ids == [] and [pool.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    kv.free(b)
    assert kv.num_free_blocks == 10
    # Freed tail first: B's blocks 3, 1, 0 follow A's block 2.
    assert pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)


def test_hits_leave_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))  # exactly 2 full blocks
    run_prefill(kv, a)
    kv.free(a)
    same = make_request("same", list(range(8)))
    assert kv.get_computed_blocks(same) == ([0], 4)  # the last block is recomputed
    assert kv.allocate_slots(same, 4, [0]) == [2]
    assert kv.block_pool.ref_count(1) == 0  # block 1 stays cached and free
    longer = make_request("longer", list(range(9)))
    assert kv.get_computed_blocks(longer) == ([0, 1], 8)


def test_cache_full_blocks_is_incremental() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    request = make_request("a", list(range(6)))
    kv.allocate_slots(request, 3)
    request.num_computed_tokens = 3
    kv.cache_full_blocks(request)
    assert kv.block_pool.num_cached_blocks == 0
    kv.allocate_slots(request, 3)
    request.num_computed_tokens = 6
    kv.cache_full_blocks(request)
    assert kv.block_pool.num_cached_blocks == 1
    # Output tokens fill block 1; only then is it hashed, over prompt + output tokens.
    request.output_token_ids += [60, 61]
    request.num_computed_tokens = 8
    kv.cache_full_blocks(request)
    assert kv.block_pool.num_cached_blocks == 2
    expected = hash_full_blocks([0, 1, 2, 3, 4, 5, 60, 61], 4)
    assert [kv.block_pool.block_hash(b) for b in request.block_ids] == expected


def test_reserve_with_prefix_hits() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(12)))
    run_prefill(kv, a)  # blocks 0, 1, 2, all cached
    kv.free(a)
    remote = make_request("remote", [*range(8), 70, 71, 72, 73, 74])
    assert kv.reserve(remote, remote.num_prompt_tokens) == 8
    assert remote.block_ids == [0, 1, 3, 4]  # hits, then fresh blocks for the rest
    assert remote.num_computed_tokens == 0  # the scheduler marks it computed when KV lands
    kv.free(remote)

    # No room: nothing kept.
    small = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    big = make_request("big", list(range(9)))
    assert small.reserve(big, 9) is None
    assert big.block_ids == [] and small.num_free_blocks == 2


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(8)))
    run_prefill(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.block_pool.num_cached_blocks == 0
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


def test_pins_are_counted_until_unpinned() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    request = make_request("a", list(range(10)))
    assert run_prefill(kv, request) == [0, 1, 2]
    kv.pin([0, 1, 2])  # a transfer reads them
    kv.pin([2])  # a second reader of the tail block
    assert kv.num_pinned_blocks == 3
    kv.free(request)  # the request ends; the pins keep the blocks
    assert (kv.num_free_blocks, kv.num_pinned_blocks) == (7, 3)
    kv.unpin([0, 1, 2])
    assert (kv.num_free_blocks, kv.num_pinned_blocks) == (9, 1)
    kv.unpin([2])
    assert (kv.num_free_blocks, kv.num_pinned_blocks) == (10, 0)
