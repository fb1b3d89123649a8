"""What the scheduler hands the model runner for one step, and what comes back (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step. Set by the scheduler."""

    request_id: str
    token_ids: list[int]  # tokens whose KV this step computes: a prefill chunk, or the last token
    start_position: int  # the request's num_computed_tokens before this step
    # Block ids appended to the request's block table since the runner last saw it (all of
    # them for a request in ``new_requests``): the runner keeps the table between steps.
    new_block_ids: list[int]
    sample: bool  # True when this step reaches the last known token: the runner samples one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step. Decodes (one token each) come first, then prefill chunks."""

    sequences: list[ScheduledSequence]
    # Requests the runner has not seen, or sees again after preemption: it keeps per-request
    # sampling state (seeded generators) keyed by request_id until the request finishes.
    new_requests: list[Request] = field(default_factory=list)
    # Finished or aborted since the last step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Set by the model runner: one sampled token per sequence with ``sample=True``."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
