"""Sender -> receiver over each transport (real gRPC on 127.0.0.1, real NIXL over UCX
between two agents in this process, and in-process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kv_transfer import KVTransferConfig, TransferStatus, get_transport
from kv_transfer import transport as transport_module
from kv_transfer.base import (
    LayoutMismatchError,
    StaleEpochError,
    TransferAbortedError,
    TransferFailedError,
    UnknownRequestError,
)
from kv_transfer.layout import (
    KVLayout,
    cache_layer_shape,
    gather_blocks,
    pack_fns,
    scatter_blocks,
)
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import StreamingKVSender

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

TRANSPORTS = ["grpc", "local", "nixl"]
# The transports that pack blocks into messages (nixl moves them cache to cache: no
# pack_fn/unpack_fn step to hold or hook into, so these tests do not apply to it).
NO_PACK_HOOKS = pytest.mark.parametrize("transport", [t for t in TRANSPORTS if t != "nixl"])
WAIT_S = 10.0
# Small chunks, so a layer of a few blocks already takes several messages.
CONFIG = KVTransferConfig(chunk_bytes=1024)


def _caches(layout: KVLayout, num_blocks: int, fill: bool) -> list[torch.Tensor]:
    shape = cache_layer_shape(layout, num_blocks)
    generator = torch.Generator().manual_seed(layout.num_layers * 7 + num_blocks)
    if not fill:
        return [torch.zeros(shape, dtype=layout.torch_dtype) for _ in range(layout.num_layers)]
    return [
        torch.randn(shape, generator=generator).to(layout.torch_dtype)
        for _ in range(layout.num_layers)
    ]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def _receiver(transport: str, caches: list[torch.Tensor], **kwargs) -> KVReceiver:
    address = "127.0.0.1:0" if transport == "grpc" else ""
    return get_transport(transport).create_receiver(caches, CONFIG, address=address, **kwargs)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def pair(transport: str) -> Iterator[tuple[StreamingKVSender, KVReceiver, list, list]]:
    layout = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src, dst = _caches(layout, 10, fill=True), _caches(layout, 12, fill=False)
    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG)
    yield sender, receiver, src, dst
    sender.close()
    receiver.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_layer_lands_bitwise_in_other_block_ids(transport: str, dtype: str) -> None:
    layout = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    src, dst = _caches(layout, 10, fill=True), _caches(layout, 12, fill=False)
    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG)
    try:
        src_ids, dst_ids = [7, 2, 9, 0, 4], [11, 3, 5, 6, 1]
        target = receiver.expect("req-1", dst_ids)
        assert target.transport == transport and target.block_ids == tuple(dst_ids)
        sender.begin(target)
        for layer in range(layout.num_layers):
            sender.send_layer("req-1", layer, src_ids[:3], dst_ids[:3])  # first chunk
            sender.send_layer("req-1", layer, src_ids[3:], dst_ids[3:])  # second chunk
        result = sender.flush("req-1").result(WAIT_S)
        assert result.complete and result.num_blocks == 3 * 5
        assert result.epoch == target.epoch
        assert receiver.wait_complete("req-1", WAIT_S)
        for layer in range(layout.num_layers):
            for s, d in zip(src_ids, dst_ids, strict=True):
                assert torch.equal(_bits(dst[layer][:, d]), _bits(src[layer][:, s]))
        untouched = [b for b in range(12) if b not in dst_ids]
        assert all(not dst[layer][:, untouched].any() for layer in range(layout.num_layers))
    finally:
        sender.close()
        receiver.close()


def test_flush_reports_where_the_time_went(pair) -> None:
    sender, receiver, _, _ = pair
    sender.begin(receiver.expect("r", [1, 2]))
    for layer in range(3):
        sender.send_layer("r", layer, [0, 1], [1, 2])
    result = sender.flush("r").result(WAIT_S)
    b = result.breakdown
    assert b is not None and result.verify_s == b.verify_s > 0
    assert 0 <= b.queue_wait_s <= b.first_byte_s <= b.last_byte_s <= b.acknowledged_s < WAIT_S


def test_missing_block_is_not_complete_and_wait_times_out(pair) -> None:
    sender, receiver, _, _ = pair
    target = receiver.expect("r", [1, 2])
    sender.begin(target)
    for layer in range(3):
        sender.send_layer("r", layer, [0], [1])
    sender.send_layer("r", 0, [1], [2])  # block 2 of layers 1 and 2 never sent
    result = sender.flush("r").result(WAIT_S)
    assert not result.complete and result.num_blocks == 4
    assert not receiver.is_complete("r")
    assert receiver.status("r") is TransferStatus.RECEIVING
    assert receiver.wait_complete("r", timeout=0.1) is False


def test_stale_epoch_is_rejected_and_the_new_reservation_stays(pair) -> None:
    sender, receiver, src, dst = pair
    old = receiver.expect("r", [4])
    assert receiver.cancel("r")
    new = receiver.expect("r", [4])
    assert new.epoch != old.epoch
    sender.begin(old)
    sender.send_layer("r", 0, [3], [4])
    with pytest.raises(StaleEpochError):
        sender.flush("r").result(WAIT_S)
    assert receiver.status("r") is TransferStatus.RECEIVING
    assert not dst[0][:, 4].any()

    sender.begin(new)
    for layer in range(3):
        sender.send_layer("r", layer, [3], [4])
    assert sender.flush("r").result(WAIT_S).complete
    assert torch.equal(dst[2][:, 4], src[2][:, 3])


def test_cancel_frees_the_reservation_and_later_writes_fail(pair) -> None:
    sender, receiver, _, dst = pair
    target = receiver.expect("r", [5, 6])
    assert receiver.num_reservations == 1
    assert receiver.cancel("r")
    assert receiver.num_reservations == 0 and receiver.status("r") is None
    with pytest.raises(UnknownRequestError):
        receiver.wait_complete("r", 0.1)
    sender.begin(target)
    sender.send_layer("r", 0, [0, 1], [5, 6])
    with pytest.raises(UnknownRequestError):
        sender.flush("r").result(WAIT_S)
    assert not dst[0][:, [5, 6]].any()


def test_expired_lease_drops_the_reservation(pair) -> None:
    sender, receiver, _, _ = pair
    receiver.expect("young", [1], lease_s=1000.0)
    receiver.expect("old", [2], lease_s=30.0)
    target = receiver.expect("done", [3], lease_s=30.0)
    sender.begin(target)
    for layer in range(3):
        sender.send_layer("done", layer, [0], [3])
    assert sender.flush("done").result(WAIT_S).complete
    assert receiver.expire(now=time.monotonic() + 60.0) == ["old"]
    assert receiver.status("old") is None
    assert receiver.is_complete("done") and receiver.status("young") is TransferStatus.RECEIVING


def test_layout_mismatch_is_refused_before_sending(transport: str) -> None:
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")
    other = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    receiver = _receiver(transport, _caches(other, 4, fill=False))
    sender = get_transport(transport).create_sender(_caches(layout, 4, fill=True), CONFIG)
    try:
        with pytest.raises(LayoutMismatchError):
            sender.begin(receiver.expect("r", [0]))
        with pytest.raises(TransferAbortedError):
            sender.send_layer("r", 0, [0], [0])  # never begun
    finally:
        sender.close()
        receiver.close()


def test_send_layer_checks_its_arguments(pair) -> None:
    sender, receiver, _, _ = pair
    sender.begin(receiver.expect("r", [1, 2]))
    with pytest.raises(ValueError, match="outside the target"):
        sender.send_layer("r", 0, [0], [3])
    with pytest.raises(ValueError, match="outside the cache"):
        sender.send_layer("r", 0, [10], [1])
    with pytest.raises(ValueError, match="layer 3"):
        sender.send_layer("r", 3, [0], [1])
    with pytest.raises(ValueError, match="2 source blocks for 1"):
        sender.send_layer("r", 0, [0, 1], [1])
    sender.abort("r")
    with pytest.raises(TransferAbortedError):
        sender.flush("r").result(WAIT_S)


@NO_PACK_HOOKS
def test_send_layer_returns_before_any_byte_is_sent(transport: str) -> None:
    layout = KVLayout(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src, dst = _caches(layout, 6, fill=True), _caches(layout, 6, fill=False)
    release, packing = threading.Event(), threading.Event()

    def held_pack(kv_layer, block_ids, out=None):  # the sender thread waits on the test
        packing.set()
        assert release.wait(WAIT_S)
        return gather_blocks(kv_layer, block_ids, out)

    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG, pack_fn=held_pack)
    try:
        sender.begin(receiver.expect("r", [0, 1]))
        for layer in range(layout.num_layers):  # "compute" keeps going while nothing is sent
            sender.send_layer("r", layer, [2, 3], [0, 1])
        assert packing.wait(WAIT_S)  # the sender thread took the first job and is held
        assert receiver.status("r") is TransferStatus.RECEIVING
        assert all(not layer.any() for layer in dst)
        release.set()
        assert sender.flush("r").result(WAIT_S).complete
        assert torch.equal(dst[3][:, 1], src[3][:, 3])
    finally:
        release.set()
        sender.close()
        receiver.close()


@NO_PACK_HOOKS
def test_layers_land_while_later_layers_are_still_computed(transport: str) -> None:
    layout = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")
    src, dst = _caches(layout, 4, fill=True), _caches(layout, 4, fill=False)
    landed = [threading.Event() for _ in range(layout.num_layers)]
    layer_of = {id(t): i for i, t in enumerate(dst)}

    def signalling_unpack(packed, kv_layer, block_ids):
        scatter_blocks(packed, kv_layer, block_ids)
        landed[layer_of[id(kv_layer)]].set()

    receiver = _receiver(transport, dst, unpack_fn=signalling_unpack)
    sender = get_transport(transport).create_sender(src, CONFIG)
    try:
        sender.begin(receiver.expect("r", [2, 3]))
        for layer in range(layout.num_layers):
            sender.send_layer("r", layer, [0, 1], [2, 3])
            # Layer l is in the decode cache before layer l + 1 is computed; no flush yet.
            assert landed[layer].wait(WAIT_S)
            assert torch.equal(dst[layer][:, 2:], src[layer][:, :2])
        assert sender.flush("r").result(WAIT_S).complete
    finally:
        sender.close()
        receiver.close()


@NO_PACK_HOOKS
def test_a_failing_pack_surfaces_from_flush(transport: str) -> None:
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")

    def broken_pack(kv_layer, block_ids, out=None):
        raise RuntimeError("pack kernel exploded")

    receiver = _receiver(transport, _caches(layout, 4, fill=False))
    sender = get_transport(transport).create_sender(
        _caches(layout, 4, fill=True), CONFIG, pack_fn=broken_pack
    )
    try:
        sender.begin(receiver.expect("r", [0]))
        sender.send_layer("r", 0, [1], [0])
        with pytest.raises(RuntimeError, match="exploded"):
            sender.flush("r").result(WAIT_S)
    finally:
        sender.close()
        receiver.close()


def test_wait_complete_raises_for_a_failed_transfer(pair) -> None:
    sender, receiver, _, _ = pair
    sender.begin(receiver.expect("r", [1, 2]))
    sender.send_layer("r", 0, [0], [1])
    sender.send_layer("r", 0, [0], [1])  # the same (layer, block) twice: a sender bug
    with pytest.raises(Exception, match="twice"):
        sender.flush("r").result(WAIT_S)
    assert receiver.status("r") is TransferStatus.FAILED
    with pytest.raises(TransferFailedError, match="twice"):
        receiver.wait_complete("r", WAIT_S)


def test_transport_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [get_transport(name).name for name in TRANSPORTS] == TRANSPORTS
    with pytest.raises(ValueError, match="unknown KV transport"):
        get_transport("carrier-pigeon")
    monkeypatch.setitem(transport_module._TRANSPORTS, "rdma", "kv_transfer.no_such:Transport")
    with pytest.raises(ValueError, match="'rdma' is not available"):
        get_transport("rdma")


def test_interleaved_requests_share_one_sender(transport: str) -> None:
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    src, dst = _caches(layout, 8, fill=True), _caches(layout, 8, fill=False)
    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG)
    try:
        sender.begin(receiver.expect("a", [0, 1, 2]))
        sender.begin(receiver.expect("b", [5, 6]))
        for layer in range(layout.num_layers):
            sender.send_layer("a", layer, [7, 6, 5], [0, 1, 2])
            sender.send_layer("b", layer, [0, 1], [5, 6])
        futures = [sender.flush("b"), sender.flush("a")]
        assert all(f.result(WAIT_S).complete for f in futures)
        for layer in range(layout.num_layers):
            assert torch.equal(_bits(dst[layer][:, :3]), _bits(src[layer][:, [7, 6, 5]]))
            assert torch.equal(_bits(dst[layer][:, 5:7]), _bits(src[layer][:, :2]))
    finally:
        sender.close()
        receiver.close()


@NO_PACK_HOOKS
def test_abort_mid_stream(transport: str) -> None:
    layout = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    src, dst = _caches(layout, 4, fill=True), _caches(layout, 4, fill=False)
    release, holding = threading.Event(), threading.Event()
    calls = []

    def pack_holding_layer_1(kv_layer, block_ids, out=None):
        calls.append(kv_layer)
        if len(calls) == 2:
            holding.set()
            assert release.wait(WAIT_S)
        return gather_blocks(kv_layer, block_ids, out)

    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG, pack_fn=pack_holding_layer_1)
    try:
        sender.begin(receiver.expect("r", [2, 3]))
        for layer in range(layout.num_layers):
            sender.send_layer("r", layer, [0, 1], [2, 3])
        future = sender.flush("r")
        assert holding.wait(WAIT_S)
        sender.abort("r")  # layer 0 is sent, layer 1 is being packed
        release.set()
        with pytest.raises(TransferAbortedError):
            future.result(WAIT_S)
        assert len(calls) == 2  # layer 2 was never packed
        assert not dst[2].any()
        assert not receiver.is_complete("r")
    finally:
        release.set()
        sender.close()
        receiver.close()


def test_close_fails_what_is_in_flight(pair) -> None:
    sender, receiver, _, _ = pair
    sender.begin(receiver.expect("r", [1]))
    sender.send_layer("r", 0, [0], [1])
    future = sender.flush("r")
    sender.close()
    # Either the receiver acknowledged before close, or the flush raises: never left pending.
    assert future.done() or future.exception(WAIT_S) is not None
    with pytest.raises(RuntimeError, match="closed"):
        sender.begin(receiver.expect("s", [2]))


def test_the_triton_pack_kernels_plug_in() -> None:
    """kv_pack / kv_unpack have the PackFn / UnpackFn signatures. In-process only: on CPU the
    Triton interpreter is not thread-safe, and over grpc pack and unpack run concurrently."""
    from engine.kernels.kv_pack import kv_pack, kv_unpack

    transport = "local"
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")
    src, dst = _caches(layout, 5, fill=True), _caches(layout, 5, fill=False)
    receiver = _receiver(transport, dst, unpack_fn=kv_unpack)
    sender = get_transport(transport).create_sender(src, CONFIG, pack_fn=kv_pack)
    try:
        sender.begin(receiver.expect("r", [4, 0]))
        for layer in range(layout.num_layers):
            sender.send_layer("r", layer, [1, 3], [4, 0])
        assert sender.flush("r").result(WAIT_S).complete
        for layer in range(layout.num_layers):
            assert torch.equal(dst[layer][:, [4, 0]], src[layer][:, [1, 3]])
    finally:
        sender.close()
        receiver.close()


@pytest.mark.gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cuda_caches_with_the_default_kernels(transport: str) -> None:
    layout = KVLayout(num_layers=4, block_size=16, num_kv_heads=4, head_dim=64, dtype="bfloat16")
    src = [t.cuda() for t in _caches(layout, 64, fill=True)]
    dst = [t.cuda() for t in _caches(layout, 64, fill=False)]
    receiver = _receiver(transport, dst)
    sender = get_transport(transport).create_sender(src, CONFIG)
    try:
        src_ids, dst_ids = list(range(0, 40, 2)), list(range(63, 43, -1))
        sender.begin(receiver.expect("r", dst_ids))
        for layer in range(layout.num_layers):
            src[layer][:, src_ids] += 1.0  # "compute" on the default stream, then send
            sender.send_layer("r", layer, src_ids, dst_ids)
        assert sender.flush("r").result(WAIT_S).complete
        for layer in range(layout.num_layers):
            assert torch.equal(_bits(dst[layer][:, dst_ids]), _bits(src[layer][:, src_ids]))
    finally:
        sender.close()
        receiver.close()


@NO_PACK_HOOKS  # the stall is made in the receiver's unpack step
def test_a_stalled_decode_worker_does_not_hold_up_the_others(transport: str) -> None:
    """Each decode worker has its own sending lane: while one receiver cannot take writes
    (its sender's stream is blocked on backpressure), another request's KV still goes out."""
    # 32 KiB blocks, 2 per chunk: 256 chunks (16 MiB) per request, past gRPC's flow-control
    # window, so the stalled receiver's stream blocks its sender.
    layout = KVLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=64, dtype="float16")
    config = KVTransferConfig(chunk_bytes=64 << 10, max_inflight_chunks=1)
    gate = threading.Event()
    unpack = pack_fns(torch.device("cpu"))[1]

    def stalled_unpack(packed: torch.Tensor, kv_layer: torch.Tensor, ids: torch.Tensor) -> None:
        assert gate.wait(WAIT_S), "the test never opened the gate"
        unpack(packed, kv_layer, ids)

    def receiver(**kwargs) -> KVReceiver:
        address = "127.0.0.1:0" if transport == "grpc" else ""
        caches = _caches(layout, 16, fill=False)
        return get_transport(transport).create_receiver(caches, config, address=address, **kwargs)

    slow, fast = receiver(unpack_fn=stalled_unpack), receiver()
    assert slow.address != fast.address
    source = _caches(layout, 16, fill=True)
    sender = get_transport(transport).create_sender(source, config)
    try:
        blocks = list(range(16))
        sender.begin(slow.expect("slow", blocks))
        sender.begin(fast.expect("fast", blocks))
        for layer in range(layout.num_layers):
            sender.send_layer("slow", layer, blocks, blocks)
        slow_done = sender.flush("slow")
        for layer in range(layout.num_layers):
            sender.send_layer("fast", layer, blocks, blocks)
        assert sender.flush("fast").result(WAIT_S).complete
        assert fast.is_complete("fast") and not slow_done.done()
        gate.set()
        assert slow_done.result(WAIT_S).complete and slow.is_complete("slow")
    finally:
        gate.set()
        sender.close()
        slow.close()
        fast.close()


@NO_PACK_HOOKS  # the race is widened in the receiver's unpack (scatter) step
def test_no_byte_lands_after_cancel_returns(transport: str) -> None:
    """Issue 10: a scatter of a verified chunk racing ``cancel``. Once ``cancel`` returns, no
    byte of the request may land: it waits for a scatter in progress, later writes are
    refused, and its blocks are safe to reuse at once (gRPC and local write only through
    ``receive``)."""
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    config = KVTransferConfig(chunk_bytes=4 * layout.block_nbytes)  # 4 blocks per message
    unpack = pack_fns(torch.device("cpu"))[1]
    scattering, scattered_at = threading.Event(), []

    def slow_unpack(packed: torch.Tensor, kv_layer: torch.Tensor, ids: torch.Tensor) -> None:
        for i in range(len(ids)):  # block by block, slowly: a long scatter to race against
            scattering.set()
            time.sleep(0.05)
            unpack(packed[i : i + 1], kv_layer, ids[i : i + 1])
        scattered_at.append(time.monotonic())

    dst = _caches(layout, 8, fill=False)
    address = "127.0.0.1:0" if transport == "grpc" else ""
    receiver = get_transport(transport).create_receiver(
        dst, config, address=address, unpack_fn=slow_unpack
    )
    sender = get_transport(transport).create_sender(_caches(layout, 8, fill=True), config)
    blocks = list(range(8))
    try:
        sender.begin(receiver.expect("r", blocks))
        for layer in range(layout.num_layers):
            sender.send_layer("r", layer, blocks, blocks)
        done = sender.flush("r")
        assert scattering.wait(WAIT_S)
        cancelled = receiver.cancel("r")  # while a chunk is half scattered
        cancelled_at = time.monotonic()
        assert cancelled is not None and not cancelled.quarantined
        assert cancelled.block_ids == tuple(blocks)
        # The scatter in progress finished before cancel returned ...
        assert scattered_at and scattered_at[-1] <= cancelled_at
        for layer in dst:  # ... so a new owner's bytes now stay as written
            layer.fill_(7.0)
        with pytest.raises((UnknownRequestError, TransferAbortedError)):
            done.result(WAIT_S)
        time.sleep(0.2)  # any straggling write of the old request had its chance to land
        assert all(bool((layer == 7.0).all()) for layer in dst)
        assert len(scattered_at) < 2 * layout.num_layers  # later chunks were refused
    finally:
        sender.close()
        receiver.close()
