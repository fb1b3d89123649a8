"""What crosses the boundary between the router and a worker (pure Python, no torch).

The router reaches a worker through a typed client (``router/backends/clients.py``); the
values those calls return, and the errors they raise, are defined here so the router can
unpickle and catch them without importing the engine. Each dataclass says who sets it.
``TransferTarget`` (the decode worker's answer to "where does the KV go") is the
``kv_transfer`` package's contract; the router passes it through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.scheduler_output import TokenLogprobs

if TYPE_CHECKING:
    from kv_transfer.base import TransferTarget


@dataclass(frozen=True)
class WorkerInfo:
    """Static facts the router needs from a worker, fetched once at start."""

    worker_id: str
    role: str  # "prefill" | "decode"
    model: str
    model_path: str
    max_model_len: int
    block_size: int
    vocab_size: int
    pid: int  # the worker's process
    node_id: str | None  # the Ray node it runs on; None outside Ray


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot for the router's policy and metrics. Set by the worker."""

    worker_id: str
    role: str  # "prefill" | "decode"
    num_waiting: int
    num_running: int
    num_reserved: int  # decode: requests whose KV is still arriving
    num_total_blocks: int
    num_free_blocks: int  # ref count 0, including evictable prefix-cache blocks
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int
    block_size: int
    uptime_s: float
    num_pinned_blocks: int = 0  # prefill: blocks held for a KV transfer still reading them


@dataclass(frozen=True)
class Reservation:
    """Set by ``DecodeWorker.reserve``: where and what the prefill worker sends."""

    target: TransferTarget | None  # None when every prompt block is already cached there
    num_skip_blocks: int  # leading prompt blocks already present there: not sent


@dataclass(frozen=True)
class PrefillResult:
    """Set by ``PrefillWorker.prefill``: the first token, sampled before the KV has landed."""

    request_id: str
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens the prefill worker served from its prefix cache


@dataclass(frozen=True)
class TransferBreakdown:
    """Where one request's transfer time went; each in seconds from its first layer handed
    to the sender (``send_layer``). Set by the KV sender; ``verify_s`` comes with the ack."""

    queue_wait_s: float  # until the sender thread took the first layer
    first_byte_s: float  # until the first write left (gRPC: to the call; NIXL: WRITE posted)
    last_byte_s: float  # until the last write left
    acknowledged_s: float  # until the receiver acknowledged every write
    verify_s: float  # receiver time spent checking checksums, summed over the writes


@dataclass(frozen=True)
class TransferStats:
    """Set by the prefill worker when a request's KV transfer is acknowledged."""

    request_id: str
    num_bytes: int
    seconds: float  # from the first layer handed to the sender to the acknowledgement
    breakdown: TransferBreakdown | None = None  # queue wait, first/last byte, verify


@dataclass(frozen=True)
class StreamError:
    """A request's stream failed on the worker; sent in place of its next delta."""

    request_id: str
    kind: str  # the exception's class name
    message: str

    @classmethod
    def of(cls, request_id: str, error: BaseException) -> StreamError:
        return cls(request_id, type(error).__name__, str(error))

    def to_exception(self) -> Exception:
        """The worker-side exception as the router handles it: the wire errors below and
        ``ValueError`` (bad input: HTTP 400) keep their class; anything else is a
        ``RuntimeError`` carrying the worker's message."""
        kinds = (NoCapacityError, KVTransferFailedError, EngineDeadError, ValueError)
        known = {c.__name__: c for c in kinds}
        if self.kind in known:
            return known[self.kind](self.message)
        return RuntimeError(f"{self.kind}: {self.message}")


class NoCapacityError(RuntimeError):
    """No free KV blocks for the request right now (the router retries or answers 429)."""


class EngineDeadError(RuntimeError):
    """The worker's engine loop died or was shut down: the worker serves nothing more; the
    router treats it as a dead worker (its requests migrate, it is replaced)."""


class KVTransferFailedError(RuntimeError):
    """The prompt's KV did not arrive intact or in time; the request cannot be decoded."""
