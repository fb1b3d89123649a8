"""The KV channel's security: the cluster secret and the authenticators made from it.

Trust boundary: the Ray control plane (the router, the workers it creates, the actor calls
between them) is internal and trusted; it carries the secret (``KVTransferConfig.secret``)
and each decode worker's ``ReceiverInfo`` / ``TransferTarget`` (with NIXL, the memory keys of
its registered cache). The KV data plane (gRPC streams, NIXL notifications) is not: every
stream and every NIXL pairing message carries an HMAC-SHA256 authenticator made from the
secret, which the decode side checks before it writes a byte or loads a peer. The secret
itself never crosses the data plane and is never logged (``repr=False`` on its field).

Where the secret comes from (``resolve_secret``): ``--kv-secret-file PATH``, else
``$PDSERVE_KV_SECRET``, else ``secrets.token_bytes(32)`` made by the router when it builds
the cluster (``cluster_kv_config``), so each cluster has its own.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from kv_transfer.base import KVTransferConfig

SECRET_ENV = "PDSERVE_KV_SECRET"
MIN_SECRET_BYTES = 16
GENERATED_SECRET_BYTES = 32


def load_secret(path: str | None, environ: Mapping[str, str] = os.environ) -> bytes:
    """The operator's pinned secret: the file's bytes (surrounding whitespace stripped), else
    ``$PDSERVE_KV_SECRET``; ``b""`` when neither is set (the cluster then makes one).

    Raises ValueError naming the file or variable (never the secret) when it is unusable.
    """
    if path:
        try:
            with open(path, "rb") as file:
                secret = file.read().strip()
        except OSError as error:
            raise ValueError(f"--kv-secret-file {path!r} cannot be read: {error}") from error
        where = f"--kv-secret-file {path!r}"
    elif environ.get(SECRET_ENV):
        secret, where = environ[SECRET_ENV].strip().encode(), f"${SECRET_ENV}"
    else:
        return b""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{where} holds {len(secret)} bytes; a KV secret needs at least {MIN_SECRET_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return secret


def cluster_kv_config(config: KVTransferConfig) -> KVTransferConfig:
    """``config`` with a secret: the pinned one, or a fresh one for this cluster."""
    if config.secret:
        return config
    return replace(config, secret=secrets.token_bytes(GENERATED_SECRET_BYTES))


def authenticator(secret: bytes, purpose: str, *parts: str | bytes | int) -> str:
    """HMAC-SHA256 (hex) over a purpose label and length-prefixed parts, so that no two
    different messages (or purposes) share an authenticator."""
    mac = hmac.new(secret, purpose.encode(), hashlib.sha256)
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        mac.update(len(raw).to_bytes(8, "little"))
        mac.update(raw)
    return mac.hexdigest()


def verify(secret: bytes, token: str, purpose: str, *parts: str | bytes | int) -> bool:
    """Constant-time check of ``token`` against ``authenticator(secret, purpose, *parts)``."""
    expected = authenticator(secret, purpose, *parts)
    return hmac.compare_digest(expected.encode(), token.encode("ascii", "replace"))


def write_self_signed_tls(
    directory: str | Path,
    name: str,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    valid_days: int = 1,
) -> dict[str, str]:
    """For tests, benchmarks and trying ``--kv-tls-*`` locally (production certificates come
    from your PKI): a self-signed CA and a server certificate for ``hosts`` that it signed,
    written as PEM files. Returns ``{"tls_cert", "tls_key", "tls_ca"}`` -> path, the
    ``KVTransferConfig`` fields. Needs the ``cryptography`` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, *, ca: bool):
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    files = {
        "tls_ca": certificate(f"{name} CA", ca_key, ca=True).public_bytes(pem),
        "tls_cert": certificate("pdserve-kv", server_key, ca=False).public_bytes(pem),
        "tls_key": server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    paths = {}
    for field, data in files.items():
        path = Path(directory) / f"{name}-{field.removeprefix('tls_')}.pem"
        path.write_bytes(data)
        paths[field] = str(path)
    return paths
