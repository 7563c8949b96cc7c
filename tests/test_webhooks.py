"""Webhooks on the plain functions, on SQLite and PostgreSQL, with a real HTTP receiver: the
outbox written in the end's transaction (batch ingest bulk path included), signatures checked
by the independent `standardwebhooks` package, rotation, a request's own URL, metrics and the
CLI. Delivery itself (retries, leases, slots, addresses): tests/test_webhooks_delivery.py."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sheepdog_client import WebhookVerificationError, verify_webhook
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook

from core.db import session_scope
from core.errors import InvalidRequest
from core.settings import Settings
from lifecycle.moves import move
from models.status import Status
from models.tables import utcnow
from models.webhook_tables import WebhookDelivery
from tests.fixtures.batch import add_requests, drive
from tests.fixtures.webhooks import (
    Receiver,
    deliver_all,
    deliveries,
    one_delivery,
    register,
)
from webhooks import endpoints
from webhooks.crypto import new_key
from webhooks.delivery import signing_secrets

MODEL = "sheepdog-mini"


@pytest.fixture
def settings(webhook_settings: Settings) -> Settings:
    return webhook_settings


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
    tenant = one_delivery(settings, receiver)
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

    one_delivery(settings, receiver)
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
