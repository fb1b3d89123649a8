"""API keys: the header check, where keys come from, and that no key is ever shown."""

from __future__ import annotations

import pytest

from router.api import RouterConfig
from router.auth import API_KEY_ENV, APIKeyAuth, api_keys_from
from router.protocol import APIError


def test_no_keys_means_open() -> None:
    auth = APIKeyAuth(())
    assert not auth.enabled
    auth.verify(None)
    auth.verify("Bearer anything")


@pytest.mark.parametrize("header", ["Bearer k1", "bearer k2", "BEARER   k2  "])
def test_any_configured_key_passes(header: str) -> None:
    APIKeyAuth(["k1", "k2"]).verify(header)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "didn't provide an API key"),
        ("", "didn't provide an API key"),
        ("k1", "didn't provide an API key"),  # no scheme
        ("Basic azE=", "didn't provide an API key"),
        ("Bearer k3", "Incorrect API key"),
        ("Bearer k1x", "Incorrect API key"),
        ("Bearer ", "Incorrect API key"),
    ],
)
def test_wrong_or_missing_key_is_401(header: str | None, message: str) -> None:
    with pytest.raises(APIError) as info:
        APIKeyAuth(["k1", "k2"]).verify(header)
    error = info.value
    assert error.status_code == 401 and error.code == "invalid_api_key"
    assert message in error.message
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert "k1" not in error.message and "k2" not in error.message


def test_keys_from_flags_and_environment() -> None:
    assert api_keys_from(None, {}) == ()
    assert api_keys_from(["a"], {API_KEY_ENV: "b, c,,a"}) == ("a", "b", "c")
    with pytest.raises(ValueError, match="must not be empty"):
        api_keys_from([" "], {})


def test_keys_never_appear_in_the_config_repr() -> None:
    config = RouterConfig(api_keys=("sk-secret-123",))
    assert "sk-secret-123" not in repr(config)
    with pytest.raises(ValueError, match="empty key"):
        RouterConfig(api_keys=("",))
