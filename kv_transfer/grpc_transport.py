"""gRPC transport: ``num_streams`` client-streaming ``PushKV`` calls per request, ~1 MB messages.

Decode side: a ``grpc.server`` whose servicer translates each ``KVChunk`` message and calls
``KVReceiver.receive``; a ``KVTransferError`` ends the call with its status code (see
``proto/kv_transfer.proto``) and the error's class name in the trailing metadata, so the
sender raises the same class. Prefill side: ``num_streams`` channels (TCP connections) per
receiver address (HTTP/2 multiplexes the requests' calls on each); a request's chunks go
round-robin to one call per channel, so the receiver verifies and scatters them on several
threads; each call pulls messages from a bounded queue the sender thread fills, so at most
``max_inflight_chunks`` messages per request wait in memory.
The call's deadline is the reservation's lease. Messages cross gRPC as bytes encoded and
decoded by ``grpc_codec`` (one payload copy on the sender, none on the receiver).

Authentication (``kv_transfer.security``): with a cluster secret, each call's metadata names
its request and epoch and carries their HMAC; the servicer checks it before it reads a
message (``UNAUTHENTICATED`` otherwise) and refuses chunks of any other request, so a stream
without the secret never reaches the receiver, let alone the cache. TLS (``--kv-tls-*``):
the server presents its certificate, the sender checks it against the CA.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import torch

from kv_transfer import grpc_codec, security
from kv_transfer.base import (
    AuthenticationError,
    ChecksumError,
    InvalidChunkError,
    KVChunk,
    KVSender,
    KVTransferConfig,
    KVTransferError,
    LayoutMismatchError,
    StaleEpochError,
    TransferAbortedError,
    TransferFailedError,
    TransferResult,
    TransferTarget,
    TransportError,
    UnknownRequestError,
)
from kv_transfer.layout import PackFn, UnpackFn
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import ChunkStream, StreamingKVSender, StreamOpener
from kv_transfer.transport import Transport

logger = logging.getLogger(__name__)

_ERROR_KEY = "pdserve-kv-error"
_STATUS_CODES: dict[type[KVTransferError], grpc.StatusCode] = {
    UnknownRequestError: grpc.StatusCode.NOT_FOUND,
    StaleEpochError: grpc.StatusCode.FAILED_PRECONDITION,
    LayoutMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    ChecksumError: grpc.StatusCode.DATA_LOSS,
    InvalidChunkError: grpc.StatusCode.INVALID_ARGUMENT,
    TransferFailedError: grpc.StatusCode.ABORTED,
    TransferAbortedError: grpc.StatusCode.CANCELLED,
    TransportError: grpc.StatusCode.UNAVAILABLE,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
}
_ERRORS_BY_NAME = {cls.__name__: cls for cls in _STATUS_CODES}
_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]")
_POLL_S = 0.05  # how often a blocked queue put/get rechecks that the call is still alive
# Call metadata of an authenticated stream: its request (bytes: "-bin"), epoch and HMAC.
_AUTH_REQUEST_KEY = "pdserve-kv-request-bin"
_AUTH_EPOCH_KEY = "pdserve-kv-epoch"
_AUTH_KEY = "pdserve-kv-auth"
_AUTH_PURPOSE = "pdserve-kv-grpc-stream-v1"


def _options(config: KVTransferConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


def _stream_metadata(secret: bytes, target: TransferTarget) -> tuple[tuple[str, str | bytes], ...]:
    if not secret:
        return ()
    token = security.authenticator(secret, _AUTH_PURPOSE, target.request_id, target.epoch)
    return (
        (_AUTH_REQUEST_KEY, target.request_id.encode()),
        (_AUTH_EPOCH_KEY, str(target.epoch)),
        (_AUTH_KEY, token),
    )


def _authenticated_stream(secret: bytes, context: grpc.ServicerContext) -> tuple[str, int]:
    """The (request id, epoch) the call's metadata proves it may write; raises
    AuthenticationError for a missing or wrong authenticator."""
    metadata = dict(context.invocation_metadata() or ())
    token, raw_request, raw_epoch = (
        metadata.get(_AUTH_KEY),
        metadata.get(_AUTH_REQUEST_KEY),
        metadata.get(_AUTH_EPOCH_KEY),
    )
    if not (isinstance(token, str) and isinstance(raw_request, bytes) and raw_epoch):
        raise AuthenticationError(f"KV stream from {context.peer()} presents no authenticator")
    request_id, epoch = raw_request.decode(errors="replace"), int(str(raw_epoch))
    if not security.verify(secret, token, _AUTH_PURPOSE, request_id, epoch):
        raise AuthenticationError(
            f"KV stream from {context.peer()} for {request_id!r}: wrong authenticator "
            "(another cluster's secret?)"
        )
    return request_id, epoch


def _error_from_rpc(error: grpc.RpcError) -> KVTransferError:
    code = error.code()
    name = dict(error.trailing_metadata() or ()).get(_ERROR_KEY)
    default = TransferAbortedError if code == grpc.StatusCode.CANCELLED else TransportError
    return _ERRORS_BY_NAME.get(name, default)(f"{code.name}: {error.details()}")


class _KVTransferServicer:
    """Translates ``PushKV`` messages into ``KVReceiver.receive`` calls."""

    def __init__(self, receiver: KVReceiver, secret: bytes) -> None:
        self._receiver = receiver
        self._secret = secret

    def push_kv(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        first: KVChunk | None = None
        num_chunks = num_blocks = 0
        complete, verify_s = False, 0.0
        allowed: tuple[str, int] | None = None  # what the call's authenticator covers
        if self._secret:
            try:
                allowed = _authenticated_stream(self._secret, context)
            except (AuthenticationError, ValueError) as error:  # before reading any message
                logger.warning("refused KV stream: %s", error)
                context.set_trailing_metadata(((_ERROR_KEY, AuthenticationError.__name__),))
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        for raw in request_iterator:
            try:
                chunk = grpc_codec.decode_chunk(raw)
                if allowed is not None and (chunk.request_id, chunk.epoch) != allowed:
                    raise AuthenticationError(
                        f"stream authenticated for {allowed[0]!r} epoch {allowed[1]} carries "
                        f"{chunk.request_id!r} epoch {chunk.epoch}"
                    )
                if chunk.payload is None:
                    raise InvalidChunkError("a gRPC KVChunk must carry its blocks' payload")
                if first is None:
                    first = chunk
                if (chunk.request_id, chunk.epoch) != (first.request_id, first.epoch):
                    raise InvalidChunkError(
                        f"one call carries one request: got {chunk.request_id!r} epoch "
                        f"{chunk.epoch} after {first.request_id!r} epoch {first.epoch}"
                    )
                complete, seconds = self._receiver.receive_timed(chunk)
                verify_s += seconds
            except KVTransferError as error:
                context.set_trailing_metadata(((_ERROR_KEY, type(error).__name__),))
                context.abort(_STATUS_CODES[type(error)], str(error))
            num_chunks += 1
            num_blocks += len(chunk.block_ids)
        request_id, epoch = (first.request_id, first.epoch) if first else ("", 0)
        result = TransferResult(request_id, epoch, num_chunks, num_blocks, complete, verify_s)
        return grpc_codec.encode_ack(result)

    def handler(self) -> grpc.GenericRpcHandler:
        """Raw bytes in and out: the codec, not protobuf's (de)serializers, reads them."""
        push_kv = grpc.stream_unary_rpc_method_handler(self.push_kv)
        return grpc.method_handlers_generic_handler(
            grpc_codec.SERVICE_NAME, {grpc_codec.PUSH_KV: push_kv}
        )


def _node_address() -> str:
    """This node's address as Ray knows it (inside a Ray worker: the node IP the cluster uses;
    elsewhere: the address of the default route, or loopback when Ray is single-node)."""
    import ray.util

    return ray.util.get_node_ip_address()


class _GrpcEndpoint:
    transport = "grpc"
    metadata = b""

    def __init__(
        self,
        receiver: KVReceiver,
        address: str,
        advertise_host: str | None,
        config: KVTransferConfig,
    ) -> None:
        host, _, _ = address.rpartition(":")
        if host in _WILDCARD_HOSTS and not advertise_host:
            advertise_host = _node_address()  # what other nodes dial: the Ray node's address
        self._executor = ThreadPoolExecutor(config.num_server_threads, thread_name_prefix="kv-recv")
        self._server = grpc.server(self._executor, options=_options(config))
        servicer = _KVTransferServicer(receiver, config.secret)
        self._server.add_generic_rpc_handlers((servicer.handler(),))
        try:
            if config.tls:
                credentials = grpc.ssl_server_credentials(
                    [(_read(config.tls_key), _read(config.tls_cert))]
                )
                port = self._server.add_secure_port(address, credentials)
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise TransportError(f"cannot bind the KV receiver to {address!r}: {error}") from error
        self._server.start()
        self.address = f"{advertise_host or host}:{port}"
        logger.info(
            "KV receiver listening on %s (advertised %s; %s, %s)",
            address,
            self.address,
            "TLS" if config.tls else "plaintext",
            "authenticated streams" if config.secret else "UNAUTHENTICATED streams accepted",
        )

    def revoke(self, request_id: str) -> None:
        """Nothing to do: every later write of the request is refused in ``receive``."""

    def close(self) -> None:
        self._server.stop(grace=None).wait()
        self._executor.shutdown(wait=True)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TransportError(f"cannot read the KV TLS file {path!r}: {error}") from error


class _GrpcCall(ChunkStream):
    """One ``PushKV`` call: a bounded queue of encoded messages that gRPC's thread drains."""

    def __init__(
        self,
        push_kv: grpc.StreamUnaryMultiCallable,
        target: TransferTarget,
        max_inflight_chunks: int,
        metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        timeout = target.deadline - time.time()
        if timeout <= 0:
            raise TransportError(f"the lease of {target.request_id!r} ended before sending")
        self._target = target
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_inflight_chunks)
        self._closed = threading.Event()  # the call ended, or was cancelled
        self._call = push_kv.future(self._messages(), timeout=timeout, metadata=metadata)
        self._call.add_done_callback(lambda _: self._closed.set())

    def write(self, chunk: KVChunk) -> None:
        self._put(grpc_codec.encode_chunk(chunk))

    def finish(self) -> Future[TransferResult]:
        future: Future[TransferResult] = Future()
        try:
            self._put(None)
        except KVTransferError as error:
            future.set_exception(error)
            return future
        self._call.add_done_callback(lambda call: self._resolve(call, future))
        return future

    def cancel(self) -> None:
        self._closed.set()
        self._call.cancel()

    def _messages(self) -> Iterator[bytes]:
        """What gRPC's consumer thread sends; ends on finish, and when the call ends."""
        while not self._closed.is_set():
            try:
                message = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def _put(self, message: bytes | None) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise self._end_error()

    def _end_error(self) -> KVTransferError:
        if self._call.done() and not self._call.cancelled():
            error = self._call.exception()
            if error is not None:
                return _error_from_rpc(error)
        return TransferAbortedError(f"stream of {self._target.request_id!r} was cancelled")

    def _resolve(self, call: grpc.Future, future: Future[TransferResult]) -> None:
        if call.cancelled() or call.exception() is not None:
            future.set_exception(self._end_error())
            return
        future.set_result(call.result())


class _GrpcStream(ChunkStream):
    """A request's chunks spread round-robin over ``num_streams`` calls, one per connection,
    so encoding, HTTP/2 framing and the receiver's verification run in parallel."""

    def __init__(self, calls: list[_GrpcCall], target: TransferTarget) -> None:
        self._calls = calls
        self._target = target
        self._next = 0

    def write(self, chunk: KVChunk) -> None:
        call = self._calls[self._next]
        self._next = (self._next + 1) % len(self._calls)
        call.write(chunk)

    def finish(self) -> Future[TransferResult]:
        future: Future[TransferResult] = Future()
        parts = [call.finish() for call in self._calls]
        remaining = [len(parts)]
        lock = threading.Lock()

        def on_part(_: Future[TransferResult]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            errors = [p.exception() for p in parts if p.exception() is not None]
            if errors:
                future.set_exception(errors[0])
                return
            results = [p.result() for p in parts]
            future.set_result(
                TransferResult(
                    self._target.request_id,
                    self._target.epoch,
                    num_chunks=sum(r.num_chunks for r in results),
                    num_blocks=sum(r.num_blocks for r in results),
                    # The write that completed the reservation was some call's last one.
                    complete=any(r.complete for r in results),
                    verify_s=sum(r.verify_s for r in results),
                )
            )

        for part in parts:
            part.add_done_callback(on_part)
        return future

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()


class _GrpcOpener(StreamOpener):
    transport = "grpc"

    def __init__(self, config: KVTransferConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._push_kv: dict[str, list[grpc.StreamUnaryMultiCallable]] = {}

    def open(self, target: TransferTarget) -> ChunkStream:
        with self._lock:
            push_kv = self._push_kv.get(target.address)
            if push_kv is None:
                # One TCP connection per stream: a local subchannel pool keeps the channels
                # from sharing one.
                options = [*_options(self._config), ("grpc.use_local_subchannel_pool", 1)]
                channels = [
                    self._channel(target.address, options) for _ in range(self._config.num_streams)
                ]
                self._channels[target.address] = channels
                # Messages are encoded by the sender thread (grpc_codec): no serializer here.
                push_kv = self._push_kv[target.address] = [
                    channel.stream_unary(
                        grpc_codec.PUSH_KV_PATH, response_deserializer=grpc_codec.decode_ack
                    )
                    for channel in channels
                ]
        per_call = max(1, self._config.max_inflight_chunks // len(push_kv))
        metadata = _stream_metadata(self._config.secret, target)
        calls = [_GrpcCall(p, target, per_call, metadata) for p in push_kv]
        return calls[0] if len(calls) == 1 else _GrpcStream(calls, target)

    def _channel(self, address: str, options: list[tuple[str, int | str]]) -> grpc.Channel:
        config = self._config
        if not config.tls:
            return grpc.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(config.tls_ca))
        if config.tls_server_name:
            options = [*options, ("grpc.ssl_target_name_override", config.tls_server_name)]
        return grpc.secure_channel(address, credentials, options=options)

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._push_kv = list(self._channels.values()), {}, {}
        for channel in (c for per_address in channels for c in per_address):
            channel.close()


class GrpcTransport(Transport):
    name = "grpc"

    def create_sender(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        pack_fn: PackFn | None = None,
    ) -> KVSender:
        return StreamingKVSender(kv_caches, config, _GrpcOpener(config), pack_fn=pack_fn)

    def create_receiver(
        self,
        kv_caches: Sequence[torch.Tensor],  # per layer [2, num_blocks, block_size, H, D]
        config: KVTransferConfig,
        *,
        address: str = "127.0.0.1:0",
        advertise_host: str | None = None,
        unpack_fn: UnpackFn | None = None,
    ) -> KVReceiver:
        return KVReceiver(
            kv_caches,
            config,
            lambda receiver: _GrpcEndpoint(receiver, address, advertise_host, config),
            unpack_fn=unpack_fn,
        )
