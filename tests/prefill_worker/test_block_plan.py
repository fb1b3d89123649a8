"""The prefill worker's per-step block plan: which blocks a step completes and where they go
(pure Python, block_size 4, exact block ids)."""

from __future__ import annotations

from prefill_worker.worker import StepBlockPlan, plan_step_blocks

BLOCK_SIZE = 4
HERE = [10, 11, 12, 13]  # the request's block table on the prefill worker
THERE = [20, 21, 22, 23]  # the decode worker's reserved blocks, one per prompt block sent


def test_chunked_prompt_sends_full_blocks_then_the_tail_and_pins() -> None:
    # 10 prompt tokens in chunks of 8 and 2: blocks 0-1 are full after the first chunk;
    # the last chunk completes block 2 (a partial tail: tokens 8-9).
    first = plan_step_blocks(HERE, THERE, 0, 0, 8, False, BLOCK_SIZE)
    assert first == StepBlockPlan([10, 11], [20, 21], next_block=2, pin_block_ids=None)
    last = plan_step_blocks(HERE, THERE, 0, first.next_block, 10, True, BLOCK_SIZE)
    assert last == StepBlockPlan([12], [22], next_block=3, pin_block_ids=[10, 11, 12])


def test_blocks_the_decode_worker_caches_are_neither_sent_nor_pinned() -> None:
    # The decode worker already holds prompt block 0: its target starts at prompt block 1.
    plan = plan_step_blocks(HERE, THERE, 1, 1, 10, True, BLOCK_SIZE)
    assert plan == StepBlockPlan([11, 12], [20, 21], next_block=3, pin_block_ids=[11, 12])


def test_a_chunk_that_completes_no_block_sends_nothing() -> None:
    plan = plan_step_blocks(HERE, THERE, 0, 0, 3, False, BLOCK_SIZE)
    assert plan == StepBlockPlan([], [], next_block=0, pin_block_ids=None)
    # A later chunk picks up from there, and an exact multiple has no partial tail.
    plan = plan_step_blocks(HERE, THERE, 0, plan.next_block, 8, True, BLOCK_SIZE)
    assert plan == StepBlockPlan([10, 11], [20, 21], next_block=2, pin_block_ids=[10, 11])


def test_a_block_is_sent_once_across_steps() -> None:
    sent: list[int] = []
    next_block = 0
    for num_tokens, last in ((4, False), (7, False), (12, False), (13, True)):
        plan = plan_step_blocks(HERE, THERE, 0, next_block, num_tokens, last, BLOCK_SIZE)
        sent += plan.src_block_ids
        next_block = plan.next_block
    assert sent == HERE and next_block == 4
