"""The prefill role: chunked prefill that streams each finished layer's KV to a decode worker.

Lifecycle of one request on this worker:

1. ``prefill`` registers the transfer (``KVSender.begin``) and queues the request with
   ``max_tokens=1``.
2. Each engine step runs the request's next chunk. When layer ``l`` of the step has written
   its K/V, ``_on_layer`` hands the sender that layer's newly complete blocks (blocks the
   decode worker already caches are skipped); the sender packs and ships them on its own
   thread while the next layer computes. The last chunk also sends the prompt's partial
   tail block, and pins the request's blocks: the sender reads them after the request ends.
3. The first token is sampled and returned at once; the transfer may still be in flight.
   When the sender's flush resolves (the decode worker acknowledged every block), the blocks
   are unpinned and stay here only as evictable prefix cache.
4. ``abort`` drops the request and its transfer at any point.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput, TokenLogprobs
from engine.worker import EngineWorker
from kv_transfer.base import (
    KVTransferConfig,
    ReceiverInfo,
    TransferBreakdown,
    TransferResult,
    TransferTarget,
)
from kv_transfer.transport import get_transport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillResult:
    """Set by ``PrefillWorker.prefill``: the first token, sampled before the KV has landed."""

    request_id: str
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens this worker served from its own prefix cache


@dataclass(frozen=True)
class TransferStats:
    """Set when a request's KV transfer is acknowledged."""

    request_id: str
    num_bytes: int
    seconds: float  # from the first layer handed to the sender to the acknowledgement
    breakdown: TransferBreakdown | None = None  # queue wait, first/last byte, verify


@dataclass
class _Transfer:
    """Loop-thread state of one request's outgoing KV."""

    target: TransferTarget
    num_skip_blocks: int
    next_block: int  # prompt block index of the first block not yet sent
    started: float = 0.0
    step_blocks: tuple[list[int], list[int]] = ([], [])  # (src, dst) for the current step
    num_blocks_sent: int = 0
    pinned: list[int] = field(default_factory=list)
    done: asyncio.Future | None = None


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(
        self, worker_id: str, engine_config: EngineConfig, kv_config: KVTransferConfig
    ) -> None:
        super().__init__(worker_id, engine_config)
        self.kv_config = kv_config
        self.sender = get_transport(kv_config.transport).create_sender(
            self.engine.runner.kv_caches, kv_config
        )
        self.num_layers = self.engine.runner.geometry.num_layers
        self._transfers: dict[str, _Transfer] = {}  # loop thread only
        self._results: dict[str, Future[TransferStats]] = {}
        self.loop.start()

    async def connect_kv(self, receiver: ReceiverInfo) -> None:
        """Pairing: handshake with a decode worker's KV receiver before any request (NIXL)."""
        await asyncio.to_thread(self.sender.connect, receiver)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        target: TransferTarget | None,
        num_skip_blocks: int = 0,
    ) -> PrefillResult:
        """Prefill, stream the KV to ``target`` and return the first token.

        ``target`` None: the decode worker already holds every block; nothing is sent.
        """
        result: Future[TransferStats] = Future()
        self._results[request_id] = result
        if target is not None:
            self.sender.begin(target)
            transfer = _Transfer(target, num_skip_blocks, next_block=num_skip_blocks)
            await self.run(lambda e: self._transfers.__setitem__(request_id, transfer))
        else:
            result.set_result(TransferStats(request_id, 0, 0.0))
        params = replace(
            sampling_params, max_tokens=1, min_tokens=min(1, sampling_params.min_tokens)
        )
        try:
            async for delta in self.loop.generate(request_id, prompt_token_ids, params):
                if delta.new_token_ids:
                    return PrefillResult(
                        request_id=request_id,
                        first_token_id=delta.new_token_ids[0],
                        first_logprobs=delta.new_logprobs[0] if delta.new_logprobs else None,
                        num_prompt_tokens=delta.num_prompt_tokens,
                        num_cached_tokens=delta.num_cached_tokens,
                    )
            raise RuntimeError(f"prefill of {request_id!r} was aborted")
        except BaseException:
            await self.abort(request_id)
            raise

    async def wait_transfer(self, request_id: str, timeout_s: float | None = None) -> TransferStats:
        """Await the acknowledgement of a request's KV (raises the transfer's error)."""
        future = self._results.get(request_id)
        if future is None:
            raise KeyError(f"no transfer for request {request_id!r}")
        try:
            # Shielded: a timeout or a cancelled caller must not cancel the shared future,
            # which other waiters (the router's transfer metrics) and the flush still need.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        finally:
            if future.done():
                self._results.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        # The transfer leaves the loop thread before the sender drops it: a step in between
        # would send a layer the sender refuses, and an error in a layer hook kills the loop.
        try:
            await self.run(lambda e: self._drop_transfer(e, request_id))
        finally:
            self.sender.abort(request_id)
        await super().abort(request_id)
        future = self._results.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(RuntimeError(f"request {request_id!r} was aborted"))

    # -- loop thread -------------------------------------------------------------------

    def _on_layer(self, step: SchedulerOutput, layer: int) -> None:
        if not self._transfers:
            return
        for seq in step.sequences:
            transfer = self._transfers.get(seq.request_id)
            if transfer is None:
                continue
            if layer == 0:
                self._plan_step(transfer, seq)
            src, dst = transfer.step_blocks
            if src:
                self.sender.send_layer(seq.request_id, layer, src, dst)
            if layer == self.num_layers - 1 and seq.sample:
                self._finish_transfer(seq.request_id, transfer)

    def _plan_step(self, transfer: _Transfer, seq: ScheduledSequence) -> None:
        """Which blocks become complete in this step: full ones, and the tail at the end."""
        if not transfer.started:
            transfer.started = time.monotonic()
        num_tokens = seq.start_position + seq.num_tokens
        end = -(-num_tokens // self.block_size) if seq.sample else num_tokens // self.block_size
        start = transfer.next_block
        skip = transfer.num_skip_blocks
        transfer.step_blocks = (
            seq.block_ids[start:end],
            list(transfer.target.block_ids[start - skip : end - skip]),
        )
        transfer.next_block = max(start, end)
        transfer.num_blocks_sent += max(0, end - start)
        if seq.sample:
            # The request ends with this step, but the sender still reads its blocks.
            transfer.pinned = list(seq.block_ids[skip:end])
            self.engine.scheduler.kv_cache_manager.pin(transfer.pinned)

    def _finish_transfer(self, request_id: str, transfer: _Transfer) -> None:
        del self._transfers[request_id]
        flushed = self.sender.flush(request_id)
        num_bytes = transfer.num_blocks_sent * self.sender.layout.block_nbytes * self.num_layers

        def on_flushed(done: Future[TransferResult]) -> None:
            self.loop.call(lambda e: e.scheduler.kv_cache_manager.unpin(transfer.pinned))
            result = self._results.get(request_id)
            if result is None or result.done():
                return
            error = done.exception()
            if error is not None:
                logger.warning("KV transfer of %s failed: %s", request_id, error)
                result.set_exception(error)
            else:
                seconds = time.monotonic() - transfer.started
                breakdown = done.result().breakdown
                result.set_result(TransferStats(request_id, num_bytes, seconds, breakdown))

        flushed.add_done_callback(on_flushed)

    def _drop_transfer(self, engine: LLMEngine, request_id: str) -> None:
        transfer = self._transfers.pop(request_id, None)
        if transfer is not None and transfer.pinned:
            engine.scheduler.kv_cache_manager.unpin(transfer.pinned)

    def shutdown(self) -> None:
        super().shutdown()
        self.sender.close()
