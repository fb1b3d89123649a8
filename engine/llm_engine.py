"""The engine loop: scheduler + model runner, one step at a time (synchronous).

``add_request`` queues a request; each ``step`` asks the scheduler what to compute, runs it on
the model runner, feeds the sampled tokens back to the scheduler, and returns one
``RequestDelta`` for every request that produced tokens or finished in that step. Callers
(the offline ``LLM``, the workers) drive the loop; this class holds no threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.outputs import RequestDelta
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerStats
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.tokenizer import get_eos_token_id, get_eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        hf_config = self.runner.hf_config
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = load_tokenizer(
            config.model.tokenizer or self.runner.model_path,
            skip_tokenizer_init=config.model.skip_tokenizer_init,
        )
        self.eos_token_id = get_eos_token_id(hf_config, self.tokenizer)
        # Checkpoints may end turns with more than one token (Llama 3: <|eot_id|>); as in
        # vLLM, the others stop generation too unless EOS is ignored.
        self.extra_eos_token_ids = tuple(
            t
            for t in get_eos_token_ids(hf_config, self.tokenizer, self.runner.model_path)
            if t != self.eos_token_id
        )
        self.scheduler = Scheduler(
            config.scheduler, config.cache, self.runner.num_blocks, self.max_model_len
        )

    # -- requests ----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """Queue a request. Raises ``ValueError`` for a prompt that can never be served.

        ``output_token_ids``: tokens already generated for it elsewhere (a request resumed
        after its worker died); it continues after them as if it had made them itself."""
        request = self.make_request(
            request_id, prompt_token_ids, sampling_params, priority, output_token_ids
        )
        self.scheduler.add_request(request)
        return request

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """A validated ``Request`` for this engine, not yet queued (``output_token_ids``: see
        ``add_request``)."""
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        output_token_ids = list(output_token_ids or ())
        max_tokens = sampling_params.max_tokens
        if max_tokens is not None and len(output_token_ids) >= max_tokens:
            raise ValueError(
                f"the request already has {len(output_token_ids)} output tokens of its "
                f"max_tokens={max_tokens}: nothing is left to generate"
            )
        vocab_size = self.runner.geometry.vocab_size
        bad = [t for t in (*prompt_token_ids, *output_token_ids) if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab size {vocab_size}")
        if self.extra_eos_token_ids and not sampling_params.ignore_eos:
            extra = [t for t in self.extra_eos_token_ids if t not in sampling_params.stop_token_ids]
            if extra:
                sampling_params = replace(
                    sampling_params, stop_token_ids=(*sampling_params.stop_token_ids, *extra)
                )
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=sampling_params,
            eos_token_id=self.eos_token_id,
            priority=priority,
            output_token_ids=output_token_ids,
        )

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_schedulable_requests(self) -> bool:
        """Waiting or running requests (reserved ones wait for their KV, not for a step)."""
        return bool(self.scheduler.num_waiting or self.scheduler.num_running)

    # -- the loop ----------------------------------------------------------------------

    def step(
        self, on_layer: Callable[[SchedulerOutput, int], None] | None = None
    ) -> list[RequestDelta]:
        """One iteration. ``on_layer(step, layer)`` fires once a layer's K/V are in the cache."""
        scheduler_output = self.scheduler.schedule()
        layer_callback = None
        if on_layer is not None and not scheduler_output.is_empty:

            def layer_callback(layer: int) -> None:
                on_layer(scheduler_output, layer)

        runner_output = self.runner.execute(scheduler_output, layer_callback=layer_callback)
        return self.process_output(scheduler_output, runner_output)

    def process_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestDelta]:
        """Feed sampled tokens back to the scheduler and build the per-request deltas."""
        self.scheduler.update_from_output(scheduler_output, runner_output)
        deltas = []
        for request_id, token_id in runner_output.sampled_token_ids.items():
            request = self.scheduler.get_request(request_id)
            if request is None or request.status is RequestStatus.FINISHED_ABORTED:
                continue
            logprobs = runner_output.logprobs.get(request_id)
            deltas.append(
                RequestDelta(
                    request_id=request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprobs] if logprobs is not None else None,
                    finish_reason=request.finish_reason,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    stop_token_id=request.stop_token_id,
                )
            )
        return deltas

    # -- what the worker roles use (loop thread only) ----------------------------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        lease_deadline: float,
        output_token_ids: list[int] | None = None,
    ) -> Request | None:
        """Decode role: allocate the blocks of the prompt (and of ``output_token_ids``, for a
        resumed request: see ``add_request``) for KV computed elsewhere, leased until
        ``lease_deadline`` (``time.monotonic()``). None when there is no room now. The
        returned request's ``block_ids`` / ``num_cached_tokens`` say where the KV goes."""
        request = self.make_request(
            request_id, prompt_token_ids, sampling_params, output_token_ids=output_token_ids
        )
        if not self.scheduler.reserve_request(request, lease_deadline):
            return None
        return request

    def is_reserved(self, request_id: str) -> bool:
        return request_id in self.scheduler.reserved

    def start_prefilled(self, request_id: str, first_token_id: int) -> RequestDelta | None:
        """Decode role: the reserved request's KV is in place; join the batch with the first
        token sampled elsewhere. Returns its final delta when that token already finished
        it; ``KeyError`` when it holds no reservation (expired, aborted, unknown)."""
        request = self.scheduler.reserved.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id!r} has no reservation")
        request.output_token_ids.append(first_token_id)
        if self.scheduler.add_prefilled_request(request):
            return None
        return RequestDelta(
            request_id=request_id,
            new_token_ids=[],
            new_logprobs=None,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            stop_token_id=request.stop_token_id,
        )

    def expire_reservations(self, now: float) -> list[str]:
        """Decode role: drop the reservations whose lease ended; their request ids."""
        return self.scheduler.expire_reservations(now)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy), in prompt-block order."""
        request = self.scheduler.get_request(request_id)
        if request is None:
            raise KeyError(f"no request {request_id!r}")
        return list(request.block_ids)

    def pin_blocks(self, block_ids: list[int]) -> None:
        """Keep blocks allocated after their request ends (a transfer still reads them)."""
        self.scheduler.kv_cache_manager.pin(block_ids)

    def unpin_blocks(self, block_ids: list[int]) -> None:
        self.scheduler.kv_cache_manager.unpin(block_ids)

    @property
    def kv_caches(self) -> list:
        """Per layer ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (the runner's)."""
        return self.runner.kv_caches

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
