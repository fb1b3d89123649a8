"""The decode role: reserve blocks, receive the prompt's KV, decode with continuous batching.

Lifecycle of a disaggregated request on this worker:

1. ``reserve`` allocates blocks for the prompt (prefix-cache hits included: those blocks are
   not sent) and registers them with the KV receiver; it returns the ``TransferTarget`` the
   prefill worker writes into. No room: ``NoCapacityError`` (the router waits or refuses).
   The reservation carries a lease: if nobody calls ``decode`` in time, the housekeeping
   hook drops it and frees its blocks, so a dead router or prefill worker leaks nothing.
2. ``decode`` waits until every (layer, block) arrived and verified, then joins the request
   to the running batch with the first token the prefill worker sampled, and streams the
   following tokens. A failed or expired transfer ends the stream with an error.
3. ``abort`` works at any point; finished requests free their blocks into the prefix cache.

``generate_local`` serves a request entirely here (local prefill: conditional
disaggregation, and ``--colocated``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.worker import EngineWorker
from kv_transfer.base import KVTransferConfig, ReceiverInfo, TransferTarget
from kv_transfer.transport import get_transport

logger = logging.getLogger(__name__)


class NoCapacityError(RuntimeError):
    """No free KV blocks for the request right now (the router retries or answers 429)."""


class KVTransferFailedError(RuntimeError):
    """The prompt's KV did not arrive intact or in time; the request cannot be decoded."""


@dataclass(frozen=True)
class Reservation:
    """Set by ``DecodeWorker.reserve``: where and what the prefill worker sends."""

    target: TransferTarget | None  # None when every prompt block is already cached here
    num_skip_blocks: int  # leading prompt blocks already present here: not sent


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
            self.engine.runner.kv_caches,
            kv_config,
            address=address,
            advertise_host=kv_advertise_host,
        )
        self._lease_deadlines: dict[str, float] = {}  # loop thread only: reserved requests
        self.loop.start()

    # -- disaggregated path ------------------------------------------------------------

    async def kv_receiver_info(self) -> ReceiverInfo:
        """How prefill workers reach this worker's KV receiver (the router pairs them)."""
        return self.receiver.info()

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> Reservation:
        return await self.run(
            lambda e: self._reserve(e, request_id, prompt_token_ids, sampling_params)
        )

    def _reserve(
        self,
        engine: LLMEngine,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
    ) -> Reservation:
        request = engine.make_request(request_id, prompt_token_ids, sampling_params)
        if not engine.scheduler.reserve_request(request):
            raise NoCapacityError(
                f"decode worker {self.worker_id} has no room for {len(prompt_token_ids)} "
                f"prompt tokens ({engine.scheduler.kv_cache_manager.num_free_blocks} free "
                f"blocks of {self.block_size})"
            )
        self._lease_deadlines[request_id] = time.monotonic() + self.kv_config.lease_s
        num_skip_blocks = request.num_cached_tokens // self.block_size
        pending = request.block_ids[num_skip_blocks:]
        if not pending:
            return Reservation(target=None, num_skip_blocks=num_skip_blocks)
        try:
            target = self.receiver.expect(request_id, pending)
        except Exception:
            self._release(engine, request_id)
            raise
        return Reservation(target=target, num_skip_blocks=num_skip_blocks)

    async def decode(
        self,
        request_id: str,
        first_token_id: int,
        timeout_s: float | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Wait for the KV, then stream the tokens after ``first_token_id``."""
        stream = self.loop.open_stream(request_id)
        try:
            await self._wait_for_kv(request_id, timeout_s)
            finished = await self.run(lambda e: self._start_decode(e, request_id, first_token_id))
            if finished is not None:
                yield finished
                return
            async for delta in self.loop.stream_deltas(request_id, stream):
                yield delta
        finally:
            if self.loop.has_stream(request_id):
                await self.abort(request_id)

    async def _wait_for_kv(self, request_id: str, timeout_s: float | None) -> None:
        if self.receiver.status(request_id) is None and await self.run(
            lambda e: request_id in e.scheduler.reserved
        ):
            return  # nothing was sent: every block was cached here
        timeout_s = self.kv_config.lease_s if timeout_s is None else timeout_s
        try:
            complete = await asyncio.to_thread(self.receiver.wait_complete, request_id, timeout_s)
        except Exception as error:
            raise KVTransferFailedError(f"KV for {request_id!r} failed: {error}") from error
        if not complete:
            raise KVTransferFailedError(f"KV for {request_id!r} incomplete after {timeout_s}s")

    def _start_decode(
        self, engine: LLMEngine, request_id: str, first_token_id: int
    ) -> RequestDelta | None:
        """Join the running batch; a delta when the first token already finished it."""
        request: Request | None = engine.scheduler.reserved.get(request_id)
        if request is None:
            raise KVTransferFailedError(f"request {request_id!r} has no reservation any more")
        self.receiver.cancel(request_id)  # the blocks are ours now: no more writes
        self._lease_deadlines.pop(request_id, None)
        request.output_token_ids.append(first_token_id)
        if engine.scheduler.add_prefilled_request(request):
            return None
        return RequestDelta(
            request_id=request_id,
            new_token_ids=[],
            new_logprobs=None,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )

    # -- local path --------------------------------------------------------------------

    async def generate_local(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[RequestDelta]:
        async for delta in self.loop.generate(
            request_id, prompt_token_ids, sampling_params, priority
        ):
            yield delta

    # -- lifecycle ---------------------------------------------------------------------

    async def abort(self, request_id: str) -> None:
        await self.run(lambda e: self._release(e, request_id))
        await super().abort(request_id)

    def _release(self, engine: LLMEngine, request_id: str) -> None:
        self.receiver.cancel(request_id)
        self._lease_deadlines.pop(request_id, None)
        engine.abort_request(request_id)

    def _on_step(self, engine: LLMEngine) -> None:
        """Leases: a reservation nobody turned into a decode in time gives its blocks back."""
        if not self._lease_deadlines:
            return
        now = time.monotonic()
        for request_id, deadline in list(self._lease_deadlines.items()):
            if now > deadline:
                logger.warning("reservation of %s expired: freeing its blocks", request_id)
                self._release(engine, request_id)

    def shutdown(self) -> None:
        super().shutdown()
        self.receiver.close()
