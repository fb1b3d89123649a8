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

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import replace

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
