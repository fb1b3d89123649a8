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
4. ``abort`` drops the request and its transfer at any point, even before ``prefill`` came
   in (Ray may start an async actor's calls out of order): the id is remembered and that
   prefill is refused. A layer the sender cannot take fails that request's transfer only;
   nothing a transfer does can stop the engine loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput
from engine.wire import EngineDeadError, PrefillResult, TransferStats
from engine.worker import EngineWorker
from kv_transfer.base import KVTransferConfig, ReceiverInfo, TransferResult, TransferTarget
from kv_transfer.transport import get_transport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBlockPlan:
    """What one engine step sends for one request, at every layer. Set by
    ``plan_step_blocks``."""

    src_block_ids: list[int]  # blocks here, complete after this step and not sent before
    dst_block_ids: list[int]  # the decode worker's blocks they go to, in the same order
    next_block: int  # prompt block index of the first block still unsent after this step
    pin_block_ids: list[int] | None  # on the last chunk: blocks to keep until acknowledged


def plan_step_blocks(
    block_ids: Sequence[int],
    target_block_ids: Sequence[int],
    num_skip_blocks: int,
    next_block: int,
    num_tokens: int,
    is_last_chunk: bool,
    block_size: int,
) -> StepBlockPlan:
    """Which blocks become complete in a step: the full ones, and on the last chunk the
    prompt's partial tail too.

    ``block_ids``: the request's block table here; ``target_block_ids``: the decode worker's
    blocks for prompt blocks ``num_skip_blocks`` onwards (the leading ones it already caches
    are never sent); ``next_block``: the first prompt block not sent yet; ``num_tokens``:
    the request's computed tokens once this step is done.
    """
    end = -(-num_tokens // block_size) if is_last_chunk else num_tokens // block_size
    start = next_block
    skip = num_skip_blocks
    return StepBlockPlan(
        src_block_ids=list(block_ids[start:end]),
        dst_block_ids=list(target_block_ids[start - skip : end - skip]),
        next_block=max(start, end),
        pin_block_ids=list(block_ids[skip:end]) if is_last_chunk else None,
    )


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
            self.engine.kv_caches, kv_config
        )
        self.num_layers = len(self.engine.kv_caches)
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
        output_token_ids: list[int] | None = None,
    ) -> PrefillResult:
        """Prefill, stream the KV to ``target`` and return the first token.

        ``target`` None: the decode worker already holds every block; nothing is sent.
        ``output_token_ids``: resuming a request, the tokens it already generated; they are
        prefilled after the prompt and the token returned is the one after them.
        """
        result: Future[TransferStats] = Future()
        self._results[request_id] = result
        transfer = None
        if target is not None:
            transfer = _Transfer(target, num_skip_blocks, next_block=num_skip_blocks)
        else:
            result.set_result(TransferStats(request_id, 0, 0.0))
        try:
            await self.run(lambda e: self._begin_transfer(request_id, transfer))
        except BaseException:
            self._results.pop(request_id, None)
            raise
        num_outputs = len(output_token_ids or ())
        params = replace(  # one token more than it has
            sampling_params,
            max_tokens=num_outputs + 1,
            min_tokens=min(num_outputs + 1, sampling_params.min_tokens),
        )
        try:
            stream = self.loop.generate(
                request_id, prompt_token_ids, params, output_token_ids=output_token_ids
            )
            async for delta in stream:
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
        # One loop-thread call drops the transfer here and in the sender, between steps, so
        # a step never sees one without the other. Shielded: once queued it runs even if
        # this caller is cancelled.
        try:
            await asyncio.shield(self.run(lambda e: self._drop_transfer(request_id)))
        except EngineDeadError:
            self.sender.abort(request_id)  # the loop is gone: the sender's threads are not
            raise
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
                try:
                    self.sender.send_layer(seq.request_id, layer, src, dst)
                except Exception as error:  # this request's transfer, never the loop
                    self._fail_transfer(seq.request_id, error)
                    continue
            if layer == self.num_layers - 1 and seq.sample:
                self._finish_transfer(seq.request_id, transfer)

    def _begin_transfer(self, request_id: str, transfer: _Transfer | None) -> None:
        self._refuse_if_aborted(request_id)
        if transfer is not None:
            self.sender.begin(transfer.target)
            self._transfers[request_id] = transfer

    def _plan_step(self, transfer: _Transfer, seq: ScheduledSequence) -> None:
        if not transfer.started:
            transfer.started = time.monotonic()
        block_ids = self.engine.block_ids(seq.request_id)
        plan = plan_step_blocks(
            block_ids,
            transfer.target.block_ids,
            transfer.num_skip_blocks,
            transfer.next_block,
            seq.start_position + seq.num_tokens,
            seq.sample,
            self.block_size,
        )
        transfer.step_blocks = (plan.src_block_ids, plan.dst_block_ids)
        transfer.next_block = plan.next_block
        transfer.num_blocks_sent += len(plan.src_block_ids)
        if plan.pin_block_ids is not None:
            # The request ends with this step, but the sender still reads its blocks.
            transfer.pinned = plan.pin_block_ids
            self.engine.pin_blocks(transfer.pinned)

    def _finish_transfer(self, request_id: str, transfer: _Transfer) -> None:
        del self._transfers[request_id]
        flushed = self.sender.flush(request_id)
        num_bytes = transfer.num_blocks_sent * self.sender.layout.block_nbytes * self.num_layers

        def on_flushed(done: Future[TransferResult]) -> None:
            self.loop.call(lambda e: e.unpin_blocks(transfer.pinned))
            error = done.exception()
            if error is not None:
                self._fail_result(request_id, error)
                return
            result = self._results.get(request_id)
            if result is not None and not result.done():
                seconds = time.monotonic() - transfer.started
                breakdown = done.result().breakdown
                result.set_result(TransferStats(request_id, num_bytes, seconds, breakdown))

        flushed.add_done_callback(on_flushed)

    def _drop_transfer(self, request_id: str) -> None:
        """Abort: the transfer goes, and the id is kept so a late ``prefill`` is refused."""
        self._release_transfer(request_id)
        self._mark_aborted(request_id)

    def _fail_transfer(self, request_id: str, error: Exception) -> None:
        self._release_transfer(request_id)
        self._fail_result(request_id, error)

    def _fail_result(self, request_id: str, error: BaseException) -> None:
        """``wait_transfer`` raises ``error`` (from any thread; the first outcome stands)."""
        result = self._results.get(request_id)
        if result is not None and not result.done():
            logger.warning("KV transfer of %s failed: %r", request_id, error)
            result.set_exception(error)

    def _release_transfer(self, request_id: str) -> None:
        transfer = self._transfers.pop(request_id, None)
        self.sender.abort(request_id)
        if transfer is not None and transfer.pinned:
            self.engine.unpin_blocks(transfer.pinned)

    def shutdown(self) -> None:
        super().shutdown()
        self.sender.close()
