"""What the engine returns: per-step deltas (online serving) and finished outputs (offline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import FinishReason
from engine.scheduler_output import TokenLogprobs


@dataclass(frozen=True)
class RequestDelta:
    """New tokens of one request from one engine step. Set by ``LLMEngine.step``."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None  # one per new token when logprobs were asked for
    finish_reason: FinishReason | None  # set on the request's last delta
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    stop_token_id: int | None = None  # on the last delta: the stop token (or EOS) that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by ``later`` of the same request, as one delta."""
        logprobs = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            logprobs = (self.new_logprobs or []) + (later.new_logprobs or [])
        return RequestDelta(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_logprobs=logprobs,
            finish_reason=later.finish_reason,
            num_prompt_tokens=later.num_prompt_tokens,
            num_cached_tokens=later.num_cached_tokens,
            stop_token_id=later.stop_token_id,
        )


@dataclass
class CompletionOutput:
    """One finished sequence, as in vLLM."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    """One finished prompt with its ``n`` completions, as returned by ``LLM.generate``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True
