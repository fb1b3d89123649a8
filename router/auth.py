"""API keys for the OpenAI routes: ``Authorization: Bearer <key>`` on every ``/v1/*`` request.

Keys come from ``--api-key`` (repeatable) and ``PDSERVE_API_KEY`` (one key, or several
separated by commas). With no key configured the API is open, as vLLM's is. ``/health`` and
``/metrics`` never need a key: load balancers, Kubernetes probes and Prometheus reach them
without secrets, and they reveal no prompts or outputs.

The check does not leak which key nearly matched, nor how many keys there are, through its
timing: the presented key and every configured key are hashed to 32 bytes, and the digest is
compared with ``hmac.compare_digest`` against every configured digest, without stopping early.
Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

from router.protocol import APIError

API_KEY_ENV = "PDSERVE_API_KEY"
_BEARER = "bearer "


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def api_keys_from(
    flags: Iterable[str] | None, environ: Mapping[str, str] = os.environ
) -> tuple[str, ...]:
    """The configured keys: the flags' values, then ``PDSERVE_API_KEY``'s comma-separated ones."""
    keys = [key.strip() for key in flags or ()]
    keys += [key.strip() for key in environ.get(API_KEY_ENV, "").split(",") if key.strip()]
    if any(not key for key in keys):
        raise ValueError("an API key must not be empty")
    return tuple(dict.fromkeys(keys))


class APIKeyAuth:
    """Checks the ``Authorization`` header of a request against the configured keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key) for key in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def verify(self, authorization: str | None) -> None:
        """Raise a 401 ``APIError`` unless ``authorization`` is ``Bearer <a configured key>``."""
        if not self.enabled:
            return
        if not authorization or not authorization[: len(_BEARER)].lower() == _BEARER:
            raise _unauthorized(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        presented = _digest(authorization[len(_BEARER) :].strip())
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on which matched
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> APIError:
    return APIError(
        message,
        401,
        "invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
