"""Webhooks on the plain functions, on SQLite and PostgreSQL, with a real HTTP receiver: the
outbox written in the end's transaction (batch ingest bulk path included), signatures checked
by the independent `standardwebhooks` package, retries with the same webhook-id, 410, expiry,
redelivery, rotation, redirects, and the address rules."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sheepdog_client import WebhookVerificationError, verify_webhook
from sqlalchemy import delete, select, update
from standardwebhooks.webhooks import Webhook

from core.db import session_scope
from core.errors import InvalidRequest
from core.settings import Settings, get_settings
from lifecycle.moves import move
from models.status import Status
from models.tables import utcnow
from models.webhook_tables import WebhookDelivery, WebhookEndpoint, WebhookSecret
from rules.admission import parse_request
from tests.fixtures.batch import add_requests, drive, make_settings
from tests.fixtures.webhooks import Receiver
from webhooks import endpoints
from webhooks.crypto import new_key
from webhooks.delivery import claim, deliver_target, due_targets, signing_secrets

MODEL = "sheepdog-mini"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SHEEPDOG_WEBHOOK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def settings(env: None, batch_db: str, redis_url: str, simulator: Any, tmp_path: Path) -> Settings:
    with session_scope(batch_db) as session:
        for table in (WebhookDelivery, WebhookEndpoint, WebhookSecret):
            session.execute(delete(table))
    return make_settings(
        batch_db,
        redis_url,
        simulator,
        tmp_path,
        webhook_secret_key=SecretStr(new_key()),
        webhook_allow_private=True,
        webhook_timeout_s=2.0,
        webhook_backoff_base_s=0.2,
        webhook_backoff_max_s=1.0,
        broker_prefix=f"t-wh-{uuid.uuid4().hex[:6]}:",
    )


def register(settings: Settings, tenant: str, url: str, events: list[str] | None = None) -> str:
    with session_scope(settings.database_url) as session:
        added = endpoints.add_endpoint(session, settings, tenant, url, events)
    return added.secret or ""


def deliveries(settings: Settings) -> list[WebhookDelivery]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def deliver_all(settings: Settings) -> None:
    for target, tenant in due_targets(settings):
        deliver_target(settings, target, tenant)


def make_due(settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))


def test_batch_ingest_writes_the_outbox_and_every_event_arrives_signed(
    settings: Settings, receiver: Receiver
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    receiver.secret = register(settings, tenant, receiver.url)
    own = Receiver(receiver.secret)
    own.start()
    try:
        meta = {"metadata": {"tenant": tenant}}
        ids = add_requests(settings, [(MODEL, f"q{i}") for i in range(3)], **meta)
        ids += add_requests(settings, [(MODEL, "own")], webhook_url=own.url, **meta)
        other = add_requests(settings, [(MODEL, "not hooked")])  # tenant default: nothing
        drive(settings, ids + other)
        rows = deliveries(settings)
        kinds = sorted((r.event_type, r.target == "request") for r in rows)
        assert kinds == [("batch.completed", False)] + [("request.succeeded", False)] * 4 + [
            ("request.succeeded", True)
        ], kinds
        deliver_all(settings)
        events = receiver.wait_for(5, timeout=10)
        own_events = own.wait_for(1, timeout=10)
    finally:
        own.stop()
    assert receiver.bad_signatures == 0 and own.bad_signatures == 0
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    assert sorted(e["data"]["id"] for e in by_type["request.succeeded"]) == sorted(ids)
    assert all(e["data"]["status"] == "succeeded" for e in by_type["request.succeeded"])
    (batch,) = by_type["batch.completed"]
    assert batch["data"]["counts"]["succeeded"] == 4
    assert sorted(batch["data"]["succeeded_ids"]) == sorted(ids)
    assert own_events[0]["data"]["id"] == ids[-1]
    with session_scope(settings.database_url) as session:
        from models.tables import Request
        from models.views import RequestView

        row = session.get(Request, ids[0])
        assert row is not None
        view = RequestView.from_row(row).model_dump(mode="json")
    sent = next(e for e in by_type["request.succeeded"] if e["data"]["id"] == ids[0])
    assert sent["data"] == view
    assert {r.status for r in deliveries(settings)} == {"delivered"}


def test_no_webhook_tenant_writes_nothing(settings: Settings) -> None:
    ids = add_requests(settings, [(MODEL, "a"), (MODEL, "b")])
    drive(settings, ids)
    assert deliveries(settings) == []


def test_the_outbox_row_is_in_the_end_transaction(settings: Settings, receiver: Receiver) -> None:
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    register(settings, tenant, receiver.url, ["request.cancelled"])
    (rid,) = add_requests(settings, [(MODEL, "x")], metadata={"tenant": tenant})
    with pytest.raises(RuntimeError), session_scope(settings.database_url) as session:
        assert move(session, rid, Status.CANCELLED, error="cancelled")
        assert len(session.scalars(select(WebhookDelivery)).all()) == 1
        raise RuntimeError("crash before commit")
    assert deliveries(settings) == []  # rolled back with the move
    with session_scope(settings.database_url) as session:
        assert move(session, rid, Status.CANCELLED, error="cancelled")
    (row,) = deliveries(settings)
    assert (row.event_type, row.subject_id) == ("request.cancelled", rid)


def _one_delivery(settings: Settings, receiver: Receiver) -> str:
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    receiver.secret = register(settings, tenant, receiver.url)
    (rid,) = add_requests(settings, [(MODEL, "x")], metadata={"tenant": tenant})
    with session_scope(settings.database_url) as session:
        move(session, rid, Status.FAILED, error="boom")
    return tenant


def test_one_endpoints_backlog_does_not_hide_another_target(
    settings: Settings, receiver: Receiver
) -> None:
    """Due targets are one a target, oldest first: a backlog of one endpoint's deliveries (older
    than every other's) used to fill the list, and other tenants waited with workers idle."""
    busy, quiet = f"t-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}"
    register(settings, busy, receiver.url)
    register(settings, quiet, receiver.url + "/quiet")
    for tenant, n in ((busy, 12), (quiet, 1)):
        for rid in add_requests(
            settings, [(MODEL, f"x{i}") for i in range(n)], metadata={"tenant": tenant}
        ):
            with session_scope(settings.database_url) as session:
                move(session, rid, Status.FAILED, error="boom")
    with session_scope(settings.database_url) as session:
        for tenant, ago in ((busy, 600), (quiet, 60)):
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.tenant == tenant)
                .values(next_attempt_at=utcnow() - timedelta(seconds=ago))
            )
        quiet_target = session.scalar(
            select(WebhookDelivery.target).where(WebhookDelivery.tenant == quiet)
        )
    assert (quiet_target, quiet) in due_targets(settings, limit=2)


def test_a_tenants_slow_receivers_hold_only_its_own_slots(
    settings: Settings, receiver: Receiver
) -> None:
    """A tenant with many endpoints that never answer held every delivery thread (each endpoint
    has slots of its own), and the other tenants' events waited: 20 s seen behind 20 such
    endpoints. A run now holds one of its tenant's slots too."""
    import threading

    settings = settings.model_copy(update={"webhook_tenant_concurrency": 1})
    slow, quick = f"t-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}"
    other = Receiver()
    other.start()
    try:
        receiver.secret = register(settings, slow, receiver.url)
        for path in ("/b", "/c"):
            register(settings, slow, receiver.url + path)
        other.secret = register(settings, quick, other.url)
        for tenant in (slow, quick):
            (rid,) = add_requests(settings, [(MODEL, "x")], metadata={"tenant": tenant})
            with session_scope(settings.database_url) as session:
                move(session, rid, Status.FAILED, error="boom")
        due = due_targets(settings)
        slow_runs = [t for t in due if t[1] == slow]
        assert len(slow_runs) == 3
        receiver.hang_s = 3.0
        first = threading.Thread(target=deliver_target, args=(settings, *slow_runs[0]))
        first.start()
        deadline = time.monotonic() + 10
        while not receiver.attempts:  # the first run is in its send, holding the slot
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for run in slow_runs[1:]:
            assert deliver_target(settings, *run).busy, run
        ((target, tenant),) = [t for t in due if t[1] == quick]
        report = deliver_target(settings, target, tenant)
        assert (report.busy, report.delivered) == (False, 1)
        assert other.handled and first.is_alive(), "delivered while the slow one hangs"
        first.join(30)  # timed out (3 s against 2): retried later
        receiver.hang_s = 0
        make_due(settings)
        deliver_all(settings)
        assert {r.status for r in deliveries(settings)} == {"delivered"}
    finally:
        other.stop()


def test_failures_retry_with_the_same_webhook_id(settings: Settings, receiver: Receiver) -> None:
    _one_delivery(settings, receiver)
    receiver.status = 500
    deliver_all(settings)
    (row,) = deliveries(settings)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500)
    assert row.next_attempt_at > utcnow() - timedelta(seconds=1)
    receiver.status = 302  # a redirect is not followed: a failed attempt
    make_due(settings)
    deliver_all(settings)
    (row,) = deliveries(settings)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 2, 302)
    receiver.status = 200
    make_due(settings)
    deliver_all(settings)
    (row,) = deliveries(settings)
    assert row.status == "delivered", row.last_error
    assert set(receiver.attempts) == {row.webhook_id} and receiver.attempts[row.webhook_id] == 3
    assert receiver.events()[0]["data"]["error"] == "boom"


def test_a_nul_in_a_receivers_answer_is_recorded(settings: Settings, receiver: Receiver) -> None:
    """A receiver's error body with a NUL went into last_error, which PostgreSQL refused: the
    batch's record rolled back every time, the row never backed off nor died, and the rows
    delivered with it were sent again at every lease's end."""
    _one_delivery(settings, receiver)
    receiver.status, receiver.error_body = 500, b"a\x00b"
    deliver_all(settings)
    (row,) = deliveries(settings)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500)
    assert row.last_error == "HTTP 500: a\ufffdb"


def test_a_claim_leases_no_more_rows_than_its_limit(settings: Settings, receiver: Receiver) -> None:
    """On PostgreSQL the lease's UPDATE ran its limited `IN (SELECT ... LIMIT n)` once per
    row, so `claim(limit=1)` leased every due row of the target: a slow receiver's rows all
    shared one lease, which lapsed mid-batch, and each was sent twice."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    receiver.secret = register(settings, tenant, receiver.url)
    for rid in add_requests(
        settings, [(MODEL, f"x{i}") for i in range(6)], metadata={"tenant": tenant}
    ):
        with session_scope(settings.database_url) as session:
            move(session, rid, Status.FAILED, error="boom")
    ((target, _),) = due_targets(settings)

    def leased() -> int:
        return sum(r.leased_until is not None for r in deliveries(settings))

    assert len(claim(settings, target, 1)) == 1 and leased() == 1
    assert len(claim(settings, target, 2)) == 2 and leased() == 3
    deliver_all(settings)  # the three not leased
    assert len(receiver.handled) == 3 and set(receiver.attempts.values()) == {1}


def test_gone_disables_the_endpoint_and_expiry_kills(
    settings: Settings, receiver: Receiver
) -> None:
    tenant = _one_delivery(settings, receiver)
    receiver.status = 410
    deliver_all(settings)
    (row,) = deliveries(settings)
    assert row.status == "dead" and "410" in (row.last_error or "")
    with session_scope(settings.database_url) as session:
        (ep,) = endpoints.list_endpoints(session, tenant)
        assert not ep.enabled
        failed = endpoints.failed_deliveries(session, tenant)
        assert [f.webhook_id for f in failed] == [row.webhook_id]
        assert endpoints.failed_deliveries(session, "someone-else") == []
        with pytest.raises(endpoints.WebhookError):
            endpoints.redeliver(session, settings, "someone-else", row.webhook_id)
    receiver.status = 200
    with session_scope(settings.database_url) as session:
        endpoints.redeliver(session, settings, tenant, row.webhook_id)
    deliver_all(settings)
    (again,) = deliveries(settings)
    assert again.status == "delivered" and again.webhook_id == row.webhook_id
    # A delivery past its retry window is dead after its next failure.
    receiver.status = 503
    (rid,) = add_requests(settings, [(MODEL, "y")], metadata={"tenant": tenant})
    with session_scope(settings.database_url) as session:
        move(session, rid, Status.CANCELLED, error="c")
        session.execute(update(WebhookDelivery).values(expires_at=utcnow()))
    deliver_all(settings)
    last = deliveries(settings)[-1]
    assert last.status == "dead" and "gave up" in (last.last_error or "")


def test_concurrent_first_endpoints_and_rotations(settings: Settings, receiver: Receiver) -> None:
    """Eight first endpoints of a tenant at once: the secret was read then inserted, and the
    losers of the race failed (UniqueViolation, a 500 over HTTP). Eight rotations at once:
    each read the row then wrote it, so most handed-out secrets never signed and the true
    previous one lost its grace period."""
    import threading

    tenant = f"t-{uuid.uuid4().hex[:6]}"
    start = threading.Barrier(8)

    def at_once(call: Any) -> list[Any]:
        out: list[Any] = []

        def one() -> None:
            start.wait()
            with session_scope(settings.database_url) as session:
                out.append(call(session))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(out) == 8, "a call failed"
        return out

    added = at_once(lambda s: endpoints.add_endpoint(s, settings, tenant, receiver.url))
    (first,) = [a.secret for a in added if a.secret]
    rotated = at_once(lambda s: endpoints.rotate_secret(s, settings, tenant))
    assert len(set(rotated)) == 8
    with session_scope(settings.database_url) as session:
        current, previous = signing_secrets(session, settings, tenant, utcnow())
    # Rotations in turn: the current one is the last handed out, the previous the one before.
    assert current in rotated and previous in rotated and previous != first


def test_rotation_sends_both_signatures(settings: Settings, receiver: Receiver) -> None:
    tenant = _one_delivery(settings, receiver)
    old = receiver.secret
    assert old is not None
    with session_scope(settings.database_url) as session:
        new = endpoints.rotate_secret(session, settings, tenant)
    receiver.secret = new
    deliver_all(settings)
    receiver.wait_for(1, timeout=10)
    headers, body = receiver.raw[-1]
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "request.failed"
        assert verify_webhook(headers, body, secret)["type"] == "request.failed"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, "whsec_" + "A" * 44)
    with pytest.raises(WebhookVerificationError):
        verify_webhook({**headers, "webhook-timestamp": "1"}, body, new)


@pytest.mark.unit
@pytest.mark.parametrize(
    "host",
    [
        "[64:ff9b::7f00:1]",
        "[64:ff9b:1::a9fe:a9fe]",
        "[2002:7f00:1::]",
        "[::127.0.0.1]",
        "[64:ff9b::a9fe:a9fe]",
    ],
)
def test_an_ipv6_address_carrying_a_private_ipv4_one_is_refused(host: str) -> None:
    """NAT64, 6to4 and IPv4-compatible addresses reach the IPv4 address they carry (through a
    gateway on the way): they were judged as IPv6 alone, and taken as public."""
    from rules.addresses import UnsafeURL, check_form

    with pytest.raises(UnsafeURL, match="non-public"):
        check_form(f"http://{host}/hook", allow_private=False)
    check_form("http://[64:ff9b::808:808]/hook", allow_private=False)  # 8.8.8.8: public


@pytest.mark.unit
def test_event_lists_are_named_or_left_out() -> None:
    assert endpoints.events_column(None) == endpoints.events_column(["*"]) == "*"
    with pytest.raises(endpoints.WebhookError, match="events is empty"):
        endpoints.events_column([])
    with pytest.raises(endpoints.WebhookError) as err:
        endpoints.events_column([f"e{i}" for i in range(200_000)])
    assert "and 199,995 more" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.unit
@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/x",  # resolves to 127.0.0.1
        "http://127.0.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/x",
        "http://10.0.0.1/x",
        "file:///etc/passwd",
    ],
)
def test_private_addresses_are_refused_unless_allowed(url: str) -> None:
    settings = Settings(webhook_allow_private=False)
    with pytest.raises(endpoints.WebhookError):
        endpoints.check_url(settings, url)
    if url.startswith("http") and "localhost" not in url:
        with pytest.raises(InvalidRequest, match="webhook_url"):
            parse_request(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "webhook_url": url,
                }
            )
    if url.startswith("http"):
        endpoints.check_url(Settings(webhook_allow_private=True), url)


def test_delivery_checks_the_address_again(settings: Settings, receiver: Receiver) -> None:
    _one_delivery(settings, receiver)  # registered while private addresses were allowed
    strict = settings.model_copy(update={"webhook_allow_private": False})
    deliver_all(strict)
    (row,) = deliveries(settings)
    assert row.status == "dead" and "non-public" in (row.last_error or "")
    assert receiver.attempts == {}


def test_a_request_url_needs_its_tenant_secret(settings: Settings) -> None:
    from sheepdog.client import Client

    item = Client(settings).prepare(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "metadata": {"tenant": "no-secret"},
            "webhook_url": "http://127.0.0.1:9/x",
        }
    )
    with pytest.raises(InvalidRequest, match="no webhook signing secret"):
        endpoints.require_signing_secrets(settings, [item])


def test_metrics_count_deliveries_and_the_oldest_pending(
    settings: Settings, receiver: Receiver
) -> None:
    from workers.metrics import database_families

    def samples() -> dict[tuple[str, tuple[str, ...]], float]:
        out = {}
        for family in database_families(settings):
            if family.name.startswith("sheepdog_webhook"):
                for s in family.samples:
                    out[(s.name, tuple(s.labels.values()))] = s.value
        return out

    _one_delivery(settings, receiver)
    with session_scope(settings.database_url) as session:
        session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(minutes=5)))
    before = samples()
    assert before[("sheepdog_webhook_deliveries", ("pending",))] == 1
    assert 290 < before[("sheepdog_webhook_oldest_pending_seconds", ())] < 400
    deliver_all(settings)
    after = samples()
    assert after[("sheepdog_webhook_deliveries", ("delivered",))] == 1
    assert after[("sheepdog_webhook_oldest_pending_seconds", ())] == 0
    assert after[("sheepdog_webhook_endpoints", ("enabled",))] == 1


def test_cli_manages_endpoints_and_secrets(sqlite_url: str) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(SHEEPDOG_DATABASE_URL=sqlite_url, SHEEPDOG_WEBHOOK_SECRET_KEY=new_key())
    tenant = f"cli-{uuid.uuid4().hex[:6]}"

    def run(*args: str, allow_private: bool = True) -> subprocess.CompletedProcess[str]:
        extra = {"SHEEPDOG_WEBHOOK_ALLOW_PRIVATE": "true" if allow_private else "false"}
        return subprocess.run(
            [sys.executable, "-m", "sheepdog", "webhooks", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = run("add", "--tenant", tenant, "http://127.0.0.1:9/a")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("whsec_") == 1
    second = run("add", "--tenant", tenant, "http://127.0.0.1:9/b", "--events", "batch.completed")
    assert second.returncode == 0 and "whsec_" not in second.stdout
    refused = run("add", "--tenant", tenant, "http://localhost:9/c", allow_private=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "non-public" in refused.stderr
    bad = run("add", "--tenant", tenant, "http://127.0.0.1:9/d", "--events", "nope")
    assert bad.returncode == 2 and "unknown event" in bad.stderr
    # An empty event list subscribed to everything; port 0 failed on every attempt for a day;
    # a control character in a tenant was taken.
    for args in (
        ("--tenant", tenant, "http://127.0.0.1:9/e", "--events", ""),
        ("--tenant", tenant, "http://127.0.0.1:9/f", "--events", ","),
        ("--tenant", tenant, "http://127.0.0.1:0/g"),
        ("--tenant", "bad\x1btenant", "http://127.0.0.1:9/h"),
    ):
        odd = run("add", *args)
        assert odd.returncode == 2 and odd.stderr.count("\n") == 1, (args, odd.stderr)
    listed = json.loads(run("list", "--tenant", tenant, "--json").stdout)
    assert [e["events"] for e in listed] == [["*"], ["batch.completed"]]
    rotated = run("rotate-secret", "--tenant", tenant)
    assert rotated.returncode == 0 and rotated.stdout.count("whsec_") == 1
    assert run("remove", listed[1]["id"], "--tenant", "someone-else").returncode == 2
    assert run("remove", listed[1]["id"], "--tenant", tenant).returncode == 0
    assert len(json.loads(run("list", "--tenant", tenant, "--json").stdout)) == 1
    assert json.loads(run("failed", "--tenant", tenant, "--json").stdout) == []
    missing = run("redeliver", "msg_nope")
    assert missing.returncode == 2 and "no webhook delivery" in missing.stderr
