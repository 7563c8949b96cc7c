"""Hypothesis fuzzing of what users hand Sheepdog: submit payloads, CLI arguments and JSONL request
files. Bad input always gets a clear one-line error, never a traceback, and nothing is enqueued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from core.errors import InvalidRequest
from models.request import ChatRequest
from rules.admission import parse_request
from sheepdog.cli.requests import read_request_file

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "robot", ""]),
            "content": st.one_of(st.text(max_size=40), json_values),
        }
    ),
    max_size=3,
)
payloads = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["sheepdog-mini", "gpt-4.1", "nope", ""]), "messages": messages},
        optional={
            "priority": st.sampled_from(["high", "normal", "low", "urgent", 3]),
            "max_tokens": st.one_of(st.integers(-5, 5000), st.text(max_size=5)),
            "temperature": st.one_of(st.floats(-1, 3), st.text(max_size=3)),
            "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=6)),
            "max_cost_usd": st.one_of(st.decimals(-1, 1, places=6).map(str), st.text(max_size=4)),
            "deadline": st.one_of(st.datetimes().map(lambda d: d.isoformat()), st.text(max_size=8)),
            "metadata": st.dictionaries(st.text(max_size=5), json_values, max_size=20),
            "idempotency_key": st.one_of(st.text(max_size=250), st.integers()),
            "extra": json_values,
        },
    ),
)


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(payloads)
def test_parse_request_accepts_or_explains(payload: Any) -> None:
    try:
        req = parse_request(payload)
    except InvalidRequest as err:
        text = str(err)
        assert text.startswith("invalid request:") and "\n" not in text
    else:
        assert isinstance(req, ChatRequest)


@pytest.mark.unit
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.one_of(st.text(max_size=60), payloads.map(json.dumps)), max_size=6),
    raw=st.binary(max_size=40),
)
def test_request_files_accept_or_explain(tmp_path: Path, lines: list[str], raw: bytes) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes("\n".join(lines).encode() + raw)
    try:
        requests = read_request_file(path)
        for request in requests:
            parse_request(request)
    except InvalidRequest as err:
        assert "\n" not in str(err)


@pytest.fixture
def empty_redis(redis_url: str) -> str:
    """A Redis DB no worker listens on, to see whether anything was enqueued."""
    url = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    return url


cli_args = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "--model",
                "--prompt",
                "--priority",
                "--max-tokens",
                "--max-cost-usd",
                "--system",
                "--idempotency-key",
                "--file",
                "--tenant",
                "--bogus",
            ]
        ),
        st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
            max_size=12,
        ),
    ),
    max_size=8,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=cli_args)
def test_cli_submit_never_tracebacks(args: list[str], empty_redis: str, monkeypatch: Any) -> None:
    from core.settings import get_settings
    from sheepdog.cli import build_app

    monkeypatch.setenv("SHEEPDOG_REDIS_URL", empty_redis)
    get_settings.cache_clear()
    app = build_app()
    r = redis.Redis.from_url(empty_redis)
    before = r.dbsize()
    result = CliRunner().invoke(app, ["submit", *args])
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        assert r.dbsize() == before, "a refused submit enqueued something"
        assert "Traceback" not in result.output
    else:  # a valid submit: ids printed, drain what it enqueued
        assert all(line.startswith("req_") for line in result.stdout.split())
        r.flushdb()
    get_settings.cache_clear()
