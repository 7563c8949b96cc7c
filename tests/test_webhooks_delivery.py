"""Webhook delivery on the plain functions, on SQLite and PostgreSQL, with a real HTTP
receiver: retries with the same webhook-id, leases, the slots of an endpoint and of a tenant,
410 and expiry, a receiver's odd answers, and the address rules at registration and delivery."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core.db import session_scope
from core.errors import InvalidRequest
from core.settings import Settings
from lifecycle.moves import move
from models.status import Status
from models.tables import utcnow
from models.webhook_tables import WebhookDelivery
from rules.admission import parse_request
from tests.fixtures.batch import add_requests
from tests.fixtures.webhooks import (
    Receiver,
    deliver_all,
    deliveries,
    make_due,
    one_delivery,
    register,
)
from webhooks import endpoints
from webhooks.delivery import claim, deliver_target, due_targets

MODEL = "sheepdog-mini"


@pytest.fixture
def settings(webhook_settings: Settings) -> Settings:
    return webhook_settings


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
    one_delivery(settings, receiver)
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
    one_delivery(settings, receiver)
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
    tenant = one_delivery(settings, receiver)
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
    one_delivery(settings, receiver)  # registered while private addresses were allowed
    strict = settings.model_copy(update={"webhook_allow_private": False})
    deliver_all(strict)
    (row,) = deliveries(settings)
    assert row.status == "dead" and "non-public" in (row.last_error or "")
    assert receiver.attempts == {}
