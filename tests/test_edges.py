"""Every edge a clear error: each case a hostile but realistic user tried gets one line and exit 2
at the CLI (InvalidRequest at the client) with nothing enqueued, or works as it should."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from core import keys
from core.db import session_scope
from core.errors import IdempotencyConflict, InvalidRequest
from core.settings import Settings
from core.strict_json import loads
from models.request import ChatRequest, Message
from rules.admission import admit, parse_request
from rules.tokens import count_message_tokens
from sheepdog.client import Client
from tests.fixtures.batch import add_requests
from tests.fixtures.workers import ROOT

MINI = "sheepdog-mini"
BASE: dict[str, Any] = {"model": MINI, "messages": [{"role": "user", "content": "hello"}]}


def enqueued(r: redis.Redis, prefix: str) -> int:
    """Messages waiting in the deployment's queues (no worker consumes this prefix)."""
    return sum(int(r.llen(k)) for k in r.scan_iter(match=f"{prefix}*") if r.type(k) == b"list")


@pytest.fixture
def idle(redis_url: str, pg_url: str) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A deployment no worker serves (what is enqueued stays), and the env of its CLI."""
    prefix = f"t-edges-{uuid.uuid4().hex[:8]}:"
    settings = Settings(redis_url=redis_url, broker_prefix=prefix, database_url=pg_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(
        SHEEPDOG_REDIS_URL=redis_url, SHEEPDOG_BROKER_PREFIX=prefix, SHEEPDOG_DATABASE_URL=pg_url
    )
    yield settings, env


def cli(env: dict[str, str], *args: str | bytes, stdin: bytes | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "sheepdog", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def assert_refused(out: Any, *words: str) -> None:
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 2, (out.returncode, err[-2000:])
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in err, err


@pytest.mark.unit
@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("[" * 100_000, "nested deeper"),
        ('{"model": "sheepdog-mini", "max_tokens": ' + "9" * 5000 + "}", "5,000 digits"),
        ('{"model": "sheepdog-mini", "max_cost_usd": 1e999999}', "out of range"),
        ('{"model": "sheepdog-mini", "temperature": NaN}', "not a JSON number"),
        ('{"model": "sheepdog-mini", "model": "gpt-4.1"}', "duplicate key 'model'"),
    ],
)
def test_strict_json_refuses_with_one_line(line: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        loads(line, "f.jsonl:1")
    assert why in str(err.value) and "\n" not in str(err.value)


def test_cli_file_edges(idle: Any, tmp_path: Path) -> None:
    settings, env = idle
    r = redis.Redis.from_url(settings.redis_url)
    bad = tmp_path / "bad.jsonl"
    for line, why in (
        ("[" * 100_000, "nested deeper"),
        ('{"model": "sheepdog-mini", "max_tokens": ' + "9" * 5000 + "}", "digits"),
        ('{"model": "x", "model": "y"}', "duplicate key"),
    ):
        bad.write_text(line + "\n")
        assert_refused(cli(env, "submit", "--file", str(bad)), why)
    assert_refused(cli(env, "submit", "--file", "/dev/null"), "no requests in the file")
    assert_refused(cli(env, "submit", "--file", str(tmp_path)), "is a directory")
    assert_refused(cli(env, "submit", "--file", str(tmp_path / "nope")), "no such file")
    assert enqueued(r, settings.broker_prefix) == 0
    # A pipe works: standard input (`-`) and /dev/stdin alike.
    line = b'{"model": "sheepdog-mini", "messages": [{"role": "user", "content": "pipe"}]}\n'
    for name in ("-", "/dev/stdin"):
        out = cli(env, "submit", "--file", name, stdin=line)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().startswith("req_")
    assert enqueued(r, settings.broker_prefix) == 2


# Each printed a traceback (exit 1) before: values past what a time, a column or a file can
# hold.
CLI_VALUES_REFUSED: list[tuple[tuple[str, ...], str]] = [
    (("costs", "--since", "99999999999d"), "--since"),
    (("costs", "--since", "9999-12-31T23:59:59-12:00"), "--since"),
    (("costs", "--plot", "/nonexistent/dir/x.png"), "--plot"),
    (("costs", "budget", "set", "zed", "--daily", "1e20"), "below 10,000,000,000"),
    (("costs", "budget", "set", "t" * 150, "--daily", "1"), "1 to 100 characters"),
    (("costs", "budget", "set", "zed", "--daily", "9999999999.99999999999"), "below 10,000,0"),
    (("costs", "budget", "release-stale", "--hours", "1e12"), "--hours"),
    (("costs", "budget", "release-stale", "--hours", "0"), "at least 0.25"),
    (("costs", "budget", "release-stale", "--hours", "-5"), "at least 0.25"),
    (("webhooks", "add", "--tenant", "x", "http://[::1"), "cannot be read"),
    (("webhooks", "add", "--tenant", "t" * 150, "http://example.com/h"), "1 to 100 characters"),
    (("keys", "create", "--tenant", "x", "--rate-limit", "9" * 20), "rate limit"),
    (("submit", "--file", "/proc/self/mem"), "cannot read"),
]


@pytest.mark.parametrize(("args", "why"), CLI_VALUES_REFUSED)
def test_cli_values_past_what_can_be_held_get_one_line(
    idle: Any, args: tuple[str, ...], why: str
) -> None:
    _, env = idle
    assert_refused(cli(env, *args), why)


def test_cli_argv_edges(idle: Any) -> None:
    settings, env = idle
    r = redis.Redis.from_url(settings.redis_url)
    submit = ("submit", "--model", MINI)
    assert_refused(cli(env, *submit, "--prompt", b"caf\xe9"), "not valid UTF-8")
    assert_refused(cli(env, *submit, "--prompt", "ok", "--tenant", b"\xff\xfe"), "UTF-8")
    assert_refused(cli(env, *submit, "--prompt", "\u200b\u200b\ufeff"), "invisible")
    usage = cli(env, *submit, "--prompt", "x", "--max-tokens", "1e5")  # click's usage error
    assert usage.returncode == 2 and b"Traceback" not in usage.stderr
    assert_refused(
        cli(env, *submit, "--prompt", "x", "--priority", "low", "--follow"),
        "--follow streams high or normal",
    )
    assert enqueued(r, settings.broker_prefix) == 0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": True}, "temperature"),
        ({"metadata": {"note": "x" * 5_000_000}}, "over the limit of 1,000"),
        ({"metadata": {"k" * 100: "v"}}, "metadata key"),
        ({"messages": [{"role": "user", "content": "\u200b\u200c\u2060"}]}, "invisible"),
        ({"messages": [{"role": "user", "content": "caf\udce9"}]}, "not valid UTF-8"),
        ({"messages": [{"role": "user", "content": "hi", "name": "n" * 100_000}]}, "name"),
        ({"stop": ""}, "stop must be"),
        ({"stop": []}, "stop must be"),
        ({"stop": ["ok", ""]}, "stop must be"),
        ({"idempotency_key": "k\udc80"}, "idempotency_key"),
    ],
)
def test_request_edges_are_refused(change: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request({**BASE, **change})
    assert why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.unit
def test_model_construct_is_no_way_around_validation() -> None:
    forged = ChatRequest.model_construct(
        model=MINI, messages=[Message.model_construct(role="robot", content="")], max_tokens=-3
    )
    with pytest.raises(InvalidRequest, match="unknown role 'robot'"):
        parse_request(forged)
    with pytest.raises(InvalidRequest):
        Client(Settings()).prepare(forged)
    assert parse_request(parse_request(BASE)).model == MINI  # a valid instance passes


@pytest.mark.unit
def test_an_admitted_request_is_prepared_as_the_same_request_sent_raw() -> None:
    """The front door checks once (admit) and submits the Admitted (submit_admitted): its
    intake message is the one the raw body would have made, token estimate (and so the cap)
    included. The public prepare/submit take no Admitted: what they are given is checked."""
    client = Client(Settings())
    raw = {**BASE, "max_cost_usd": 0.0001, "messages": [{"role": "user", "content": "hi " * 50}]}
    admitted = admit(raw, prices=client.prices)
    assert admitted.prompt_tokens == count_message_tokens(raw["messages"])
    once, twice = client._item(admitted), client.prepare(raw)
    assert (once.body, once.request, once.lane, once.route) == (
        twice.body,
        twice.request,
        twice.lane,
        twice.route,
    )
    assert "max_tokens" in once.body  # the cap came from the estimate
    with pytest.raises(InvalidRequest):
        client.prepare(admitted)  # type: ignore[arg-type]


def test_status_of_a_row_with_a_year_10000_deadline(idle: Any) -> None:
    settings, env = idle
    rid = add_requests(settings, [(MINI, "far future")])[0]
    with session_scope(settings.database_url) as session:
        session.execute(
            text("UPDATE requests SET deadline = '10000-01-01 00:30:00+00' WHERE id = :id"),
            {"id": rid},
        )
    view = Client(settings).get(rid)
    assert view is not None and view.status == "queued"
    listed = Client(settings).list_requests(view.tenant, since=view.created_at, limit=500)
    assert rid in [v.id for v in listed]  # the list read the deadline: a 500 on the API
    out = cli(env, "status", rid, "--json")
    assert out.returncode == 0, out.stderr.decode()
    assert rid in out.stdout.decode()


def test_cancel_checks_the_id_first_and_says_when_it_is_unknown(idle: Any) -> None:
    settings, env = idle
    r = redis.Redis.from_url(settings.redis_url)
    names = keys.of(settings)
    client = Client(settings)
    for bad in ("req_nope", None, "x" * 20_000, "req_" + "A" * 32):
        with pytest.raises(InvalidRequest, match="invalid request id"):
            client.cancel(bad)  # type: ignore[arg-type]
    assert_refused(cli(env, "cancel", "req_nope"), "invalid request id 'req_nope'")
    assert not list(r.scan_iter(match=f"{names.cancel_flag('')}*"))  # no flag written
    unknown = "req_" + uuid.uuid4().hex
    out = cli(env, "cancel", unknown)
    assert out.returncode == 0 and "not recorded" in out.stdout.decode(), out
    assert client.cancel_outcome(unknown) == "not recorded"


def test_idempotency_key_reuse(idle: Any) -> None:
    settings, _ = idle
    r = redis.Redis.from_url(settings.redis_url)
    client = Client(settings)
    key = f"order-{uuid.uuid4().hex[:8]}"
    first = client.submit({**BASE, "idempotency_key": key})
    assert client.submit({**BASE, "idempotency_key": key}) == first  # same body: same id
    assert enqueued(r, settings.broker_prefix) == 1
    other = {**BASE, "messages": [{"role": "user", "content": "another"}], "idempotency_key": key}
    with pytest.raises(IdempotencyConflict) as err:
        client.submit(other)
    assert key in str(err.value) and first in str(err.value)
    # Two different bodies under one new key in one call: refused, and the key stays free.
    fresh = f"batch-{uuid.uuid4().hex[:8]}"
    with pytest.raises(IdempotencyConflict):
        client.submit_many(
            [{**BASE, "idempotency_key": fresh}, {**other, "idempotency_key": fresh}]
        )
    assert not r.exists(keys.of(settings).idempotency(fresh))
    assert enqueued(r, settings.broker_prefix) == 1
