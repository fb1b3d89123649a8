"""The pairing policy, with tiny numbers (block_size=4) and exact expected choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.block_hash import hash_full_blocks
from router.policy import (
    DecisionReason,
    DecodeWorkerSnapshot,
    PairingDecision,
    PairingPolicy,
    PolicyConfig,
    PrefillWorkerSnapshot,
    PrefixAffinityIndex,
)


def decode(worker_id: str, free: int, running: int = 0, waiting: int = 0) -> DecodeWorkerSnapshot:
    return DecodeWorkerSnapshot(worker_id, free, 100, running, waiting)


def prefill(worker_id: str, queued: int = 0) -> PrefillWorkerSnapshot:
    return PrefillWorkerSnapshot(worker_id, queued)


def policy(**overrides) -> PairingPolicy:
    fields = {"block_size": 4, "local_prefill_threshold": 8, **overrides}
    return PairingPolicy(PolicyConfig(**fields))


PROMPT = list(range(100, 120))  # 20 tokens: 5 full blocks
P01 = [prefill("P0"), prefill("P1")]


def test_policy_imports_no_torch() -> None:
    code = "import sys, router.policy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_prefers_no_queue_then_most_free_blocks() -> None:
    workers = [decode("D0", 10, running=5), decode("D1", 20, running=9), decode("D2", 50, 0, 2)]
    assert policy().choose(PROMPT, workers, P01).decode_id == "D1"


def test_decode_ties_go_to_fewer_running_then_smaller_id() -> None:
    workers = [decode("D1", 20, running=3), decode("D0", 20, running=3), decode("D2", 20, 1)]
    assert policy().choose(PROMPT, workers, P01).decode_id == "D2"
    workers = [decode("D1", 20, running=3), decode("D0", 20, running=3)]
    assert policy().choose(PROMPT, workers, P01).decode_id == "D0"


def test_decode_must_fit_the_prompt() -> None:
    # 20 tokens need 20 // 4 + 1 = 6 blocks: D0 has 5 (idle), D1 has 6 (one waiting).
    workers = [decode("D0", 5), decode("D1", 6, waiting=1)]
    assert policy().choose(PROMPT, workers, P01).decode_id == "D1"
    # Nobody fits: the most free blocks.
    workers = [decode("D0", 2), decode("D1", 3, waiting=4)]
    assert policy().choose(PROMPT, workers, P01).decode_id == "D1"


def test_no_prefill_workers_means_local() -> None:
    decision = policy().choose(PROMPT, [decode("D0", 50)], [])
    assert decision == PairingDecision("D0", None, DecisionReason.NO_PREFILL_WORKERS, 0)
    assert decision.is_local


def test_short_prompt_prefills_locally_unless_disabled() -> None:
    short = [1, 2, 3, 4, 5, 6, 7, 8]
    decision = policy().choose(short, [decode("D0", 50)], P01)
    assert decision == PairingDecision("D0", None, DecisionReason.SHORT_PROMPT, 0)
    decision = policy(enable_local_prefill=False).choose(short, [decode("D0", 50)], P01)
    assert decision == PairingDecision("D0", "P0", DecisionReason.LEAST_LOADED, 0)


def test_local_prefills_not_yet_done_on_d_count_against_the_threshold() -> None:
    short = [1, 2, 3, 4, 5, 6]
    busy = DecodeWorkerSnapshot("D0", 50, 100, 0, 0, num_local_prefill_tokens=2)
    decision = policy().choose(short, [busy], P01)  # 6 + 2 <= 8
    assert decision == PairingDecision("D0", None, DecisionReason.SHORT_PROMPT, 0)
    busier = DecodeWorkerSnapshot("D0", 50, 100, 0, 0, num_local_prefill_tokens=3)
    decision = policy().choose(short, [busier], P01)  # 6 + 3 > 8: P prefills it
    assert decision == PairingDecision("D0", "P0", DecisionReason.LEAST_LOADED, 0)
    decision = policy().choose(short, [busier], [])  # nobody else can
    assert decision == PairingDecision("D0", None, DecisionReason.NO_PREFILL_WORKERS, 0)


def test_a_prefix_held_by_d_alone_keeps_the_prefill_local_when_d_is_busy() -> None:
    pairing = policy(local_prefill_threshold=8)
    first = pairing.choose(PROMPT, [decode("D0", 50)], [prefill("P0")])  # P0, D0 hold it
    assert first == PairingDecision("D0", "P0", DecisionReason.LEAST_LOADED, 0)
    busy = DecodeWorkerSnapshot("D0", 50, 100, 0, 0, num_local_prefill_tokens=8)
    turn = [*PROMPT, 7, 7]  # 2 tokens uncached on D0
    # P0 holds the prefix too: D0's share is taken, P0 computes the same 2 tokens.
    decision = pairing.choose(turn, [busy], [prefill("P0")])
    assert decision == PairingDecision("D0", "P0", DecisionReason.AFFINITY, 20)
    # P1 would compute all 22: 20 more than D0, past the threshold of 8: D0 prefills it.
    decision = pairing.choose(turn, [busy], [prefill("P1")])
    assert decision == PairingDecision("D0", None, DecisionReason.SHORT_PROMPT, 20)


def test_long_prompt_goes_to_least_loaded_prefill_worker() -> None:
    decision = policy().choose(PROMPT, [decode("D0", 50)], [prefill("P0", 3), prefill("P1", 1)])
    assert decision == PairingDecision("D0", "P1", DecisionReason.LEAST_LOADED, 0)


def test_prefix_affinity_and_its_queue_limit() -> None:
    pairing = policy(affinity_max_queue_gap=4, enable_local_prefill=False)
    decodes = [decode("D0", 50)]
    first = pairing.choose(PROMPT, decodes, [prefill("P0", 2), prefill("P1", 0)])
    assert first == PairingDecision("D0", "P1", DecisionReason.LEAST_LOADED, 0)

    # Same first 20 tokens + 13 new (8 full blocks, 5 of them cached on P1): P1 keeps it
    # while its queue is at most 4 longer than the shortest.
    longer = [*PROMPT, *range(500, 513)]
    p1_busy = [prefill("P0", 0), prefill("P1", 4)]
    second = pairing.choose(longer, decodes, p1_busy)
    assert second == PairingDecision("D0", "P1", DecisionReason.AFFINITY, 20)
    p1_too_busy = [prefill("P0", 0), prefill("P1", 5)]
    third = pairing.choose(longer, decodes, p1_too_busy)
    assert third == PairingDecision("D0", "P0", DecisionReason.LEAST_LOADED, 0)

    # Now both hold the 8 blocks of ``longer``: the tie goes to the shorter queue.
    fourth = pairing.choose(longer, decodes, [prefill("P0", 2), prefill("P1", 1)])
    assert fourth == PairingDecision("D0", "P1", DecisionReason.AFFINITY, 32)


def test_prefix_cached_on_decode_worker_makes_prefill_local() -> None:
    pairing = policy(local_prefill_threshold=8)
    decodes = [decode("D0", 50), decode("D1", 40)]
    first = pairing.choose(PROMPT, decodes, P01)
    assert first == PairingDecision("D0", "P0", DecisionReason.LEAST_LOADED, 0)
    # D0 now holds the 5 blocks: 22 tokens leave 2 uncached, under the threshold of 8.
    second = pairing.choose([*PROMPT, 7, 7], decodes, P01)
    assert second == PairingDecision("D0", None, DecisionReason.SHORT_PROMPT, 20)
    # D1 does not hold them: 22 uncached tokens, remote on P0 (which has them).
    third = pairing.choose([*PROMPT, 7, 7], [decode("D1", 40)], P01)
    assert third == PairingDecision("D1", "P0", DecisionReason.AFFINITY, 20)


def test_index_uses_the_engine_block_hash() -> None:
    pairing = policy()
    pairing.choose(PROMPT, [decode("D0", 50)], P01)
    hashes = hash_full_blocks(PROMPT, 4)
    assert pairing.index.num_cached_blocks("P0", hashes) == 5
    assert pairing.index.num_cached_blocks("D0", hashes) == 5
    assert pairing.index.num_cached_blocks("P1", hashes) == 0


def test_affinity_index_is_a_bounded_lru() -> None:
    index = PrefixAffinityIndex(capacity=3)
    index.record("P0", [1, 2, 3])
    assert index.num_cached_blocks("P0", [1, 2, 3, 4]) == 3
    index.record("P0", [1])  # touch 1: 2 is now the oldest
    index.record("P1", [9])
    assert len(index) == 3
    assert index.num_cached_blocks("P0", [1, 2, 3]) == 1  # 2 evicted: the prefix stops there
    assert index.num_cached_blocks("P1", [9]) == 1
    index.remove_worker("P0")
    assert index.num_cached_blocks("P0", [1]) == 0
    assert len(index) == 1


def test_no_decode_workers_is_an_error() -> None:
    with pytest.raises(ValueError, match="no decode workers"):
        policy().choose(PROMPT, [], P01)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 0),
        ("local_prefill_threshold", -1),
        ("affinity_max_queue_gap", -1),
        ("affinity_index_capacity", 0),
    ],
)
def test_config_validation(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**{field: value})
