"""Webhooks end to end: real Celery workers (a `webhooks` worker of its own), beat, Redis,
PostgreSQL, the simulator, and real HTTP receivers started here that verify every message with
the independent `standardwebhooks` package and handle each webhook-id once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings, get_settings
from models.idempotency import scope
from models.webhook_tables import WebhookDelivery
from sheepdog.client import Client
from tests.fixtures.webhooks import Receiver
from tests.fixtures.workers import Proc, Stack
from webhooks import endpoints
from webhooks.crypto import new_key

MODEL = "sheepdog-mini"
HOOK_ENV = {
    "SHEEPDOG_WEBHOOK_SECRET_KEY": new_key(),
    "SHEEPDOG_WEBHOOK_ALLOW_PRIVATE": "true",
    "SHEEPDOG_WEBHOOK_TIMEOUT_S": "1",
    "SHEEPDOG_WEBHOOK_BACKOFF_BASE_S": "0.5",
    "SHEEPDOG_WEBHOOK_BACKOFF_MAX_S": "3",
    "SHEEPDOG_WEBHOOK_SWEEP_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="module")
def hooks(stack: Stack) -> Iterator[dict[str, Proc]]:
    stack.env.update(HOOK_ENV)
    procs = {
        "main": stack.start_worker(queues="stream,default,batch", concurrency=50, name="main"),
        "hooks": stack.start_worker(queues="webhooks", concurrency=8, name="hooks"),
        "beat": stack.start_beat(),
    }
    yield procs


@pytest.fixture
def client(
    stack: Stack, hooks: dict[str, Proc], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Client]:
    for key, value in stack.env.items():
        if key.startswith("SHEEPDOG_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield Client(Settings())
    get_settings.cache_clear()


def register(client: Client, receiver: Receiver, events: list[str] | None = None) -> str:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope(client.settings.database_url) as session:
        added = endpoints.add_endpoint(session, client.settings, tenant, receiver.url, events)
    receiver.secret = added.secret
    return tenant


def ask(tenant: str, priority: str = "high", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex[:6]}"}],
        "priority": priority,
        "max_tokens": 20,
        "metadata": {"tenant": tenant},
        **extra,
    }


def ended(client: Client, ids: list[str], wait: float = 60) -> None:
    for rid in ids:
        view = client.result(rid, wait=wait)
        assert view.is_final, view


def by_request(receiver: Receiver) -> dict[str, dict[str, Any]]:
    return {e["data"]["id"]: e for e in receiver.events() if e["type"].startswith("request.")}


def recorded_outcomes(client: Client, tenant: str, wait: float = 10) -> dict[str, tuple[str, int]]:
    """webhook-id -> (status, attempts) once no row of the tenant is still `pending`.

    A receiver handles an event before it answers, and the sender records the 2xx only after
    the answer (and after the rest of its claimed batch), so a row can be `pending` for a
    moment after the receiver has it."""
    deadline = time.monotonic() + wait
    while True:
        with session_scope(client.settings.database_url) as session:
            rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.tenant == tenant))
            outcomes = {r.webhook_id: (r.status, r.attempts) for r in rows}
        if all(s != "pending" for s, _ in outcomes.values()) or time.monotonic() > deadline:
            return outcomes
        time.sleep(0.05)


def test_stream_batch_and_cancelled_requests_deliver(client: Client, receiver: Receiver) -> None:
    tenant = register(client, receiver)
    streamed = client.submit(ask(tenant, "high"))
    batched = client.submit(ask(tenant, "low"))
    cancelled = client.submit(ask(tenant, "low", max_tokens=21))
    # A key as the front door stores a tenant's: the payload shows it as the tenant gave it.
    given = f"order-{uuid.uuid4().hex[:8]}"
    keyed = client.submit(ask(tenant, "high", idempotency_key=scope(tenant) + given))
    deadline = time.monotonic() + 30
    while client.get(cancelled) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.cancel(cancelled)
    ended(client, [streamed, batched, cancelled, keyed])
    receiver.wait_for(5, timeout=60)  # four request events and the batch job's
    got = by_request(receiver)
    assert got[keyed]["data"]["idempotency_key"] == given, got[keyed]["data"]
    for rid, kind in ((streamed, "succeeded"), (batched, "succeeded"), (cancelled, "cancelled")):
        assert got[rid]["type"] == f"request.{kind}", (got.get(rid), client.get(rid))
        assert got[rid]["data"] == client.get(rid).model_dump(mode="json")  # type: ignore[union-attr]
    assert got[streamed]["data"]["route"] == "stream" and got[batched]["data"]["route"] == "batch"
    (job,) = [e for e in receiver.events() if e["type"] == "batch.completed"]
    assert batched in job["data"]["succeeded_ids"]
    assert receiver.bad_signatures == 0


def test_a_receiver_down_for_30s_gets_every_event_once(client: Client, receiver: Receiver) -> None:
    tenant = register(client, receiver)
    receiver.stop()  # connection refused from now on
    ids = client.submit_many([ask(tenant) for _ in range(5)])
    ended(client, ids)
    time.sleep(30)
    receiver.start()  # the same port
    events = receiver.wait_for(5, timeout=30)
    assert sorted(e["data"]["id"] for e in events) == sorted(ids)
    assert len(receiver.handled) == 5  # one webhook-id per event, whatever the attempts
    attempts = recorded_outcomes(client, tenant)
    assert set(attempts) == set(receiver.handled)
    assert all(status == "delivered" for status, _ in attempts.values()), attempts
    assert min(n for _, n in attempts.values()) > 1, attempts  # each was retried


def test_delivery_worker_killed_mid_delivery_loses_nothing(
    stack: Stack, hooks: dict[str, Proc], client: Client, receiver: Receiver
) -> None:
    tenant = register(client, receiver)
    receiver.hang_s = 0.8  # answers, slowly (within the 1 s timeout)
    ids = client.submit_many([ask(tenant) for _ in range(4)])
    ended(client, ids)
    deadline = time.monotonic() + 30
    while not receiver.attempts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.attempts, "no delivery started"
    hooks["hooks"].kill()  # SIGKILL, a delivery in flight
    receiver.hang_s = 0
    hooks["hooks"] = stack.start_worker(queues="webhooks", concurrency=8, name="hooks2")
    events = receiver.wait_for(4, timeout=60)  # after the dead worker's leases lapse
    assert sorted(e["data"]["id"] for e in events) == sorted(ids)
    # The one in flight reached the receiver (which counts it handled) but its sender died
    # before the answer: it is sent again, same id, once its lease lapses — which can be after
    # the other three have arrived.
    deadline = time.monotonic() + 60
    while max(receiver.attempts.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert max(receiver.attempts.values()) >= 2, receiver.attempts


def test_a_hanging_receiver_does_not_delay_another_tenant(
    client: Client, receiver: Receiver
) -> None:
    slow = Receiver()
    slow.hang_s = 20  # never answers within the timeout
    slow.start()
    try:
        slow_tenant = register(client, slow)
        fast_tenant = register(client, receiver)
        slow_ids = client.submit_many([ask(slow_tenant) for _ in range(6)])
        ended(client, slow_ids)
        fast_ids = client.submit_many([ask(fast_tenant) for _ in range(3)])
        ended(client, fast_ids)
        events = receiver.wait_for(3, timeout=30)
        assert sorted(e["data"]["id"] for e in events) == sorted(fast_ids)
        assert slow.handled == {}  # still hanging while the other tenant got everything
        assert slow.attempts  # and it was being tried
    finally:
        slow.hang_s = 0
        slow.stop()
