"""A property of every edge (hypothesis): whatever JSON, text and numbers the CLI or the client
is handed, the answer is either a one-line error (InvalidRequest; exit 2 at the CLI) with nothing
enqueued, or a request that is enqueued and ends final (succeeded, failed or cancelled) once a
real worker serves the deployment.

The examples run against the deployment while no worker serves it, so whatever an example
enqueued is still in its queues to be counted; then a worker and beat start and every accepted
request must end. Not generated here (checked by issue 16's work, not this one): tenants longer
than their column, cost caps beyond Numeric(20,10), deadlines that overflow on the move to UTC."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from core.errors import InvalidRequest
from core.settings import Settings, get_settings
from sheepdog.client import Client

MINI = "sheepdog-mini"
ACCEPTED: list[str] = []
FINAL = ("succeeded", "failed", "cancelled")

text = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=20)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 10**19, True, False, "10", "1e999999", "NaN", ""]),
)
scalars = st.one_of(st.none(), text, numbers)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
contents = st.one_of(
    text.filter(bool),
    st.sampled_from(["hello", "\u200b\u200b", "caf\udce9", " ", "x" * 70]),
    json_values,
)
payloads = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.just(MINI), st.sampled_from(["gpt-4.1-mini", "nope"]), text),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "robot"]), "content": contents},
                    optional={"name": st.one_of(text, st.just("bob"), numbers)},
                ),
                max_size=2,
            ),
        },
        optional={
            "priority": st.sampled_from(["high", "normal", "low", "urgent", 1]),
            "max_tokens": numbers,
            "temperature": numbers,
            "stop": st.one_of(text, st.lists(text, max_size=5), numbers),
            "max_cost_usd": st.one_of(
                st.decimals(-1, 10, places=4, allow_nan=False).map(str), st.sampled_from(["x"])
            ),
            "metadata": st.dictionaries(
                text.filter(lambda k: k != "tenant"), st.one_of(text, numbers), max_size=3
            ),
            "idempotency_key": st.one_of(text, numbers),
            "unknown_field": json_values,
        },
    ),
)
cli_values = st.one_of(
    text,
    st.one_of(st.integers(), st.floats()).map(str),
    st.sampled_from(["sheepdog-mini", "low", "high", "5", "caf\udce9", "\u200b", "-1"]),
)
cli_args = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "--model",
                "--prompt",
                "--system",
                "--priority",
                "--max-tokens",
                "--idempotency-key",
            ]
        ),
        cli_values,
    ),
    max_size=8,
)


def enqueued(r: redis.Redis, prefix: str) -> int:
    return sum(int(r.llen(k)) for k in r.scan_iter(match=f"{prefix}*") if r.type(k) == b"list")


@pytest.fixture(scope="module")
def deployment(stack: Any) -> Iterator[tuple[Settings, redis.Redis]]:
    """The deployment's settings (no worker yet) with this process's environment on it."""
    prefix = f"{stack.env['SHEEPDOG_BROKER_PREFIX']}prop:"
    env = {**stack.env, "SHEEPDOG_BROKER_PREFIX": prefix}
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("SHEEPDOG_")})
    get_settings.cache_clear()
    try:
        yield get_settings(), redis.Redis.from_url(env["SHEEPDOG_REDIS_URL"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


@settings(max_examples=80, deadline=None)
@given(payload=payloads)
# Always some accepted ones (random payloads are seldom all valid at once), so the last test has
# requests to see end.
@example(payload={"model": MINI, "messages": [{"role": "user", "content": "hello"}]})
@example(payload={"model": MINI, "messages": [{"role": "user", "content": "x"}], "priority": "low"})
def test_client_accepts_or_refuses_in_one_line(deployment: Any, payload: Any) -> None:
    conf, r = deployment
    before = enqueued(r, conf.broker_prefix)
    try:
        rid = Client(conf).submit(payload)
    except InvalidRequest as err:
        assert "\n" not in str(err), str(err)
        assert enqueued(r, conf.broker_prefix) == before, "a refused submit enqueued something"
        return
    if rid not in ACCEPTED:  # (the same idempotency key and body again: nothing new)
        ACCEPTED.append(rid)
        # The producer writes every row; only a stream request also has a message (a low one
        # waits in its table for beat's flush).
        view = Client(conf).get(rid)
        assert view is not None, f"{rid}: accepted but not recorded"
        sent = 1 if view.route == "stream" else 0
        assert enqueued(r, conf.broker_prefix) == before + sent


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=cli_args, lines=st.lists(st.one_of(text, payloads.map(json.dumps)), max_size=3))
def test_cli_accepts_or_refuses_in_one_line(
    deployment: Any, args: list[str], lines: list[str], tmp_path: Path
) -> None:
    from sheepdog.cli import build_app

    conf, r = deployment
    app = build_app()
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    for argv in (["submit", *args], ["submit", "--file", str(path)]):
        before = enqueued(r, conf.broker_prefix)
        result = CliRunner().invoke(app, argv)
        if result.exception is not None:
            assert isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code == 0:
            ids = result.stdout.split()
            assert ids and all(i.startswith("req_") for i in ids), result.stdout
            fresh = [i for i in dict.fromkeys(ids) if i not in ACCEPTED]  # a key's resend: once
            ACCEPTED.extend(fresh)
            # Every row written; only a stream request also has a message (a low one waits in
            # its table for beat's flush: a file of low ones alone enqueues nothing).
            views = [Client(conf).get(i) for i in fresh]
            assert all(views), f"accepted but not recorded: {fresh}"
            sent = sum(1 for v in views if v is not None and v.route == "stream")
            assert enqueued(r, conf.broker_prefix) == before + sent
            continue
        err = result.stderr
        assert result.exit_code == 2, (argv, result.exit_code, err)
        assert "Traceback" not in err
        if err.startswith("sheepdog:"):  # Sheepdog's own refusal: one line
            assert len(err.strip().splitlines()) == 1, err
        else:  # click's usage error (an unknown option, a missing value, a bad integer)
            assert "Error" in err, err
        assert enqueued(r, conf.broker_prefix) == before, "a refused submit enqueued something"


def test_every_accepted_request_ends_final(stack: Any, deployment: Any) -> None:
    conf, _ = deployment
    assert ACCEPTED, "no example was accepted: the strategies are too hostile"
    env = {"SHEEPDOG_BROKER_PREFIX": conf.broker_prefix}
    stack.start_worker(concurrency=50, env=env, name="prop")
    stack.start_beat(env=env, name="prop-beat")
    client = Client(conf)
    deadline = time.monotonic() + 180
    for rid in ACCEPTED:
        view = client.get(rid)
        while view is None or view.status not in FINAL:
            assert time.monotonic() < deadline, (rid, view.status if view else None)
            time.sleep(0.25)
            view = client.get(rid)
        assert view.status in FINAL, (rid, view.status, view.error)
