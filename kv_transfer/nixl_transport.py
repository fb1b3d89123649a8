"""NIXL transport: one-sided WRITEs over UCX from the prefill cache into the decode cache.

Decode side: ``kv_transfer.nixl_receiver.NixlEndpoint`` (one agent, the whole KV cache
registered once at start, DRAM on CPU and VRAM on GPU; its ``NixlPeerInfo`` published as
``ReceiverInfo.metadata`` and ``TransferTarget.metadata``). Shared parts (the agent wrapper,
region descriptors, message kinds): ``kv_transfer.nixl_agent``.

Prefill side (``NixlOpener``, here): one agent with the prefill cache registered and one prepared
descriptor list over every (layer, K/V, block) region, made at start. Per decode worker (by
address), once: load its agent metadata, prepare the remote descriptor list, and handshake -
at pairing time (``KVSender.connect``), or at the first request if the router never paired
them. A target whose metadata names another agent at a known address (the decode worker
restarted) drops the stale agent and its descriptor list and handshakes again. Each layer job
is one WRITE: local (layer, K/V, src block) descriptors to remote (layer, K/V, dst block) ones,
merged by NIXL where consecutive, no pack and no staging copy, with the ``KVChunk`` (per-block
checksums, no payload) as the WRITE's notification, delivered after its bytes landed.

Messages (NIXL notifications, first byte the kind; KVChunk/KVAck encoded by ``grpc_codec``):

    P->D  H {metadata, layout}                 hello: D loads P's agent so it can answer
    D->P  h {error}                            hello answered; an error refuses the pairing
    P->D  G {request_id, epoch}                before a request's first WRITE: still live?
    D->P  g {request_id, epoch, error, message}  yes (no error), or the refusal
    P->D  C KVChunk without payload            the notification of one WRITE
    P->D  F {request_id, epoch, num_chunks}    the request's writes are all done
    D->P  A KVAck                              every write of the request verified
    D->P  E {request_id, epoch, error, message}  a write refused: the stream is fenced
    D->P  R {request_id, epoch}                the reservation was dropped (abort, lease)

Fencing (a one-sided WRITE cannot be refused by the target, so the writer is stopped
before it writes): a request's first WRITE waits for the decode side to confirm that its
reservation and epoch are live (``G``/``g``, one round trip on the sender thread, off the
compute path); a dropped reservation (``cancel`` before completion, ``expire``) sends ``R``
to its writer, a refused notification sends ``E``: either fences the stream (later writes
raise before posting, ``flush`` raises the receiver's error), and no write is posted after
the target's lease ended. A write is only recorded when its notification passes the
reservation table. What remains: WRITEs already posted when the reservation is dropped can
still land (bounded by ``max_inflight_chunks`` and one notification's latency; see README).

Authentication (``kv_transfer.security``), with a cluster secret: the decode worker's
``NixlPeerInfo`` carries an authenticator of its agent name, checked by the prefill side
before it handshakes (a clear ``AuthenticationError`` at pairing time when the secrets
differ); ``H`` and ``G`` carry authenticators of the prefill agent, which the decode side
checks before it loads the peer's metadata or grants a reservation; a peer that fails gets no
answer (its metadata is never loaded, so it cannot be answered), no grant, and its
notifications are dropped. One-sided WRITEs themselves cannot be authenticated: whoever holds
the decode worker's memory keys (its agent metadata) can write into its registered cache, so
the metadata must travel only over the control plane (see README "Security").

Threads: NIXL agents are not thread-safe by default; both agents here are created with
``NIXL_THREAD_SYNC_STRICT`` (NIXL serializes calls), because the sender thread posts writes,
a control thread handshakes and one poller thread per agent reads notifications. NIXL's own
progress thread is off (it spins); each poller polls every ``ACTIVE_POLL_S`` while transfers
are in flight (its calls progress UCX) and every ``IDLE_POLL_S`` otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from kv_transfer import grpc_codec, security
from kv_transfer.base import (
    AuthenticationError,
    KVChunk,
    KVSender,
    KVTransferConfig,
    KVTransferError,
    LayoutMismatchError,
    ReceiverInfo,
    TransferAbortedError,
    TransferResult,
    TransferTarget,
    TransportError,
    UnknownRequestError,
)
from kv_transfer.faults import corrupt_bytes
from kv_transfer.layout import PackFn, UnpackFn
from kv_transfer.nixl_agent import (
    ACK,
    ACTIVE_POLL_S,
    CHUNK,
    ERROR,
    ERRORS_BY_NAME,
    FINISH,
    GRANT,
    GRANT_REPLY,
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    HELLO_REPLY,
    IDLE_POLL_S,
    REVOKE,
    NixlAgent,
    NixlPeerInfo,
    encode_message,
    peer_name,
    region_indices,
)
from kv_transfer.nixl_receiver import NixlEndpoint
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import ChunkStream, StreamingKVSender, StreamOpener
from kv_transfer.transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class _Peer:
    """A decode worker's agent as this prefill worker knows it."""

    info: NixlPeerInfo
    remote_name: str
    remote_regions: object  # nixl_prepped_dlist_handle over every remote (layer, K/V, block)
    hello: Future[None] = field(default_factory=Future)  # resolved by the "h" reply


class _NixlStream(ChunkStream):
    def __init__(self, opener: NixlOpener, peer: _Peer, target: TransferTarget) -> None:
        self._opener = opener
        self._peer = peer
        self._target = target
        self.key = (peer.remote_name, target.request_id, target.epoch)
        self._handles: list = []  # posted WRITEs not yet seen DONE
        self.num_chunks = 0
        self.error: KVTransferError | None = None  # set by the poller on "E"
        self.cancelled = False
        self.future: Future[TransferResult] | None = None  # set by finish
        self.granted: Future[None] = Future()  # resolved by the "g" reply

    def write(self, chunk: KVChunk) -> None:
        raise TypeError("the nixl transport writes blocks in place: use write_blocks")

    def write_blocks(
        self, chunk: KVChunk, src_block_ids: Sequence[int], *, corrupt: bool = False
    ) -> None:
        self._check_live()
        if time.time() >= self._target.deadline:
            raise TransferAbortedError(
                f"lease of {self._target.request_id!r} ended: write of layer {chunk.layer} fenced"
            )
        if self.num_chunks == 0:
            self._wait_granted()
        opener = self._opener
        src = region_indices(chunk.layer, src_block_ids, opener.agent.num_blocks)
        dst = region_indices(chunk.layer, chunk.block_ids, self._peer.info.num_blocks)
        notification = CHUNK + grpc_codec.encode_chunk(chunk)
        if corrupt:  # fault injection: the first block's K lands from a flipped copy
            with opener.fault_lock:
                self._post(opener.local_regions, src[1:], dst[1:], b"")
                scratch = opener.fault_scratch(chunk.layer, src_block_ids[0])
                self._post(scratch, np.zeros(1, dtype=np.int32), dst[:1], notification)
                while not self.poll_writes():  # the scratch is reused: wait until it landed
                    time.sleep(ACTIVE_POLL_S)
        else:
            self._post(opener.local_regions, src, dst, notification)
        self.num_chunks += 1
        while len(self._handles) >= opener.max_inflight and not self.poll_writes():
            time.sleep(ACTIVE_POLL_S)  # backpressure: bounded posted WRITEs

    def _post(self, local, src: np.ndarray, dst: np.ndarray, notification: bytes) -> None:
        agent = self._opener.agent.agent
        handle = agent.make_prepped_xfer(
            "WRITE", local, src, self._peer.remote_regions, dst, notification
        )
        if agent.transfer(handle) == "ERR":
            handle.release()
            self._opener.drop_peer(self._peer)
            raise TransportError(f"NIXL WRITE to {self._peer.remote_name} failed")
        self._handles.append(handle)

    def poll_writes(self) -> bool:
        """Release finished WRITEs; True when none is left in flight. Raises on a failed one."""
        agent = self._opener.agent.agent
        pending, failed = [], False
        for handle in self._handles:
            state = agent.check_xfer_state(handle)
            if state == "PROC":
                pending.append(handle)
            else:
                failed = failed or state == "ERR"
                handle.release()
        self._handles = pending
        if failed:
            raise TransportError(f"NIXL WRITE to {self._peer.remote_name} failed")
        return not pending

    def finish(self) -> Future[TransferResult]:
        self.future = Future()
        self._opener.finishing(self)
        return self.future

    def cancel(self) -> None:
        self.cancelled = True
        self._opener.finished(self, TransferAbortedError(f"{self._target.request_id!r} aborted"))

    @property
    def deadline(self) -> float:
        return self._target.deadline

    def _wait_granted(self) -> None:
        """Ask the decode worker whether the reservation is live before the first WRITE."""
        request_id, epoch = self.key[1], self.key[2]
        opener = self._opener
        auth = opener.authenticator("grant", self._peer.remote_name, request_id, epoch)
        grant = encode_message(GRANT, request_id=request_id, epoch=epoch, auth=auth)
        self._opener.agent.agent.send_notif(self._peer.remote_name, grant)
        try:
            self.granted.result(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            raise TransportError(
                f"decode worker {self._peer.remote_name} did not confirm {request_id!r}"
            ) from None
        except KVTransferError as refused:
            self.error = refused
            raise

    def _check_live(self) -> None:
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise TransferAbortedError(f"stream of {self._target.request_id!r} was cancelled")


class NixlOpener(StreamOpener):
    transport = "nixl"
    one_sided = True

    def __init__(self, kv_caches: Sequence[torch.Tensor], config: KVTransferConfig) -> None:
        self.agent = NixlAgent(f"pdserve-prefill-{uuid.uuid4().hex[:12]}", kv_caches)
        self.max_inflight = config.max_inflight_chunks
        self._secret = config.secret
        self._kv_caches = list(kv_caches)
        self.fault_lock = threading.Lock()
        self._scratch: tuple[torch.Tensor, object, object] | None = None  # fault injection
        rows = self.agent.regions(
            self.agent.layer_addresses, self.agent.num_blocks, self.agent.device_id
        )
        self.local_regions = self.agent.agent.prep_xfer_dlist("", rows, self.agent.mem_type)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}  # by the decode worker's address
        self._streams: dict[tuple[str, str, int], _NixlStream] = {}  # begun, not acknowledged
        self._finishing: list[_NixlStream] = []  # F not sent yet: WRITEs in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-nixl-send", daemon=True)
        self._thread.start()

    def connect(self, receiver: ReceiverInfo) -> None:
        self._peer(receiver.address, receiver.metadata)

    def open(self, target: TransferTarget) -> ChunkStream:
        peer = self._peer(target.address, target.metadata)
        stream = _NixlStream(self, peer, target)
        with self._lock:
            self._streams[stream.key] = stream
        return stream

    def authenticator(self, purpose: str, receiver: str, *parts: str | int) -> str:
        """This prefill agent's authenticator of a message to ``receiver`` ("" without a
        secret); ``NixlEndpoint`` checks it."""
        if not self._secret:
            return ""
        name = self.agent.name
        return security.authenticator(self._secret, f"nixl-{purpose}", name, receiver, *parts)

    def _check_receiver(self, address: str, info: NixlPeerInfo) -> None:
        """Pair only with a decode worker that holds the same cluster secret."""
        if not self._secret and not info.auth:
            return
        if not self._secret:
            raise AuthenticationError(
                f"decode worker {address} requires the cluster's KV secret; this prefill "
                "worker has none (--kv-secret-file / $PDSERVE_KV_SECRET)"
            )
        if not security.verify(self._secret, info.auth, "nixl-receiver", info.agent_name):
            raise AuthenticationError(
                f"decode worker {address} ({info.agent_name}) does not hold this cluster's KV "
                "secret (its authenticator does not match): refusing to pair"
            )

    def fault_scratch(self, layer: int, src_block: int) -> object:
        """Fault injection: a registered one-region copy of (layer, K, ``src_block``) with one
        byte flipped; its prepared descriptor list. The cache itself is never touched."""
        if self._scratch is None:
            half = self.agent.layout.block_nbytes // 2
            scratch = torch.empty(half, dtype=torch.uint8, device=self._kv_caches[0].device)
            registered = self.agent.agent.register_memory([scratch])
            rows = np.array([[scratch.data_ptr(), half, self.agent.device_id]], dtype=np.int64)
            regions = self.agent.agent.prep_xfer_dlist("", rows, self.agent.mem_type)
            self._scratch = (scratch, registered, regions)
        scratch, _, regions = self._scratch
        scratch.copy_(self._kv_caches[layer][0, src_block].reshape(-1).view(torch.uint8))
        corrupt_bytes(scratch)
        return regions

    def _peer(self, address: str, metadata: bytes) -> _Peer:
        info = NixlPeerInfo.decode(metadata)
        self._check_receiver(address, info)
        with self._lock:
            peer = self._peers.get(address)
            stale = peer is not None and peer.info.agent_name != info.agent_name
            if stale:
                logger.warning(
                    "decode worker %s restarted (agent %s, was %s): handshaking again",
                    address,
                    info.agent_name,
                    peer.info.agent_name,
                )
                self._forget_locked(address, peer)
            if peer is None or stale:
                peer = self._handshake_locked(address, info)
        try:
            peer.hello.result(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            self.drop_peer(peer)
            raise TransportError(
                f"NIXL handshake with {address} ({info.agent_name}) got no answer in "
                f"{HANDSHAKE_TIMEOUT_S:.0f} s (unreachable, or it refused this worker's KV "
                "authenticator: see its log)"
            ) from None
        except KVTransferError:
            self.drop_peer(peer)
            raise
        return peer

    def _handshake_locked(self, address: str, info: NixlPeerInfo) -> _Peer:
        if info.layout_signature != self.agent.layout.signature:
            raise LayoutMismatchError(
                f"decode worker {address}: layout {info.layout_signature!r} != prefill layout "
                f"{self.agent.layout.signature!r}"
            )
        agent = self.agent.agent
        remote_name = peer_name(agent.add_remote_agent(info.agent_metadata))
        rows = self.agent.regions(info.layer_addresses, info.num_blocks, info.device_id)
        peer = _Peer(info, remote_name, agent.prep_xfer_dlist(remote_name, rows, info.mem_type))
        self._peers[address] = peer
        metadata = agent.get_agent_metadata().hex()
        auth = self.authenticator("hello", remote_name, metadata)
        hello = encode_message(
            HELLO, metadata=metadata, layout=self.agent.layout.signature, auth=auth
        )
        agent.send_notif(remote_name, hello)
        logger.info("NIXL handshake with decode worker %s (agent %s)", address, remote_name)
        return peer

    def drop_peer(self, peer: _Peer) -> None:
        with self._lock:
            for address, known in list(self._peers.items()):
                if known is peer:
                    self._forget_locked(address, peer)

    def _forget_locked(self, address: str, peer: _Peer) -> None:
        del self._peers[address]
        peer.remote_regions.release()
        self.agent.agent.remove_remote_agent(peer.remote_name)
        error = TransportError(f"decode worker {address} ({peer.remote_name}) went away")
        for stream in [s for s in self._streams.values() if s.key[0] == peer.remote_name]:
            stream.error = error
        if not peer.hello.done():
            peer.hello.set_exception(error)

    def finishing(self, stream: _NixlStream) -> None:
        with self._lock:
            self._finishing.append(stream)

    def finished(self, stream: _NixlStream, error: KVTransferError | None, result=None) -> None:
        """Resolve a stream's flush future once (poller thread, or cancel)."""
        with self._lock:
            self._streams.pop(stream.key, None)
        future = stream.future
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def close(self) -> None:
        if self._stop.is_set():
            return  # closed already
        self._stop.set()
        self._thread.join()
        with self._lock:
            for address, peer in list(self._peers.items()):
                self._forget_locked(address, peer)
        self.local_regions.release()
        if self._scratch is not None:
            _, registered, regions = self._scratch
            regions.release()
            self.agent.agent.deregister_memory(registered)
        self.agent.close()

    # -- poller thread ---------------------------------------------------------------------

    def _run(self) -> None:
        agent = self.agent.agent
        while not self._stop.is_set():
            notifications = agent.get_new_notifs()
            for sender, messages in notifications.items():
                for message in messages:
                    try:
                        self._handle(peer_name(sender), message)
                    except Exception:
                        logger.exception("NIXL notification from %s dropped", sender)
            busy = self._progress()
            if not notifications and not busy:
                with self._lock:
                    active = bool(self._streams)  # WRITEs may be in flight: keep UCX moving
                time.sleep(ACTIVE_POLL_S if active else IDLE_POLL_S)

    def _progress(self) -> bool:
        """Send F for finished streams whose WRITEs are done; time out overdue ones."""
        with self._lock:
            finishing = list(self._finishing)
        now = time.time()
        for stream in finishing:
            done = False
            try:
                if stream.error is not None or stream.cancelled:
                    done = True
                    self.finished(stream, stream.error)
                elif stream.poll_writes():
                    done = True
                    finish = encode_message(
                        FINISH,
                        request_id=stream.key[1],
                        epoch=stream.key[2],
                        num_chunks=stream.num_chunks,
                    )
                    self.agent.agent.send_notif(stream.key[0], finish)
            except KVTransferError as error:
                done = True
                self.finished(stream, error)
            if done:
                with self._lock:
                    self._finishing.remove(stream)
        with self._lock:
            overdue = [s for s in self._streams.values() if s.future and now > s.deadline]
        for stream in overdue:
            self.finished(stream, TransportError(f"no acknowledgement of {stream.key[1]!r}"))
        return bool(finishing)

    def _handle(self, sender: str, message: bytes) -> None:
        kind, body = message[:1], message[1:]
        if kind == HELLO_REPLY:
            with self._lock:
                peer = next((p for p in self._peers.values() if p.remote_name == sender), None)
            error = json.loads(body)["error"]
            if peer is not None and not peer.hello.done():
                if error:
                    peer.hello.set_exception(LayoutMismatchError(error))
                else:
                    peer.hello.set_result(None)
            return
        if kind in (GRANT_REPLY, REVOKE):
            fields = json.loads(body)
            with self._lock:
                stream = self._streams.get((sender, fields["request_id"], fields["epoch"]))
            if stream is None:
                return
            if kind == REVOKE:
                stream.error = UnknownRequestError(
                    f"decode worker dropped the reservation of {fields['request_id']!r}: "
                    "writes fenced"
                )
            elif fields["error"]:
                error_class = ERRORS_BY_NAME.get(fields["error"], TransportError)
                stream.granted.set_exception(error_class(fields["message"]))
            else:
                stream.granted.set_result(None)
            return
        if kind == ACK:
            result = grpc_codec.decode_ack(body)
            key, error = (sender, result.request_id, result.epoch), None
        elif kind == ERROR:
            fields = json.loads(body)
            key = (sender, fields["request_id"], fields["epoch"])
            error = ERRORS_BY_NAME.get(fields["error"], TransportError)(fields["message"])
            result = None
        else:
            logger.warning("unknown NIXL notification %r from %s", kind, sender)
            return
        with self._lock:
            stream = self._streams.get(key)
        if stream is None:
            return  # aborted meanwhile
        if error is not None:
            stream.error = error  # fences the stream: later writes raise it
        if stream.future is not None:
            self.finished(stream, error, result)


class NixlTransport(Transport):
    name = "nixl"

    def create_sender(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        pack_fn: PackFn | None = None,  # unused: blocks move in place
    ) -> KVSender:
        return StreamingKVSender(kv_caches, config, NixlOpener(kv_caches, config))

    def create_receiver(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        address: str = "",
        advertise_host: str | None = None,  # UCX publishes its own addresses in the metadata
        unpack_fn: UnpackFn | None = None,  # unused: blocks land in place
    ) -> KVReceiver:
        for i, layer in enumerate(kv_caches):
            if not layer.is_contiguous():
                raise ValueError(f"KV cache layer {i} must be contiguous to register with NIXL")
        return KVReceiver(
            kv_caches,
            config,
            lambda receiver: NixlEndpoint(receiver, kv_caches, address, config.secret),
        )
