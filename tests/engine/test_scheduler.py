"""engine.scheduler with tiny numbers (block_size=4, a few blocks) and exact expectations.

``PagedTokenRunner`` stands in for the model runner with the same inputs: it writes each
scheduled token id into its slot of a paged store through the block table, and "samples" a
deterministic function of the whole context READ BACK through the block table. A wrong block
table, a prefix hit on the wrong block or a block reused while still referenced changes the
sampled tokens, which are checked against the same function over the true token sequence.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelRunnerOutput, ScheduledSequence, SchedulerOutput

BLOCK_SIZE = 4


def next_token(context: list[int]) -> int:
    """The fake model: a position-weighted checksum of the context, in [10, 107)."""
    return sum((i + 1) * t for i, t in enumerate(context)) % 97 + 10


class PagedTokenRunner:
    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.slots: dict[int, int] = {}
        self.tables: dict[str, list[int]] = {}  # built from new_block_ids, as the runner does

    def update_tables(self, out: SchedulerOutput) -> None:
        for request_id in [*out.finished_request_ids, *out.preempted_request_ids]:
            self.tables.pop(request_id, None)
        new = {r.request_id for r in out.new_requests}
        for seq in out.sequences:
            assert (seq.request_id in new) != (seq.request_id in self.tables)
            self.tables.setdefault(seq.request_id, []).extend(seq.new_block_ids)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.update_tables(out)
        sampled = {}
        for seq in out.sequences:
            block_ids = self.tables[seq.request_id]
            for i, token_id in enumerate(seq.token_ids):
                self.slots[self._slot(block_ids, seq.start_position + i)] = token_id
        for seq in out.sequences:
            if seq.sample:
                block_ids = self.tables[seq.request_id]
                end = seq.start_position + seq.num_tokens
                context = [self.slots[self._slot(block_ids, p)] for p in range(end)]
                sampled[seq.request_id] = next_token(context)
        return ModelRunnerOutput(sampled_token_ids=sampled)


def reference_output(prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def make_scheduler(
    num_blocks: int = 10,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 4,
    enable_chunked_prefill: bool = True,
    policy: str = "fcfs",
    enable_prefix_caching: bool = True,
    max_model_len: int = 32,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            policy=policy,
        ),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )


def make_request(
    request_id: str, prompt: list[int], max_tokens: int | None = 4, priority: int = 0, **params
) -> Request:
    eos_token_id = params.pop("eos", None)
    return Request(
        request_id,
        prompt,
        SamplingParams(max_tokens=max_tokens, **params),
        eos_token_id=eos_token_id,
        priority=priority,
    )


def layout(out: SchedulerOutput, runner: PagedTokenRunner) -> list[tuple]:
    """(request_id, start_position, num_tokens, block table, sample) per sequence; the block
    table as the runner rebuilt it from the step's ``new_block_ids``."""
    return [
        (s.request_id, s.start_position, s.num_tokens, list(runner.tables[s.request_id]), s.sample)
        for s in out.sequences
    ]


def check_invariants(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    holders = [*scheduler.running, *scheduler.waiting, *scheduler.reserved.values()]
    assert len({r.request_id for r in holders}) == len(holders), "a request in two queues"
    assert len(scheduler.running) <= scheduler.scheduler_config.max_num_seqs
    owners = Counter(b for r in holders for b in r.block_ids)
    for block_id in range(pool.num_blocks):
        assert pool.ref_count(block_id) == owners[block_id] >= 0
        if owners[block_id] > 1:  # shared only through the prefix cache
            assert pool.block_hash(block_id) is not None
    assert pool.num_free_blocks == sum(1 for b in range(pool.num_blocks) if not owners[b])
    assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
    for request in scheduler.running:
        assert request.status is RequestStatus.RUNNING
        assert len(request.block_ids) == kv.num_blocks_for(request.num_computed_tokens)
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert bool(request.block_ids) == (request.num_computed_tokens > 0)


def step(scheduler: Scheduler, runner: PagedTokenRunner) -> tuple[SchedulerOutput, list[Request]]:
    out = scheduler.schedule()
    finished = scheduler.update_from_output(out, runner.execute(out))
    check_invariants(scheduler)
    return out, finished


def test_exact_blocks_and_chunks() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=8), PagedTokenRunner()
    a = make_request("a", list(range(10)), max_tokens=3)
    b = make_request("b", list(range(20, 25)), max_tokens=3)
    scheduler.add_request(a)
    scheduler.add_request(b)

    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("a", 0, 8, [0, 1], False)]
    assert out.sequences[0].token_ids == list(range(8))
    assert [r.request_id for r in out.new_requests] == ["a"]
    assert a.num_computed_tokens == 8 and a.output_token_ids == []

    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("a", 8, 2, [0, 1, 2], True), ("b", 0, 5, [3, 4], True)]
    assert out.sequences[0].token_ids == [8, 9]
    assert [r.request_id for r in out.new_requests] == ["b"]

    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("a", 10, 1, [0, 1, 2], True), ("b", 5, 1, [3, 4], True)]
    assert out.sequences[0].token_ids == a.output_token_ids[:1]
    assert out.new_requests == []

    out, finished = step(scheduler, runner)
    assert layout(out, runner) == [("a", 11, 1, [0, 1, 2], True), ("b", 6, 1, [3, 4], True)]
    assert finished == [a, b]
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 3)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 3)
    assert a.finish_reason is FinishReason.LENGTH
    assert scheduler.kv_cache_manager.num_free_blocks == 10
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_request_ids == ["a", "b"]


def test_chunked_prefill_with_small_budget() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=4), PagedTokenRunner()
    a = make_request("a", list(range(10)), max_tokens=2)
    scheduler.add_request(a)
    layouts = [layout(step(scheduler, runner)[0], runner) for _ in range(4)]
    assert layouts == [
        [("a", 0, 4, [0], False)],
        [("a", 4, 4, [0, 1], False)],
        [("a", 8, 2, [0, 1, 2], True)],
        [("a", 10, 1, [0, 1, 2], True)],
    ]
    assert a.is_finished and a.output_token_ids == reference_output(list(range(10)), 2)


def test_without_chunked_prefill_a_prompt_waits_until_it_fits() -> None:
    def first_steps(chunked: bool) -> list[list[tuple]]:
        scheduler = make_scheduler(
            max_num_batched_tokens=16, enable_chunked_prefill=chunked, max_model_len=16
        )
        runner = PagedTokenRunner()
        scheduler.add_request(make_request("a", list(range(10))))
        scheduler.add_request(make_request("b", list(range(30, 40))))
        return [layout(step(scheduler, runner)[0], runner) for _ in range(2)]

    assert first_steps(chunked=False) == [
        [("a", 0, 10, [0, 1, 2], True)],
        [("a", 10, 1, [0, 1, 2], True), ("b", 0, 10, [3, 4, 5], True)],
    ]
    assert first_steps(chunked=True) == [
        [("a", 0, 10, [0, 1, 2], True), ("b", 0, 6, [3, 4], False)],
        [("a", 10, 1, [0, 1, 2], True), ("b", 6, 4, [3, 4, 5], True)],
    ]
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_model_len"):
        make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False, max_model_len=16)


def test_decodes_come_first() -> None:
    # Under "priority", A (higher priority, still in prefill) is served before B (decoding),
    # but the output lists B's decode first.
    scheduler = make_scheduler(max_num_batched_tokens=10, policy="priority")
    runner = PagedTokenRunner()
    scheduler.add_request(make_request("b", [1, 2, 3], priority=1))
    step(scheduler, runner)
    scheduler.add_request(make_request("a", list(range(15)), priority=0))
    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("b", 3, 1, [0], True), ("a", 0, 9, [1, 2, 3], False)]
    out, _ = step(scheduler, runner)
    # A is served first (it gets block 4), yet B's decode is listed first.
    assert layout(out, runner) == [("b", 4, 1, [0, 5], True), ("a", 9, 6, [1, 2, 3, 4], True)]


def test_max_num_seqs() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=2), PagedTokenRunner()
    for name, max_tokens in (("a", 1), ("b", 3), ("c", 2)):
        scheduler.add_request(make_request(name, [7, 8], max_tokens=max_tokens))
    started = []
    for _ in range(4):
        out, _ = step(scheduler, runner)
        assert scheduler.num_running <= 2
        started.append([r.request_id for r in out.new_requests])
    assert started == [["a", "b"], ["c"], [], []]
    assert not scheduler.has_unfinished_requests()


@pytest.mark.parametrize(
    ("policy", "expected"), [("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "c", "a"])]
)
def test_policy_order(policy: str, expected: list[str]) -> None:
    scheduler, runner = make_scheduler(max_num_seqs=1, policy=policy), PagedTokenRunner()
    for name, priority, arrival in (("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)):
        request = make_request(name, [1, 2, 3], max_tokens=1, priority=priority)
        request.arrival_time = arrival
        scheduler.add_request(request)
    order = []
    while scheduler.has_unfinished_requests():
        order += [r.request_id for r in step(scheduler, runner)[0].new_requests]
    assert order == expected


def test_preemption_by_recompute() -> None:
    # 4 blocks of 4 tokens. Both requests fit until A needs a third block.
    scheduler, runner = make_scheduler(num_blocks=4, max_model_len=16), PagedTokenRunner()
    a = make_request("a", list(range(7)), max_tokens=6)
    b = make_request("b", list(range(50, 57)), max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("a", 7, 1, [0, 1], True), ("b", 7, 1, [2, 3], True)]

    out, _ = step(scheduler, runner)
    assert out.preempted_request_ids == ["b"]
    assert layout(out, runner) == [("a", 8, 1, [0, 1, 3], True)]  # B's tail block 3 is reused first
    assert b.status is RequestStatus.PREEMPTED
    assert (b.num_computed_tokens, b.block_ids, b.num_preemptions) == (0, [], 1)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2)
    assert scheduler.stats().num_preemptions == 1
    assert list(scheduler.waiting) == [b]

    for position in (9, 10, 11):  # A alone: B cannot get the 3 blocks it needs
        out, finished = step(scheduler, runner)
        assert layout(out, runner) == [("a", position, 1, [0, 1, 3], True)]
    assert finished == [a]
    # B resumes. Its first block survived in the prefix cache (block 2, free but cached), so
    # the recompute covers the rest: prompt tokens 4..6 and the 2 tokens it had sampled.
    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("b", 4, 5, [2, 3, 1], True)]
    assert out.new_requests == [b] and out.finished_request_ids == ["a"]
    assert out.sequences[0].token_ids == [54, 55, 56, *b.output_token_ids[:2]]
    for position in (9, 10, 11):
        out, finished = step(scheduler, runner)
        assert layout(out, runner) == [("b", position, 1, [2, 3, 1], True)]
    assert finished == [b]
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 6)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 6)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert scheduler.kv_cache_manager.num_free_blocks == 4


def test_a_request_preempts_itself_when_it_ranks_last() -> None:
    scheduler, runner = make_scheduler(num_blocks=4, max_model_len=16), PagedTokenRunner()
    a = make_request("a", list(range(6)), max_tokens=3)
    b = make_request("b", list(range(40, 48)), max_tokens=3)
    c = make_request("c", [9], max_tokens=1)
    for r in (a, b, c):
        scheduler.add_request(r)
    out, _ = step(scheduler, runner)  # a: [0, 1], b: [2, 3] (full); no block left for c
    assert [r.request_id for r in out.new_requests] == ["a", "b"]
    out, _ = step(scheduler, runner)
    assert out.preempted_request_ids == ["b"]
    # B's blocks are free now, but a step that preempts admits no waiting request.
    assert layout(out, runner) == [("a", 6, 1, [0, 1], True)]
    assert list(scheduler.waiting) == [b, c]
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    for r in (a, b, c):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.num_output_tokens)
    assert (a.num_output_tokens, b.num_output_tokens, c.num_output_tokens) == (3, 3, 1)


def test_no_admission_in_a_step_that_preempts() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16, policy="priority")
    runner = PagedTokenRunner()
    a = make_request("a", list(range(8)), max_tokens=2, priority=0)
    b = make_request("b", list(range(20, 26)), max_tokens=2, priority=2)
    c = make_request("c", [9], max_tokens=1, priority=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)  # a: [0, 1], b: [2, 3]
    scheduler.add_request(c)
    out, _ = step(scheduler, runner)
    assert out.preempted_request_ids == ["b"]
    assert layout(out, runner) == [("a", 8, 1, [0, 1, 3], True)]  # block 2 is free, yet c waits
    assert list(scheduler.waiting) == [c, b]  # priority order, not "preempted first"
    out, _ = step(scheduler, runner)
    assert [r.request_id for r in out.new_requests] == ["c", "b"]  # a finished: room for both


@pytest.mark.parametrize("state", ["waiting", "running", "preempted", "reserved", "in_flight"])
def test_abort_frees_every_block(state: str) -> None:
    scheduler, runner = make_scheduler(num_blocks=4, max_model_len=16), PagedTokenRunner()
    a = make_request("a", list(range(6)), max_tokens=8)
    b = make_request("b", list(range(40, 48)), max_tokens=8)
    scheduler.add_request(a)
    victim = b
    if state == "reserved":
        assert scheduler.reserve_request(b)
        assert b.block_ids == [0, 1]
    else:
        scheduler.add_request(b)
    if state in ("running", "preempted"):
        step(scheduler, runner)
    if state == "preempted":
        step(scheduler, runner)
        assert b.status is RequestStatus.PREEMPTED
    if state == "in_flight":  # aborted between schedule and update_from_output
        out = scheduler.schedule()
        assert scheduler.abort_request("b")
        scheduler.update_from_output(out, runner.execute(out))
        assert b.output_token_ids == []
    else:
        assert victim.status is not RequestStatus.FINISHED_ABORTED
        assert scheduler.abort_request("b")
    assert b.status is RequestStatus.FINISHED_ABORTED and b.block_ids == []
    assert not scheduler.abort_request("b") and not scheduler.abort_request("nope")
    check_invariants(scheduler)
    out, _ = step(scheduler, runner)
    assert "b" in out.finished_request_ids
    scheduler.abort_request("a")
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    assert not scheduler.has_unfinished_requests()


def finish_with(request: Request, tokens: list[int], max_model_len: int = 32) -> list[int]:
    """Feed scripted sampled tokens; returns the outputs when it finished."""
    scheduler = make_scheduler(max_model_len=max_model_len)
    scheduler.add_request(request)
    for token in tokens:
        out = scheduler.schedule()
        sampled = {s.request_id: token for s in out.sequences if s.sample}
        if scheduler.update_from_output(out, ModelRunnerOutput(sampled)):
            break
    assert request.is_finished
    assert scheduler.kv_cache_manager.num_free_blocks == 10
    return request.output_token_ids


def test_stop_conditions() -> None:
    r = make_request("stop", [1, 2], max_tokens=10, stop_token_ids=(7,))
    assert finish_with(r, [5, 7, 5]) == [5, 7]
    assert (r.finish_reason, r.stop_token_id) == (FinishReason.STOP, 7)

    r = make_request("eos", [1, 2], max_tokens=10, eos=2)
    assert finish_with(r, [5, 2, 5]) == [5, 2]
    assert (r.status, r.stop_token_id) == (RequestStatus.FINISHED_STOPPED, 2)

    r = make_request("ignore_eos", [1, 2], max_tokens=3, eos=2, ignore_eos=True)
    assert finish_with(r, [2, 2, 2, 2]) == [2, 2, 2]
    assert (r.finish_reason, r.stop_token_id) == (FinishReason.LENGTH, None)

    r = make_request("min_tokens", [1, 2], max_tokens=10, eos=2, min_tokens=3, stop_token_ids=(7,))
    assert finish_with(r, [2, 7, 2, 5]) == [2, 7, 2]
    assert r.finish_reason is FinishReason.STOP

    r = make_request("max_tokens", [1, 2], max_tokens=2)
    assert finish_with(r, [5, 5, 5]) == [5, 5]
    assert r.finish_reason is FinishReason.LENGTH

    r = make_request("max_model_len", [1, 2, 3], max_tokens=None)
    assert finish_with(r, [5] * 20, max_model_len=8) == [5] * 5
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 8


def test_rejections() -> None:
    scheduler = make_scheduler(num_blocks=10, max_model_len=16)
    with pytest.raises(ValueError, match=r"prompt has 16 tokens.*max_model_len 16"):
        scheduler.add_request(make_request("long", list(range(16))))
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("empty", []))
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", [1]))
    # A prompt that needs the whole pool: max_model_len is capped at the KV cache's size.
    small = make_scheduler(num_blocks=2, max_model_len=64)
    assert small.max_model_len == 8
    with pytest.raises(ValueError, match=r"prompt has 9 tokens.*holds 8 tokens: 2 blocks of 4"):
        small.add_request(make_request("huge", list(range(9))))
    assert not small.has_unfinished_requests()


def test_a_request_that_fills_the_pool_finishes_alone() -> None:
    scheduler, runner = make_scheduler(num_blocks=2, max_model_len=64), PagedTokenRunner()
    r = make_request("a", list(range(5)), max_tokens=None)
    scheduler.add_request(r)
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 8


def test_prefill_role_leaves_evictable_prefix_cache() -> None:
    scheduler, runner = make_scheduler(), PagedTokenRunner()
    p = make_request("p", list(range(9)), max_tokens=1)
    scheduler.add_request(p)
    out, finished = step(scheduler, runner)
    assert layout(out, runner) == [("p", 0, 9, [0, 1, 2], True)] and finished == [p]
    assert scheduler.get_request("p") is p  # until the next schedule()
    stats = scheduler.stats()
    assert (stats.num_free_blocks, stats.num_used_blocks, stats.num_total_blocks) == (10, 0, 10)
    again = make_request("again", [*range(8), 99])
    scheduler.add_request(again)
    out, _ = step(scheduler, runner)
    assert scheduler.get_request("p") is None
    assert layout(out, runner) == [
        ("again", 8, 1, [0, 1, 3], True)
    ]  # a one-token step: listed first
    assert again.num_cached_tokens == 8
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (18, 8)
    assert again.output_token_ids == reference_output(again.prompt_token_ids, 1)


def test_decode_role_reserve_then_join_as_decode() -> None:
    scheduler, runner = make_scheduler(num_blocks=6, max_model_len=24), PagedTokenRunner()
    d = make_request("d", list(range(8)), max_tokens=3)
    assert scheduler.reserve_request(d)
    assert (d.block_ids, d.num_cached_tokens, scheduler.num_reserved) == ([0, 1], 0, 1)
    assert scheduler.schedule().is_empty  # nothing to run until the KV lands
    # The "prefill worker" writes the prompt KV into the reserved blocks, samples token 1.
    prefill_elsewhere(runner, d)
    d.output_token_ids.append(next_token(d.prompt_token_ids))
    assert scheduler.add_prefilled_request(d)
    out, _ = step(scheduler, runner)
    assert layout(out, runner) == [("d", 8, 1, [0, 1, 2], True)]
    assert out.new_requests == [d]
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert d.output_token_ids == reference_output(d.prompt_token_ids, 3)
    # Its prompt blocks were filed in the prefix cache: a second reservation hits them.
    e = make_request("e", [*range(8), 5])
    assert scheduler.reserve_request(e) and e.num_cached_tokens == 8
    assert e.block_ids[:2] == [0, 1]


def prefill_elsewhere(runner: PagedTokenRunner, request: Request) -> None:
    """Write a reserved request's prompt KV into its blocks, as a prefill worker does; the
    decode side's runner then first sees the request when the scheduler sends it."""
    seq = ScheduledSequence(
        request.request_id, request.prompt_token_ids, 0, list(request.block_ids), False
    )
    runner.execute(SchedulerOutput(sequences=[seq], new_requests=[request]))
    del runner.tables[request.request_id]


def test_decode_role_first_token_can_finish_it() -> None:
    scheduler = make_scheduler()
    d = make_request("d", [1, 2, 3], max_tokens=1)
    assert scheduler.reserve_request(d)
    d.output_token_ids.append(5)
    assert not scheduler.add_prefilled_request(d)
    assert d.finish_reason is FinishReason.LENGTH and d.block_ids == []
    assert scheduler.kv_cache_manager.num_free_blocks == 10
    assert scheduler.schedule().finished_request_ids == ["d"]
    with pytest.raises(ValueError, match="was not reserved"):
        scheduler.add_prefilled_request(make_request("x", [1]))


def test_decode_role_full_pool_of_reservations_makes_progress() -> None:
    # Every block reserved by prompts that fill them: each decode needs one more block.
    scheduler, runner = make_scheduler(num_blocks=4, max_model_len=16), PagedTokenRunner()
    requests = [
        make_request(f"d{i}", list(range(10 * i, 10 * i + 4)), max_tokens=3) for i in range(4)
    ]
    for r in requests:
        assert scheduler.reserve_request(r)
    assert not scheduler.reserve_request(make_request("late", [1, 2]))
    for r in requests:
        prefill_elsewhere(runner, r)
        r.output_token_ids.append(next_token(r.prompt_token_ids))
        assert scheduler.add_prefilled_request(r)
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler, runner)
    assert not scheduler.has_unfinished_requests()
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 3)
    assert scheduler.stats().num_preemptions >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_simulation_invariants(seed: int, policy: str) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=12, max_num_batched_tokens=10, max_num_seqs=4, policy=policy, max_model_len=40
    )
    runner = PagedTokenRunner()
    prefixes = [[rng.randrange(100) for _ in range(8)] for _ in range(3)]
    expected: dict[str, tuple[Request, int]] = {}
    aborted = set()
    for i in range(60):
        if i < 40 and rng.random() < 0.6:
            prompt = rng.choice(prefixes)[: rng.randrange(9)] + [
                rng.randrange(100) for _ in range(rng.randrange(1, 12))
            ]
            max_tokens = rng.randrange(1, 12)
            request = make_request(
                f"r{i}", prompt, max_tokens=max_tokens, priority=rng.randrange(3)
            )
            scheduler.add_request(request)
            expected[request.request_id] = (request, max_tokens)
        if rng.random() < 0.05 and scheduler.requests:
            victim = rng.choice(sorted(scheduler.requests))
            assert scheduler.abort_request(victim)
            aborted.add(victim)
        step(scheduler, runner)
    for _ in range(500):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler, runner)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.num_free_blocks == 12
    for request_id, (request, max_tokens) in expected.items():
        if request_id in aborted:
            assert request.status is RequestStatus.FINISHED_ABORTED
            continue
        n = min(max_tokens, 40 - request.num_prompt_tokens)
        assert request.output_token_ids == reference_output(request.prompt_token_ids, n)
    stats = scheduler.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_steps_send_only_new_block_ids() -> None:
    """A request's block ids cross to the runner once: in full when it is new (or again after
    preemption), then only the blocks appended since."""
    scheduler, runner = make_scheduler(max_num_batched_tokens=8), PagedTokenRunner()
    a = make_request("a", list(range(10)), max_tokens=6)
    scheduler.add_request(a)
    sent = []
    for _ in range(5):
        out, _ = step(scheduler, runner)
        sent.append([(s.request_id, s.new_block_ids) for s in out.sequences])
    # chunk of 8 (blocks 0, 1), chunk of 2 (+ block 2), decodes at 10, 11 (none), 12 (+ 3)
    assert sent == [[("a", [0, 1])], [("a", [2])], [("a", [])], [("a", [])], [("a", [3])]]
    assert runner.tables["a"] == a.block_ids == [0, 1, 2, 3]


def test_the_lease_of_a_reservation() -> None:
    """One lease per reservation, on the caller's clock: expired ones are aborted and free
    their blocks; a reservation taken into the batch no longer expires."""
    scheduler = make_scheduler()
    a, b = make_request("a", list(range(8))), make_request("b", list(range(20, 28)))
    assert scheduler.reserve_request(a, lease_deadline=10.0)
    assert scheduler.reserve_request(b, lease_deadline=20.0)
    assert scheduler.kv_cache_manager.num_free_blocks == 6
    assert scheduler.expire_reservations(now=9.9) == []
    assert scheduler.expire_reservations(now=10.0) == ["a"]
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    b.output_token_ids.append(5)
    assert scheduler.add_prefilled_request(b)
    assert b.lease_deadline is None
    assert scheduler.expire_reservations(now=100.0) == []
    assert list(scheduler.reserved) == [] and scheduler.get_request("b") is b
