"""Iteration-level scheduler: continuous batching, chunked prefill, preemption (pure Python).

Modelled on vLLM v1's scheduler, simplified. One engine step is::

    out = scheduler.schedule()                     # what to compute, with block tables
    runner_output = model_runner.execute(out)      # one sampled token per sample=True sequence
    finished = scheduler.update_from_output(out, runner_output)

Queues and who frees what:

* ``waiting`` (policy order: fcfs = arrival order, priority = lower ``priority`` then
  arrival) holds new and preempted requests; it holds no blocks, except a prefilled decode
  request (below), which already owns its block table.
* ``running`` holds every request with blocks and a slot (at most ``max_num_seqs``).
  ``schedule`` serves running requests first (a decode gets 1 token, a request still in
  prefill its next chunk), then admits waiting ones while the token budget, ``max_num_seqs``
  and the pool allow; prefix-cache hits count as computed. When a running request needs a
  block and none is free, the lowest-ranked running request (the last in policy order) is
  preempted by recompute: its blocks are freed, ``num_computed_tokens`` goes back to 0 and it
  returns to the front of ``waiting``; no waiting request is admitted in that step.
* ``update_from_output`` advances ``num_computed_tokens``, files newly full blocks in the
  prefix cache, appends sampled tokens and checks stop conditions. Finished requests free
  their blocks at once (they stay findable in the prefix cache); aborted ones too.
* Decode role: ``reserve_request`` allocates a prompt's blocks before its KV arrives from a
  prefill worker (the request waits in ``reserved``); once the KV and the first sampled token
  are in, ``add_prefilled_request`` queues it as already computed, so it is next scheduled as
  a one-token decode. A reservation carries the request's one lease
  (``Request.lease_deadline``): ``expire_reservations(now)`` aborts those nobody took in
  time. The prefill role needs nothing special: ``max_tokens=1``.

Sizes are checked at admission so nothing can hang: ``max_model_len`` is capped at what the
KV cache holds (``num_blocks * block_size``), and a prompt that reaches it raises
``ValueError``; every admitted request can therefore always run alone. If nothing runs and
waiting prefilled requests hold all the blocks, the lowest ranked give theirs back and will
recompute. ``schedule`` and ``update_from_output`` alternate (one non-empty step in flight);
not thread-safe: one owner calls every method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.request_queue import RequestQueue
from engine.scheduler_output import ModelRunnerOutput, ScheduledSequence, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics; the counters are cumulative."""

    num_running: int
    num_waiting: int
    num_reserved: int
    num_preemptions: int
    num_total_blocks: int
    num_used_blocks: int
    num_free_blocks: int  # ref count 0, including evictable prefix-cache blocks
    num_pinned_blocks: int  # held by a pin (a KV transfer reading them) until unpinned
    kv_cache_usage: float  # used / total
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_evictions: int  # prefix-cache blocks reused for other content


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
    ) -> None:
        if max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        self.scheduler_config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        kv_capacity = num_blocks * cache_config.block_size
        if kv_capacity < max_model_len:
            logger.warning(
                "max_model_len %d exceeds the KV cache (%d tokens): capping it",
                max_model_len,
                kv_capacity,
            )
        self.max_model_len = min(max_model_len, kv_capacity)
        if (
            not scheduler_config.enable_chunked_prefill
            and scheduler_config.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens "
                f"({scheduler_config.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}), or a long prompt could never be scheduled"
            )
        self._priority = scheduler_config.policy == "priority"
        self.waiting = RequestQueue(self._policy_key if self._priority else None)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, reserved included
        self.reserved: dict[str, Request] = {}
        self._arrival_order: dict[str, int] = {}
        self._next_arrival = 0
        # Requests the runner holds state for -> how many of their block ids it has been sent:
        # each step sends only the blocks appended since (block tables only grow while a
        # request runs; preemption and finishing drop the entry and the runner's row).
        self._runner_num_blocks: dict[str, int] = {}
        self._finished_request_ids: list[str] = []  # to report in the next SchedulerOutput
        self._just_finished: dict[str, Request] = {}  # still found by get_request until then
        self.num_preemptions = 0
        self._step_in_flight = False

    # ---- requests in -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` if it can never be served."""
        self._validate(request)
        self._admit(request)
        self.waiting.push(request)

    def reserve_request(self, request: Request, lease_deadline: float | None = None) -> bool:
        """Decode role: allocate blocks for the prompt's KV (and its outputs', for a resumed
        request), which another worker computes.

        On success ``request.block_ids`` is the block table to write and
        ``request.num_cached_tokens`` the leading tokens already present (prefix-cache hits:
        no need to send them). False, with nothing kept, when the pool lacks room now.
        ``lease_deadline``: ``expire_reservations`` drops the reservation after it unless
        ``add_prefilled_request`` took it first.
        """
        self._validate(request)
        request.lease_deadline = lease_deadline
        num_cached_tokens = self.kv_cache_manager.reserve(request, request.num_tokens)
        if num_cached_tokens is None:
            return False
        self._admit(request)
        request.num_cached_tokens = num_cached_tokens
        self.reserved[request.request_id] = request
        return True

    def add_prefilled_request(self, request: Request) -> bool:
        """Decode role: the reserved request's prompt KV is written, its first token sampled.

        ``request.output_token_ids`` must end with the token the prefill worker sampled. The
        request is queued as computed up to that token and next scheduled as a decode.
        Returns False when that first token already finished it (stop token, ``max_tokens``,
        length): its blocks are freed and ``request.status`` says why.
        """
        if self.reserved.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} was not reserved")
        if not request.output_token_ids:
            raise ValueError(f"request {request.request_id!r} has no sampled first token")
        del self.reserved[request.request_id]
        request.lease_deadline = None
        request.num_computed_tokens = request.num_tokens - 1  # all but the sampled token
        self.kv_cache_manager.cache_full_blocks(request)
        status = self._check_stop(request)
        if status is not None:
            self._finish(request, status)
            return False
        self.waiting.push_front(request)
        return True

    def abort_request(self, request_id: str) -> bool:
        """Abort in any state; its blocks are freed. False if unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if self.reserved.pop(request_id, None) is None:
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def expire_reservations(self, now: float) -> list[str]:
        """Abort every reservation whose lease ended at or before ``now``; their ids."""
        expired = [
            r.request_id
            for r in self.reserved.values()
            if r.lease_deadline is not None and r.lease_deadline <= now
        ]
        for request_id in expired:
            self.abort_request(request_id)
        return expired

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        assert not self._step_in_flight, "update_from_output() the last step first"
        config = self.scheduler_config
        kv = self.kv_cache_manager
        budget = config.max_num_batched_tokens
        decodes: list[ScheduledSequence] = []
        prefills: list[ScheduledSequence] = []
        new_requests: list[Request] = []
        preempted_ids: list[str] = []

        def emit(request: Request, num_new_tokens: int) -> None:
            if request.request_id not in self._runner_num_blocks:
                self._runner_num_blocks[request.request_id] = 0  # the runner has no table yet
                new_requests.append(request)
            start = request.num_computed_tokens
            end = start + num_new_tokens
            seq = ScheduledSequence(
                request_id=request.request_id,
                token_ids=_token_slice(request, start, end),
                start_position=start,
                new_block_ids=request.block_ids[self._runner_num_blocks[request.request_id] :],
                sample=end == request.num_tokens,
            )
            self._runner_num_blocks[request.request_id] = len(request.block_ids)
            (decodes if num_new_tokens == 1 and seq.sample else prefills).append(seq)

        # 1. Running requests, in policy order: the last one is the first to be preempted.
        self.running.sort(key=self._policy_key)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = request.num_tokens - request.num_computed_tokens
            assert num_new_tokens > 0, f"{request.request_id} has nothing to compute"
            if num_new_tokens > budget and not config.enable_chunked_prefill:
                index += 1
                continue
            num_new_tokens = min(num_new_tokens, budget)
            while kv.allocate_slots(request, num_new_tokens) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # preempted itself: everyone after it in policy order is gone too
            emit(request, num_new_tokens)
            budget -= num_new_tokens
            index += 1

        # 2. Waiting requests, in policy order, unless this step had to preempt.
        while (
            not preempted_ids
            and self.waiting
            and budget > 0
            and len(self.running) < config.max_num_seqs
        ):
            request = self.waiting.peek()
            if request.num_computed_tokens > 0:  # prefilled elsewhere: blocks and KV in place
                hit_block_ids, num_computed = [], request.num_computed_tokens
            else:
                hit_block_ids, num_computed = kv.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_computed
            if num_new_tokens > budget:
                if not config.enable_chunked_prefill:
                    break  # wait for a step where it fits whole, keeping the order
                num_new_tokens = budget
            if kv.allocate_slots(request, num_new_tokens, hit_block_ids) is None:
                # With nothing running, only waiting (prefilled) requests can hold the blocks:
                # reclaim theirs, lowest ranked first, rather than wait forever.
                if self.running or not self._reclaim_waiting_blocks():
                    break
                continue
            self.waiting.pop()
            if request.num_computed_tokens == 0 and request.num_preemptions == 0:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            emit(request, num_new_tokens)
            budget -= num_new_tokens

        finished_ids, self._finished_request_ids = self._finished_request_ids, []
        self._just_finished.clear()
        self._step_in_flight = bool(decodes or prefills)
        return SchedulerOutput(
            sequences=decodes + prefills,
            new_requests=new_requests,
            finished_request_ids=finished_ids,
            preempted_request_ids=preempted_ids,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Apply one computed step; returns the requests that finished in it."""
        self._step_in_flight = False
        finished: list[Request] = []
        for seq in scheduler_output.sequences:
            request = self.requests.get(seq.request_id)
            if (
                request is None  # aborted while the step ran
                or request.status is not RequestStatus.RUNNING
                or request.num_computed_tokens != seq.start_position
            ):
                continue
            request.num_computed_tokens += seq.num_tokens
            self.kv_cache_manager.cache_full_blocks(request)
            if not seq.sample:
                continue
            token_id = runner_output.sampled_token_ids.get(seq.request_id)
            if token_id is None:
                raise ValueError(f"runner output lacks a sampled token for {seq.request_id!r}")
            request.output_token_ids.append(token_id)
            status = self._check_stop(request)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    # ---- state -------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        """Waiting, running or reserved requests exist (reserved ones cannot be scheduled)."""
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_reserved(self) -> int:
        return len(self.reserved)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request, or one finished since the last ``schedule``; else None."""
        request = self.requests.get(request_id)
        return request if request is not None else self._just_finished.get(request_id)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_reserved=len(self.reserved),
            num_preemptions=self.num_preemptions,
            num_total_blocks=kv.num_blocks,
            num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks,
            num_pinned_blocks=kv.num_pinned_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_evictions=kv.block_pool.num_evictions,
        )

    # ---- helpers -----------------------------------------------------------------------

    def _policy_key(self, request: Request) -> tuple:
        arrival = self._arrival_order[request.request_id]
        if self._priority:
            return (request.priority, request.arrival_time, arrival)
        return (arrival,)

    def _validate(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.block_ids:
            raise ValueError(f"request {request.request_id!r} was already scheduled")
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_tokens >= self.max_model_len:
            kv_tokens = self.kv_cache_manager.num_blocks * self.block_size
            raise ValueError(
                f"request {request.request_id!r}: prompt has {request.num_tokens} "
                f"tokens, which leaves no room to generate under max_model_len "
                f"{self.max_model_len} (the KV cache holds {kv_tokens} tokens: "
                f"{self.kv_cache_manager.num_blocks} blocks of {self.block_size})"
            )

    def _admit(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = self._next_arrival
        self._next_arrival += 1

    def _preempt(self, request: Request) -> None:
        """Preempt a running request by recompute: back to the front of ``waiting``."""
        self._reset_for_recompute(request)
        self._runner_num_blocks.pop(request.request_id, None)
        self.waiting.push_front(request)

    def _reclaim_waiting_blocks(self) -> bool:
        """Reset the lowest-ranked waiting request that holds blocks; False if none does."""
        for request in reversed(list(self.waiting)):
            if request.block_ids:
                self._reset_for_recompute(request)
                return True
        return False

    def _reset_for_recompute(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens and (
            token_id in params.stop_token_ids
            or (not params.ignore_eos and token_id == request.eos_token_id)
        ):
            request.stop_token_id = token_id
            return RequestStatus.FINISHED_STOPPED
        if (
            params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        ) or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Free a request already removed from every queue, and report it next step."""
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        del self._arrival_order[request.request_id]
        self._runner_num_blocks.pop(request.request_id, None)
        self._finished_request_ids.append(request.request_id)
        self._just_finished[request.request_id] = request


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """``request.all_token_ids[start:end]`` without copying the whole sequence."""
    num_prompt = request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : end - num_prompt]
    return (
        request.prompt_token_ids[start:end] + request.output_token_ids[: max(0, end - num_prompt)]
    )
