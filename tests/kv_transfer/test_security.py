"""The KV channel's security over real gRPC on loopback: the cluster secret, TLS, the flags.

A sender without the cluster's secret (none, or another cluster's) is refused with
UNAUTHENTICATED before its first message is read: no byte lands in the reserved blocks, and
the reservation stays usable by the right sender. TLS: a transfer over a self-signed CA lands
the right bytes; a sender that trusts another CA fails at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kv_transfer import KVTransferConfig, TransferStatus, get_transport
from kv_transfer.base import AuthenticationError, KVSender, TransportError
from kv_transfer.grpc_transport import _stream_metadata
from kv_transfer.layout import KVLayout, cache_layer_shape, checksum, gather_blocks, payload_bytes
from kv_transfer.pb import kv_transfer_pb2, kv_transfer_pb2_grpc
from kv_transfer.receiver import KVReceiver
from kv_transfer.security import (
    SECRET_ENV,
    cluster_kv_config,
    load_secret,
    write_self_signed_tls,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
SECRET = secrets.token_bytes(32)
SRC, DST = [0, 1, 2], [5, 6, 7]


def _caches(num_blocks: int, *, random: bool) -> list[torch.Tensor]:
    shape = cache_layer_shape(LAYOUT, num_blocks)
    make = (lambda: torch.randn(shape).to(torch.bfloat16)) if random else None
    return [make() if make else torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2)]


def _landed(caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    return torch.stack([gather_blocks(layer, torch.tensor(block_ids)) for layer in caches])


def _transfer(sender: KVSender, target, timeout: float = 20.0):
    sender.begin(target)
    for layer in range(LAYOUT.num_layers):
        sender.send_layer(target.request_id, layer, SRC, DST)
    return sender.flush(target.request_id).result(timeout=timeout)


@pytest.fixture
def dst_caches() -> list[torch.Tensor]:
    return _caches(8, random=False)


@pytest.fixture
def receiver(dst_caches: list[torch.Tensor]) -> Iterator[KVReceiver]:
    receiver = get_transport("grpc").create_receiver(
        dst_caches, KVTransferConfig(secret=SECRET), address="127.0.0.1:0"
    )
    yield receiver
    receiver.close()


@pytest.mark.parametrize("secret", [b"", secrets.token_bytes(32)], ids=["none", "another"])
def test_a_sender_without_the_secret_is_refused_before_any_byte_lands(
    receiver: KVReceiver, dst_caches: list[torch.Tensor], secret: bytes
) -> None:
    src = _caches(4, random=True)
    target = receiver.expect("r", DST)
    intruder = get_transport("grpc").create_sender(src, KVTransferConfig(secret=secret))
    try:
        with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
            _transfer(intruder, target)
    finally:
        intruder.close()
    assert receiver.status("r") is TransferStatus.RECEIVING  # not failed by the intruder
    assert all(not layer.any() for layer in dst_caches)  # not one byte written

    sender = get_transport("grpc").create_sender(src, KVTransferConfig(secret=SECRET))
    try:
        result = _transfer(sender, target)
    finally:
        sender.close()
    assert result.complete and receiver.is_complete("r")
    assert torch.equal(_landed(dst_caches, DST), _landed(src, SRC))


def test_an_authenticated_stream_cannot_write_another_request(
    receiver: KVReceiver, dst_caches: list[torch.Tensor]
) -> None:
    a, b = receiver.expect("a", [0]), receiver.expect("b", [1])
    payload = bytes(payload_bytes(_landed(_caches(1, random=True), [0])[0]))
    message = kv_transfer_pb2.KVChunk(
        request_id="b",
        layer=0,
        block_ids=[1],
        dtype=LAYOUT.dtype,
        shape=LAYOUT.packed_shape(1),
        payload=payload,
        checksum=checksum(payload),
        epoch=b.epoch,
        layout_signature=LAYOUT.signature,
    )
    with grpc.insecure_channel(receiver.address) as channel:
        stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
        with pytest.raises(grpc.RpcError) as raised:  # a's authenticator, b's chunk
            stub.PushKV(iter([message]), timeout=10, metadata=_stream_metadata(SECRET, a))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert receiver.status("b") is TransferStatus.RECEIVING
    assert not dst_caches[0].any()


def test_the_secret_is_never_printed_or_logged(
    receiver: KVReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = KVTransferConfig(secret=SECRET)
    forms = (SECRET.hex(), repr(SECRET), str(SECRET))
    assert not any(form in repr(config) or form in str(config) for form in forms)
    caplog.set_level(logging.DEBUG)
    sender = get_transport("grpc").create_sender(_caches(4, random=True), config)
    try:
        assert _transfer(sender, receiver.expect("r", DST)).complete
        intruder = get_transport("grpc").create_sender(_caches(4, random=True), KVTransferConfig())
        with pytest.raises(AuthenticationError):
            _transfer(intruder, receiver.expect("r2", DST[:3]))
        intruder.close()
    finally:
        sender.close()
    assert "refused KV stream" in caplog.text  # the log was captured
    assert not any(form in caplog.text for form in forms)


def test_each_cluster_gets_its_own_secret_unless_pinned() -> None:
    first, second = cluster_kv_config(KVTransferConfig()), cluster_kv_config(KVTransferConfig())
    assert len(first.secret) == 32 and first.secret != second.secret
    assert cluster_kv_config(KVTransferConfig(secret=SECRET)).secret == SECRET


def test_a_cluster_fills_the_secret_its_workers_get() -> None:
    from router.cluster import Cluster, ClusterConfig

    cluster = Cluster(ClusterConfig())
    assert len(cluster.config.kv_transfer.secret) == 32
    assert cluster._worker_args("decode", "decode-0")[2].secret == cluster.config.kv_transfer.secret
    assert SECRET.hex() not in repr(Cluster(ClusterConfig(kv_transfer=KVTransferConfig())).config)


def test_pinned_secret_from_file_or_environment(tmp_path: Path) -> None:
    path = tmp_path / "kv-secret"
    path.write_text(SECRET.hex() + "\n")
    assert load_secret(str(path), {}) == SECRET.hex().encode()
    assert load_secret(None, {SECRET_ENV: "x" * 20}) == b"x" * 20
    assert load_secret(str(path), {SECRET_ENV: "y" * 20}) == SECRET.hex().encode()  # file wins
    assert load_secret(None, {}) == b""
    with pytest.raises(ValueError, match=r"--kv-secret-file '.*missing' cannot be read"):
        load_secret(str(tmp_path / "missing"), {})
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="holds 3 bytes; a KV secret needs at least 16"):
        load_secret(str(tmp_path / "short"), {})
    with pytest.raises(ValueError, match=rf"\${SECRET_ENV} holds 5 bytes"):
        load_secret(None, {SECRET_ENV: "short"})


def test_serve_flags_reach_the_kv_config(tmp_path: Path) -> None:
    from router.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--kv-secret-file",
            str(tmp_path / "s"),
            "--kv-tls-cert",
            "c.pem",
            "--kv-fault-corrupt-rate",
            "0.5",
            "--kv-fault-corrupt-first",
            "3",
        ]
    )
    assert args.kv_secret_file == str(tmp_path / "s") and args.kv_tls_cert == "c.pem"
    assert (args.kv_fault_corrupt_rate, args.kv_fault_corrupt_first) == (0.5, 3)
    assert not hasattr(args, "kv_secret")  # never on the command line


# -- TLS ------------------------------------------------------------------------------------


def test_transfer_over_tls_lands_the_right_bytes_and_a_foreign_ca_fails_fast(
    tmp_path: Path,
) -> None:
    pytest.importorskip("cryptography")
    ours, theirs = (write_self_signed_tls(tmp_path, n) for n in ("ours", "theirs"))
    dst = _caches(8, random=False)
    receiver = get_transport("grpc").create_receiver(
        dst, KVTransferConfig(secret=SECRET, **ours), address="127.0.0.1:0"
    )
    src = _caches(4, random=True)
    try:
        # Plaintext to a TLS server: refused, nothing written.
        plain = get_transport("grpc").create_sender(src, KVTransferConfig(secret=SECRET))
        with pytest.raises(TransportError):
            _transfer(plain, receiver.expect("plain", DST))
        plain.close()
        assert not any(layer.any() for layer in dst)

        # Trusting another CA: the handshake fails, cleanly and at once.
        foreign = get_transport("grpc").create_sender(
            src, KVTransferConfig(secret=SECRET, tls_ca=theirs["tls_ca"], **_keypair(ours))
        )
        start = time.monotonic()
        with pytest.raises(TransportError, match="UNAVAILABLE"):
            _transfer(foreign, receiver.expect("foreign", DST))
        assert time.monotonic() - start < 10.0
        foreign.close()
        assert not any(layer.any() for layer in dst)

        sender = get_transport("grpc").create_sender(src, KVTransferConfig(secret=SECRET, **ours))
        try:
            target = receiver.expect("tls", DST)
            assert _transfer(sender, target).complete
        finally:
            sender.close()
        assert torch.equal(_landed(dst, DST), _landed(src, SRC))
    finally:
        receiver.close()


def _keypair(paths: dict[str, str]) -> dict[str, str]:
    return {"tls_cert": paths["tls_cert"], "tls_key": paths["tls_key"]}


def test_tls_flags_are_all_or_nothing(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ValueError, match=r"tls_ca \(--kv-tls-ca\) is missing"):
        KVTransferConfig(tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(ValueError, match=r"tls_key \(--kv-tls-key\) file '/nonexistent.pem'"):
        KVTransferConfig(tls_cert=str(cert), tls_key="/nonexistent.pem", tls_ca=str(cert))
    with pytest.raises(ValueError, match=r"TLS .* needs the grpc transport, got 'nixl'"):
        KVTransferConfig(transport="nixl", tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert))
    with pytest.raises(ValueError, match="tls_server_name is set without TLS"):
        KVTransferConfig(tls_server_name="pdserve-kv")
    with pytest.raises(ValueError, match="secret must be bytes"):
        KVTransferConfig(secret="text")  # type: ignore[arg-type]


def test_pdserve_serve_refuses_bad_kv_security_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.cli import main

    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    base = ["serve", "--model", "pdserve-tiny", "--device", "cpu"]
    assert main([*base, "--kv-tls-cert", str(cert)]) == 2
    assert "tls_key (--kv-tls-key) is missing" in capsys.readouterr().err
    monkeypatch.setenv(SECRET_ENV, "too-short")
    assert main(base) == 2
    error = capsys.readouterr().err
    assert f"${SECRET_ENV} holds 9 bytes" in error and "too-short" not in error


def test_tls_server_name_overrides_the_host_checked(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    tls = write_self_signed_tls(tmp_path, "named", hosts=("kv.pdserve.internal",))
    dst = _caches(8, random=False)
    receiver = get_transport("grpc").create_receiver(
        dst, KVTransferConfig(secret=SECRET, **tls), address="127.0.0.1:0"
    )
    src = _caches(4, random=True)
    try:
        unnamed = get_transport("grpc").create_sender(src, KVTransferConfig(secret=SECRET, **tls))
        with pytest.raises(TransportError):  # the certificate does not name 127.0.0.1
            _transfer(unnamed, receiver.expect("unnamed", DST))
        unnamed.close()
        config = KVTransferConfig(secret=SECRET, tls_server_name="kv.pdserve.internal", **tls)
        sender = get_transport("grpc").create_sender(src, config)
        try:
            assert _transfer(sender, receiver.expect("named", DST)).complete
        finally:
            sender.close()
        assert torch.equal(_landed(dst, DST), _landed(src, SRC))
    finally:
        receiver.close()
