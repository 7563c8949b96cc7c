"""The stream call's pure helpers (streaming/provider_stream.py, provider_calls.py): Retry-After,
error bodies read as the SDK reads them, the proxy the environment names."""

from __future__ import annotations

import pytest

from streaming.provider_calls import env_proxy
from streaming.provider_errors import error_message, retry_after_s

pytestmark = pytest.mark.unit


def test_retry_after_is_a_finite_number_of_seconds() -> None:
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_s({"retry-after": "-3"}) == 0.0
    # Not a finite wait: ignored (an `inf` would hold the stream, and its heartbeat, for good).
    for bad in ("inf", "nan", "Infinity"):
        assert retry_after_s({"retry-after": bad}) is None
        assert retry_after_s({"retry-after-ms": bad}) is None
    assert retry_after_s({"retry-after-ms": "inf", "retry-after": "4"}) == 4.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None
    # A day's wait is capped at a minute: a long throttle still slows everyone, for a while.
    assert retry_after_s({"retry-after": "60"}) == 60.0
    assert retry_after_s({"retry-after": "1000000000"}) == 60.0
    assert retry_after_s({"retry-after-ms": "61000"}) == 60.0
    assert retry_after_s({"retry-after": "Fri, 31 Dec 2999 23:59:59 GMT"}) == 60.0


def test_error_bodies_read_as_the_sdk_reads_them() -> None:
    body = b'{"error": {"message": "Invalid model", "type": "invalid_request_error"}}'
    assert error_message(400, body) == "Invalid model"
    assert error_message(502, b"Bad Gateway") == "Error code: 502 - Bad Gateway"
    assert error_message(500, b'{"detail": "x"}') == 'Error code: 500 - {"detail": "x"}'


def test_the_proxy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.openai.com/v1/chat/completions") is None
    monkeypatch.setenv("ALL_PROXY", "http://proxy.internal:3128")
    assert env_proxy("https://api.openai.com/v1/chat/completions") == "http://proxy.internal:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    assert env_proxy("https://api.openai.com/v1/chat/completions") == "http://tls-proxy:3128"
    monkeypatch.setenv("NO_PROXY", "api.openai.com")
    assert env_proxy("https://api.openai.com/v1/chat/completions") is None
