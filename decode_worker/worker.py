"""The decode role: reserve blocks, receive the prompt's KV, decode with continuous batching.

Lifecycle of a disaggregated request on this worker:

1. ``reserve`` allocates blocks for the prompt (prefix-cache hits included: those blocks are
   not sent) and registers them with the KV receiver; it returns the ``TransferTarget`` the
   prefill worker writes into. No room: ``NoCapacityError`` (the router waits or refuses).
   The reservation carries the request's one lease, kept by the scheduler's reserved entry
   (``Request.lease_deadline``, ``time.monotonic()``): if nobody starts the decode and the
   KV does not land in time, the housekeeping hook expires it, cancels its receiver
   reservation and frees its blocks, so a dead router or prefill worker leaks nothing.
2. ``decode`` routes the request's deltas to the outbox and chains the start of decoding
   onto the receiver's completion future (resolved by the thread that records the last
   write; no thread or task waits per request). Once resolved, the request joins the
   running batch with the first token the prefill worker sampled. A failed or expired
   transfer ends the stream with ``KVTransferFailedError``.
3. ``abort`` works at any point; finished requests free their blocks into the prefix cache.
   A reservation dropped before its KV landed (abort, lease, failed transfer) may still
   receive a one-sided writer's posted WRITEs (NIXL): its blocks stay pinned until the
   receiver says no write can land any more (``CancelledReservation.safe``), so late bytes
   never reach a block reused by another request.

``generate`` serves a request entirely here (local prefill: conditional disaggregation, and
``--colocated``). Deltas of both leave through ``outputs``, batched per engine step.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.wire import KVTransferFailedError, NoCapacityError, Reservation
from engine.worker import EngineWorker
from kv_transfer.base import KVTransferConfig, ReceiverInfo, UnknownRequestError
from kv_transfer.transport import get_transport

logger = logging.getLogger(__name__)

__all__ = ["DecodeWorker", "KVTransferFailedError", "NoCapacityError", "Reservation"]


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        kv_config: KVTransferConfig,
        kv_host: str = "127.0.0.1",
        kv_advertise_host: str | None = None,
    ) -> None:
        super().__init__(worker_id, engine_config)
        self.kv_config = kv_config
        transport = get_transport(kv_config.transport)
        # The local transport's names are per process: unique, so two clusters can coexist.
        local_name = f"{worker_id}-{uuid.uuid4().hex[:8]}"
        address = f"{kv_host}:0" if kv_config.transport == "grpc" else local_name
        self.receiver = transport.create_receiver(
            self.engine.kv_caches,
            kv_config,
            address=address,
            advertise_host=kv_advertise_host,
        )
        self.loop.start()

    # -- disaggregated path ------------------------------------------------------------

    async def kv_receiver_info(self) -> ReceiverInfo:
        """How prefill workers reach this worker's KV receiver (the router pairs them)."""
        return self.receiver.info()

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
    ) -> Reservation:
        """Blocks for the KV of the prompt (and, resuming a request, of the tokens it already
        generated: ``output_token_ids``)."""
        return await self.run(
            lambda e: self._reserve(
                e, request_id, prompt_token_ids, sampling_params, output_token_ids
            )
        )

    def _reserve(
        self,
        engine: LLMEngine,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None,
    ) -> Reservation:
        self._refuse_if_aborted(request_id)
        lease_s = self.kv_config.lease_s
        request = engine.reserve(
            request_id,
            prompt_token_ids,
            sampling_params,
            time.monotonic() + lease_s,
            output_token_ids,
        )
        if request is None:
            stats = engine.stats()
            raise NoCapacityError(
                f"decode worker {self.worker_id} has no room for {len(prompt_token_ids)} "
                f"prompt tokens ({stats.num_free_blocks} free blocks of {self.block_size})"
            )
        num_skip_blocks = request.num_cached_tokens // self.block_size
        pending = request.block_ids[num_skip_blocks:]
        if not pending:
            return Reservation(target=None, num_skip_blocks=num_skip_blocks)
        try:
            # The receiver's copy of the lease only tells the sender when to give up.
            target = self.receiver.expect(request_id, pending, lease_s=lease_s)
        except Exception:
            engine.abort_request(request_id)
            raise
        return Reservation(target=target, num_skip_blocks=num_skip_blocks)

    async def decode(self, request_id: str, first_token_id: int) -> None:
        """Decode once the KV has landed, after ``first_token_id``; the deltas (or a
        ``KVTransferFailedError``) leave through ``outputs``."""
        self.loop.route(request_id)
        try:
            kv: Future[None] | None = self.receiver.completion(request_id)
        except UnknownRequestError:
            kv = None  # nothing was sent (all cached here), or the reservation is gone

        def start(done: Future[None] | None) -> None:
            self.loop.call(lambda e: self._start_decode(e, request_id, first_token_id, done))

        if kv is None:
            start(None)
        else:
            kv.add_done_callback(start)

    def _start_decode(
        self,
        engine: LLMEngine,
        request_id: str,
        first_token_id: int,
        kv: Future[None] | None,
    ) -> None:
        """Loop thread: join the running batch, or end the stream with the reason why not."""
        error = None if kv is None else kv.exception()
        if error is None and not engine.is_reserved(request_id):
            error = RuntimeError("it has no reservation (expired or aborted)")
        if error is not None:
            self._release(engine, request_id)
            self.loop.fail(
                request_id, KVTransferFailedError(f"KV for {request_id!r} failed: {error}")
            )
            return
        self.receiver.cancel(request_id)  # the blocks are ours now: no more writes
        finished = engine.start_prefilled(request_id, first_token_id)
        if finished is not None:  # the first token already ended it
            self.loop.deliver(finished)

    # -- local path --------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        output_token_ids: list[int] | None = None,
        priority: int = 0,
    ) -> None:
        """Prefill and decode here (a resumed request after its ``output_token_ids``); the
        deltas leave through ``outputs``. Bad input raises ``ValueError`` from this call."""
        self.loop.route(request_id)
        try:
            await self.run(
                lambda e: self._add_request(
                    e, request_id, prompt_token_ids, sampling_params, priority, output_token_ids
                )
            )
        except BaseException:
            self.loop.drop_route(request_id)
            raise

    def _add_request(
        self,
        engine: LLMEngine,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int,
        output_token_ids: list[int] | None,
    ) -> None:
        self._refuse_if_aborted(request_id)
        engine.add_request(
            request_id, prompt_token_ids, sampling_params, priority, output_token_ids
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def abort(self, request_id: str) -> None:
        """The one abort on this side: the route, the receiver's reservation, the engine;
        a reserve or generate of the id that arrives later is refused."""
        self.loop.drop_route(request_id)
        await self.run(lambda e: self._abort(e, request_id))

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        self._release(engine, request_id)
        self._mark_aborted(request_id)

    def _release(self, engine: LLMEngine, request_id: str) -> None:
        self._cancel_kv(engine, request_id)
        engine.abort_request(request_id)

    def _cancel_kv(self, engine: LLMEngine, request_id: str) -> None:
        """Loop thread: drop the receiver's reservation; blocks a writer may still reach stay
        pinned (out of the free pool) until the receiver says they are safe."""
        cancelled = self.receiver.cancel(request_id)
        if cancelled is None or not cancelled.quarantined:
            return
        block_ids = list(cancelled.block_ids)
        engine.pin_blocks(block_ids)
        logger.info("blocks of %s quarantined until its writer stops", request_id)
        cancelled.safe.add_done_callback(
            lambda _: self.loop.call(lambda e: e.unpin_blocks(block_ids))
        )

    def _on_step(self, engine: LLMEngine) -> None:
        """The lease: reservations nobody turned into a decode in time give their blocks
        back; a decode still waiting for their KV gets ``KVTransferFailedError``."""
        for request_id in engine.expire_reservations(time.monotonic()):
            logger.warning("reservation of %s expired: freeing its blocks", request_id)
            # Same loop thread as the expiry, nothing allocated in between: blocks a
            # writer may still reach are pinned again before anyone can take them.
            self._cancel_kv(engine, request_id)  # resolves a waiting decode's future

    def shutdown(self) -> None:
        super().shutdown()
        self.receiver.close()
