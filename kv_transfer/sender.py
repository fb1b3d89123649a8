"""The prefill side of a KV transfer: a background thread that packs, checksums and streams.

``send_layer`` validates its arguments, records a CUDA event when the cache is on a GPU (so
the pack waits for the kernels that wrote the layer, not for the whole device) and enqueues a
job on the lane of the request's decode worker (its ``target.address``). Each lane is one
daemon thread with its own job queue and staging buffer, so one slow or stalled decode
worker (backpressure blocks its lane's ``write``) does not hold up transfers to the others.
A lane takes its jobs in order: for each chunk of ``chunk_bytes`` of the layer's
blocks it packs them into the lane's reused staging buffer (``pack_fn``: by default the Triton
kernel on CUDA, torch elsewhere; then a copy to pinned host memory on a GPU), checksums them
and writes them into the request's ``ChunkStream`` - the transport's part, opened on the first
chunk - which is done with the buffer when ``write`` returns. A stream applies backpressure
(bounded in-flight chunks), so memory stays bounded.

The first error of a request (from the pack, the wire or the receiver) is kept: the request's
later jobs are skipped and its ``flush`` future raises it. ``abort`` cancels the stream at
once, from the caller's thread. Per-request state lives from ``begin`` until its flush job ran
or ``abort``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from kv_transfer.base import (
    KVChunk,
    KVSender,
    KVTransferConfig,
    LayoutMismatchError,
    ReceiverInfo,
    TransferAbortedError,
    TransferBreakdown,
    TransferResult,
    TransferTarget,
)
from kv_transfer.faults import FaultInjector, corrupt_bytes
from kv_transfer.layout import (
    KVLayout,
    PackFn,
    block_checksums,
    checksum,
    pack_fns,
    payload_bytes,
)

logger = logging.getLogger(__name__)

_HEADER_ALLOWANCE = 64 << 10  # message bytes besides the payload: ids, names, shape


class ChunkStream(ABC):
    """One request's writes over one transport."""

    @abstractmethod
    def write(self, chunk: KVChunk) -> None:
        """Send one chunk. May block (backpressure); must not keep ``chunk.payload`` after
        returning. Raises the KVTransferError that ended the stream, if one did."""

    def write_blocks(
        self, chunk: KVChunk, src_block_ids: Sequence[int], *, corrupt: bool = False
    ) -> None:
        """One-sided transports: write ``src_block_ids`` of the local cache into
        ``chunk.block_ids`` of the remote one, and notify with ``chunk`` (no payload). May
        return before the bytes land; ``finish`` waits for them. ``corrupt`` (fault injection,
        ``kv_transfer.faults``): land one block's bytes altered, the source untouched."""
        raise NotImplementedError(f"{type(self).__name__} carries payloads")

    @abstractmethod
    def finish(self) -> Future[TransferResult]:
        """No more chunks; resolves when the receiver acknowledged the stream."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the stream now; a pending ``write`` or ``finish`` future raises."""


class StreamOpener(ABC):
    """A transport's sending half: opens request streams, owns connections."""

    transport: str  # the registry name; a target of another transport is refused
    # True: streams take ``write_blocks`` (no pack, no payload), e.g. NIXL WRITEs.
    one_sided: bool = False

    def connect(self, receiver: ReceiverInfo) -> None:
        """Pairing-time handshake (KVSender.connect); nothing by default."""
        return None

    @abstractmethod
    def open(self, target: TransferTarget) -> ChunkStream: ...

    @abstractmethod
    def close(self) -> None: ...


@dataclass
class _Lane:
    """The sending thread of one decode worker: its jobs, in order, and its staging."""

    staging: torch.Tensor  # [blocks_per_chunk, 2, block_size, H, D] on the cache's device
    host_staging: torch.Tensor | None  # pinned copy of it when the cache is on a GPU
    jobs: queue.SimpleQueue[_LayerJob | _FlushJob | None] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None


@dataclass
class _Outgoing:
    """A request being sent. Fields below ``lane`` are written by the lane's thread."""

    target: TransferTarget
    allowed_dst_ids: frozenset[int]
    lane: _Lane
    flushed: bool = False  # set by flush(): no more send_layer
    aborted: bool = False  # set by abort(), from any thread
    stream: ChunkStream | None = None
    error: BaseException | None = None
    num_chunks: int = 0
    corrupt: bool = False  # fault injection: the next chunk lands altered (then cleared)
    # time.monotonic() of: the first send_layer (caller's thread), the sender thread taking
    # its first layer, its first and its latest write (the breakdown of the transfer time).
    enqueued_at: float | None = None
    started_at: float | None = None
    first_write_at: float | None = None
    last_write_at: float | None = None


@dataclass(frozen=True)
class _LayerJob:
    outgoing: _Outgoing
    layer: int
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    ready: torch.cuda.Event | None  # recorded after the layer's KV was written (CUDA only)


@dataclass(frozen=True)
class _FlushJob:
    outgoing: _Outgoing
    future: Future[TransferResult]


class StreamingKVSender(KVSender):
    """``KVSender`` over any ``StreamOpener``; see the module docstring for the threading."""

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        opener: StreamOpener,
        *,
        pack_fn: PackFn | None = None,
    ) -> None:
        self.layout = KVLayout.from_kv_caches(kv_caches)
        if self.layout.block_nbytes + _HEADER_ALLOWANCE > config.max_message_bytes:
            raise ValueError(
                f"one block is {self.layout.block_nbytes} bytes: raise max_message_bytes "
                f"({config.max_message_bytes})"
            )
        self._kv_caches = list(kv_caches)
        self._num_blocks = int(kv_caches[0].shape[1])
        self._blocks_per_chunk = max(1, config.chunk_bytes // self.layout.block_nbytes)
        self._opener = opener
        self._faults = FaultInjector(config)
        self._pack_fn = pack_fn or pack_fns(kv_caches[0].device)[0]
        self._lock = threading.Lock()
        self._requests: dict[str, _Outgoing] = {}
        self._lanes: dict[str, _Lane] = {}  # decode worker address -> its lane
        self._closed = False

    def _lane(self, address: str) -> _Lane:
        """The lane of one decode worker, started on its first request (under the lock)."""
        lane = self._lanes.get(address)
        if lane is None:
            device = self._kv_caches[0].device
            one_sided = self._opener.one_sided  # writes from the cache itself: no staging
            staging_shape = self.layout.packed_shape(0 if one_sided else self._blocks_per_chunk)
            # One chunk's packed blocks, reused for every chunk (only the lane's thread
            # touches it); staged through pinned host memory when the cache is on a GPU.
            lane = _Lane(
                staging=torch.empty(staging_shape, dtype=self.layout.torch_dtype, device=device),
                host_staging=(
                    torch.empty(staging_shape, dtype=self.layout.torch_dtype, pin_memory=True)
                    if device.type != "cpu" and not one_sided
                    else None
                ),
            )
            lane.thread = threading.Thread(
                target=self._run, args=(lane,), name=f"kv-sender-{address}", daemon=True
            )
            lane.thread.start()
            self._lanes[address] = lane
        return lane

    def connect(self, receiver: ReceiverInfo) -> None:
        self._check_peer(receiver.transport, receiver.layout_signature, receiver.address)
        self._opener.connect(receiver)

    def _check_peer(self, transport: str, layout_signature: str, what: str) -> None:
        if transport != self._opener.transport:
            raise ValueError(
                f"{what} is for transport {transport!r}, this sender speaks "
                f"{self._opener.transport!r}"
            )
        if layout_signature != self.layout.signature:
            raise LayoutMismatchError(
                f"{what}: decode layout {layout_signature!r} != prefill layout "
                f"{self.layout.signature!r}"
            )

    def begin(self, target: TransferTarget) -> None:
        self._check_peer(
            target.transport, target.layout_signature, f"target of request {target.request_id!r}"
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("KV sender is closed")
            if target.request_id in self._requests:
                raise ValueError(f"transfer of request {target.request_id!r} already begun")
            lane = self._lane(target.address)
            self._requests[target.request_id] = _Outgoing(
                target,
                frozenset(target.block_ids),
                lane,
                corrupt=self._faults.pick(target.request_id),
            )

    def send_layer(
        self,
        request_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        outgoing = self._outgoing(request_id)
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} not in [0, {self.layout.num_layers})")
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(
                f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks"
            )
        bad_src = [b for b in src_block_ids if not 0 <= b < self._num_blocks]
        bad_dst = [b for b in dst_block_ids if b not in outgoing.allowed_dst_ids]
        if bad_src or bad_dst:
            raise ValueError(
                f"request {request_id!r}: source blocks {bad_src} outside the cache or "
                f"destination blocks {bad_dst} outside the target"
            )
        ready = None
        if self._kv_caches[layer].is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        if outgoing.enqueued_at is None:
            outgoing.enqueued_at = time.monotonic()
        job = _LayerJob(outgoing, layer, tuple(src_block_ids), tuple(dst_block_ids), ready)
        outgoing.lane.jobs.put(job)

    def flush(self, request_id: str) -> Future[TransferResult]:
        future: Future[TransferResult] = Future()
        with self._lock:
            outgoing = self._requests.get(request_id)
            if outgoing is not None and not outgoing.flushed:
                outgoing.flushed = True
                # Stays registered (so abort reaches it) until the receiver answered.
                future.add_done_callback(lambda _: self._forget(outgoing))
                outgoing.lane.jobs.put(_FlushJob(outgoing, future))
                return future
        future.set_exception(_not_in_progress(request_id))
        return future

    def abort(self, request_id: str) -> None:
        with self._lock:
            outgoing = self._requests.pop(request_id, None)
        if outgoing is not None:
            _abort(outgoing)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            outgoing, self._requests = list(self._requests.values()), {}
            lanes = list(self._lanes.values())
        for each in outgoing:
            _abort(each)
        for lane in lanes:
            lane.jobs.put(None)
        for lane in lanes:
            assert lane.thread is not None
            lane.thread.join()
        self._opener.close()

    def _outgoing(self, request_id: str) -> _Outgoing:
        with self._lock:
            outgoing = self._requests.get(request_id)
        if outgoing is None or outgoing.flushed:
            raise _not_in_progress(request_id)
        return outgoing

    def _forget(self, outgoing: _Outgoing) -> None:
        with self._lock:
            if self._requests.get(outgoing.target.request_id) is outgoing:
                del self._requests[outgoing.target.request_id]

    def _run(self, lane: _Lane) -> None:
        while (job := lane.jobs.get()) is not None:
            outgoing = job.outgoing
            try:
                if isinstance(job, _FlushJob):
                    self._finish(outgoing, job.future)
                elif not outgoing.aborted and outgoing.error is None:
                    if outgoing.started_at is None:
                        outgoing.started_at = time.monotonic()
                    self._send(job, lane)
            except BaseException as error:  # kept for the flush future, never dropped
                logger.warning("KV transfer of %s failed: %r", outgoing.target.request_id, error)
                outgoing.error = error
                if outgoing.stream is not None:
                    outgoing.stream.cancel()

    def _send(self, job: _LayerJob, lane: _Lane) -> None:
        outgoing, target = job.outgoing, job.outgoing.target
        if job.ready is not None:
            job.ready.synchronize()
        kv_layer = self._kv_caches[job.layer]
        if self._opener.one_sided:
            self._write_blocks(job)
            return
        for start in range(0, len(job.dst_block_ids), self._blocks_per_chunk):
            src_ids = job.src_block_ids[start : start + self._blocks_per_chunk]
            ids = torch.tensor(src_ids, dtype=torch.int64, device=kv_layer.device)
            packed = self._pack_fn(kv_layer, ids, lane.staging[: len(src_ids)])
            if lane.host_staging is not None:
                packed = lane.host_staging[: len(src_ids)].copy_(packed)
            payload = payload_bytes(packed)  # [n, 2, block_size, H, D] as bytes
            chunk = KVChunk(
                request_id=target.request_id,
                epoch=target.epoch,
                layer=job.layer,
                block_ids=job.dst_block_ids[start : start + self._blocks_per_chunk],
                layout_signature=self.layout.signature,
                dtype=self.layout.dtype,
                shape=tuple(packed.shape),
                payload=payload,
                checksum=checksum(payload),
            )
            if outgoing.corrupt:  # after the checksum: the bytes sent differ from the source
                corrupt_bytes(packed)
                outgoing.corrupt = False
            if outgoing.aborted:
                return
            if outgoing.stream is None:
                outgoing.stream = self._opener.open(target)
                if outgoing.aborted:  # abort() ran before the stream existed
                    outgoing.stream.cancel()
                    return
            outgoing.stream.write(chunk)  # done with the staging buffer when it returns
            _wrote(outgoing)

    def _write_blocks(self, job: _LayerJob) -> None:
        """One-sided: the layer's blocks go cache to cache; the notification carries checks."""
        outgoing, target = job.outgoing, job.outgoing.target
        chunk = KVChunk(
            request_id=target.request_id,
            epoch=target.epoch,
            layer=job.layer,
            block_ids=job.dst_block_ids,
            layout_signature=self.layout.signature,
            dtype=self.layout.dtype,
            shape=self.layout.packed_shape(len(job.dst_block_ids)),
            payload=None,
            checksum=0,
            block_checksums=tuple(block_checksums(self._kv_caches[job.layer], job.src_block_ids)),
        )
        if outgoing.aborted:
            return
        if outgoing.stream is None:
            outgoing.stream = self._opener.open(target)
            if outgoing.aborted:
                outgoing.stream.cancel()
                return
        outgoing.stream.write_blocks(chunk, job.src_block_ids, corrupt=outgoing.corrupt)
        outgoing.corrupt = False
        _wrote(outgoing)

    def _finish(self, outgoing: _Outgoing, future: Future[TransferResult]) -> None:
        target = outgoing.target
        if outgoing.aborted:
            future.set_exception(TransferAbortedError(f"{target.request_id!r} was aborted"))
        elif outgoing.error is not None:
            future.set_exception(outgoing.error)
        elif outgoing.stream is None:
            logger.warning("flush of %s with no block sent", target.request_id)
            future.set_result(TransferResult(target.request_id, target.epoch, 0, 0, False))
        else:
            _chain(outgoing.stream.finish(), future, outgoing)


def _wrote(outgoing: _Outgoing) -> None:
    outgoing.num_chunks += 1
    outgoing.last_write_at = time.monotonic()
    if outgoing.first_write_at is None:
        outgoing.first_write_at = outgoing.last_write_at


def _breakdown(outgoing: _Outgoing, result: TransferResult) -> TransferBreakdown | None:
    start = outgoing.enqueued_at
    if start is None or outgoing.first_write_at is None:
        return None
    return TransferBreakdown(
        queue_wait_s=(outgoing.started_at or start) - start,
        first_byte_s=outgoing.first_write_at - start,
        last_byte_s=(outgoing.last_write_at or outgoing.first_write_at) - start,
        acknowledged_s=time.monotonic() - start,
        verify_s=result.verify_s,
    )


def _abort(outgoing: _Outgoing) -> None:
    outgoing.aborted = True
    stream = outgoing.stream
    if stream is not None:
        stream.cancel()


def _chain(
    source: Future[TransferResult], target: Future[TransferResult], outgoing: _Outgoing
) -> None:
    def copy(done: Future[TransferResult]) -> None:
        error = done.exception()
        if error is not None:
            target.set_exception(error)
        else:
            result = done.result()
            target.set_result(replace(result, breakdown=_breakdown(outgoing, result)))

    source.add_done_callback(copy)


def _not_in_progress(request_id: str) -> TransferAbortedError:
    return TransferAbortedError(
        f"no transfer in progress for request {request_id!r} (never begun, flushed or aborted)"
    )
