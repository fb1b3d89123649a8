"""NIXL over UCX (real agents, a decode child process): the cluster secret and fault injection.

- A prefill worker with another secret, or none, is refused at pairing time with a clear
  ``AuthenticationError`` (it checks the decode worker's authenticator before handshaking).
- A rogue prefill agent that skips that check is refused by the decode side: its hello is
  not answered (its metadata is never loaded), it gets no grant, nothing lands, and the
  reservation stays usable by the right sender.
- ``fault_corrupt_rate=1.0``: the bytes that land differ from the source, every transfer fails
  verification (``ChecksumError``), the reservation is FAILED; the source is untouched.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl._api", reason="the nixl package is part of requirements.txt")

from kv_transfer import KVLayout, KVTransferConfig, TransferStatus, get_transport, nixl_transport
from kv_transfer.base import AuthenticationError, ChecksumError, KVSender, TransportError
from kv_transfer.layout import cache_layer_shape, gather_blocks
from tests.kv_transfer.nixl_peer import DecodePeer

pytestmark = pytest.mark.timeout(120)

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
SECRET = secrets.token_bytes(32)
CONFIG = KVTransferConfig(transport="nixl", secret=SECRET)
SRC = [0, 1, 5, 6, 7]
DST = [3, 4, 9, 10, 2]


@pytest.fixture(scope="module")
def peer() -> Iterator[DecodePeer]:
    peer = DecodePeer(LAYOUT, num_blocks=16, address="decode-sec", secret=SECRET)
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def src_caches() -> list[torch.Tensor]:
    torch.manual_seed(0)
    shape = cache_layer_shape(LAYOUT, 12)
    return [torch.randn(shape).to(torch.bfloat16) for _ in range(LAYOUT.num_layers)]


def _expected(src_caches: list[torch.Tensor], src: list[int]) -> torch.Tensor:
    return torch.stack([gather_blocks(layer, torch.tensor(src)) for layer in src_caches])


def _transfer(sender: KVSender, peer: DecodePeer, request_id: str) -> None:
    sender.begin(peer.expect(request_id, DST))
    for layer in range(LAYOUT.num_layers):
        sender.send_layer(request_id, layer, SRC, DST)
    sender.flush(request_id).result(timeout=30)


@pytest.mark.parametrize("secret", [b"", secrets.token_bytes(32)], ids=["none", "another"])
def test_a_prefill_worker_without_the_secret_is_refused_at_pairing(
    peer: DecodePeer, src_caches: list[torch.Tensor], secret: bytes
) -> None:
    sender = get_transport("nixl").create_sender(
        src_caches, KVTransferConfig(transport="nixl", secret=secret)
    )
    try:
        start = time.monotonic()
        match = "requires the cluster's KV secret" if not secret else "does not hold this cluster"
        with pytest.raises(AuthenticationError, match=match):
            sender.connect(peer.info)
        assert time.monotonic() - start < 1.0  # refused, not timed out
    finally:
        sender.close()


def test_a_rogue_prefill_agent_is_refused_by_the_decode_side(
    peer: DecodePeer, src_caches: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A peer that skips its own check of the decode worker and presents a wrong authenticator.
    monkeypatch.setattr(nixl_transport.NixlOpener, "_check_receiver", lambda *args: None)
    monkeypatch.setattr(nixl_transport, "HANDSHAKE_TIMEOUT_S", 2.0)
    rogue = get_transport("nixl").create_sender(
        src_caches, KVTransferConfig(transport="nixl", secret=secrets.token_bytes(32))
    )
    target = peer.expect("guarded", DST)
    try:
        with pytest.raises(TransportError, match="got no answer"):
            rogue.connect(peer.info)  # the decode side never loads it, so never answers
        rogue.begin(target)
        for layer in range(LAYOUT.num_layers):
            rogue.send_layer("guarded", layer, SRC, DST)
        with pytest.raises(TransportError):
            rogue.flush("guarded").result(timeout=30)
    finally:
        rogue.close()
    assert peer.status("guarded") is TransferStatus.RECEIVING
    assert not peer.blocks(DST).any()  # not one byte landed

    monkeypatch.undo()
    sender = get_transport("nixl").create_sender(src_caches, CONFIG)
    try:
        sender.begin(target)
        for layer in range(LAYOUT.num_layers):
            sender.send_layer("guarded", layer, SRC, DST)
        assert sender.flush("guarded").result(timeout=30).complete
    finally:
        sender.close()
    assert peer.wait("guarded")
    assert torch.equal(peer.blocks(DST), _expected(src_caches, SRC))
    assert peer.cancel("guarded")


def test_every_corrupted_transfer_lands_altered_and_is_detected(
    peer: DecodePeer, src_caches: list[torch.Tensor]
) -> None:
    source_before = [layer.clone() for layer in src_caches]
    config = KVTransferConfig(transport="nixl", secret=SECRET, fault_corrupt_rate=1.0)
    sender = get_transport("nixl").create_sender(src_caches, config)
    try:
        sender.connect(peer.info)
        for i in range(4):
            request_id = f"corrupt-{i}"
            with pytest.raises(ChecksumError, match="landed corrupt"):
                _transfer(sender, peer, request_id)
            assert peer.status(request_id) is TransferStatus.FAILED
            # The writer posts a layer in destination order and corrupts the first block
            # it posts: the lowest destination id, layer 0, K.
            first = DST.index(min(DST))
            landed = peer.blocks(DST[first : first + 1])[0, 0, 0]
            assert not torch.equal(landed, _expected(src_caches, SRC[first : first + 1])[0, 0, 0])
            assert peer.cancel(request_id)
    finally:
        sender.close()
    assert all(torch.equal(a, b) for a, b in zip(src_caches, source_before))


def test_only_the_first_transfer_is_corrupted_so_the_retry_lands_clean(
    peer: DecodePeer, src_caches: list[torch.Tensor]
) -> None:
    config = KVTransferConfig(
        transport="nixl", secret=SECRET, fault_corrupt_rate=1.0, fault_corrupt_first=1
    )
    sender = get_transport("nixl").create_sender(src_caches, config)
    try:
        with pytest.raises(ChecksumError):
            _transfer(sender, peer, "retry")
        assert peer.cancel("retry")
        _transfer(sender, peer, "retry")
    finally:
        sender.close()
    assert peer.wait("retry")
    assert torch.equal(peer.blocks(DST), _expected(src_caches, SRC))
    assert peer.cancel("retry")
