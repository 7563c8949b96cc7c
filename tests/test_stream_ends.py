"""The stream ends a worker writes in one flush (store.finish_many), on SQLite and on
PostgreSQL (where the succeeded ones are one statement: streaming/end_rows.py): each row ends
as its claim says or is fenced, and the ledger, the budget reservation and the webhook outbox
change in the same transaction, exactly as for a single `finish`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import SecretStr
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from models.intake_message import IntakeItem
from models.status import Status
from models.tables import CostEntry, Request, Reservation
from models.webhook_tables import WebhookDelivery
from sheepdog.client import Client
from streaming import store
from streaming.end import End, TakenBack
from webhooks import endpoints
from webhooks.crypto import new_key


def hooked_requests(db_url: str, hooked: str, tenants: list[str]) -> list[IntakeItem]:
    """A stream request for each of `tenants`, after `hooked` got a webhook endpoint."""
    settings = Settings(
        database_url=db_url, webhook_secret_key=SecretStr(new_key()), webhook_allow_private=True
    )
    with session_scope(db_url) as session:
        endpoints.add_endpoint(session, settings, hooked, "http://127.0.0.1:9/hook")
    client = Client(settings)
    return [
        client.prepare(
            {
                "model": "sheepdog-mini",
                "priority": "high",
                "metadata": {"tenant": tenant},
                "messages": [{"role": "user", "content": f"end {tenant} {i}"}],
            }
        )
        for i, tenant in enumerate(tenants)
    ]


def test_one_flush_of_mixed_ends(db_url: str) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    items = hooked_requests(db_url, tenant, [tenant] * 5)
    claims = store.claim_many(db_url, {item.id: item for item in items})
    assert set(claims) == {item.id for item in items}
    paid, fenced, failed, moved_lane, unpriced = (item.id for item in items)
    with session_scope(db_url) as session:
        for rid in (paid, fenced, failed):
            session.add(Reservation(request_id=rid, tenant=tenant, amount_usd=Decimal("1")))
        lane_before = session.scalar(select(Request.lane).where(Request.id == paid))
    first = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "first_token_at": first}
    stale = claims[fenced]
    ends = {
        paid: (
            claims[paid],
            End(
                Status.SUCCEEDED, "paid", "stop", usage_estimated=True, service_tier="flex", **usage
            ),
        ),
        fenced: (
            store.Claim(stale.attempts + 1, stale.tenant, stale.model),
            End(Status.SUCCEEDED, "not mine", "stop", **usage),
        ),
        failed: (claims[failed], End(Status.FAILED, "half", error="provider said no")),
        moved_lane: (
            claims[moved_lane],
            End(Status.SUCCEEDED, "laned", "stop", lane="stream", lane_reason="deadline near"),
        ),
        unpriced: (
            store.Claim(claims[unpriced].attempts, tenant, "no-such-model"),
            End(Status.SUCCEEDED, "free", "length", **usage),
        ),
    }

    result = store.finish_many(db_url, ends)

    expected = store.stream_cost("sheepdog-mini", 10, 20, "flex")  # the tier that served it
    standard = store.stream_cost("sheepdog-mini", 10, 20, "standard")
    assert expected is not None and standard is not None and 0 < expected < standard
    assert result[paid] == expected
    assert isinstance(result[fenced], store.Fenced)
    assert result[failed] is None and result[moved_lane] is None and result[unpriced] is None
    with session_scope(db_url) as session:
        rows = {r.id: r for r in session.scalars(select(Request).where(Request.tenant == tenant))}
        ledger = {
            e.request_id: e
            for e in session.scalars(select(CostEntry).where(CostEntry.tenant == tenant))
        }
        reservations = {
            r.request_id: (r.state, r.settled_usd)
            for r in session.scalars(select(Reservation).where(Reservation.tenant == tenant))
        }
        events = sorted(
            (d.subject_id, d.event_type)
            for d in session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.tenant == tenant)
            )
        )
    assert (rows[paid].status, rows[paid].text, rows[paid].cost_usd) == (
        "succeeded",
        "paid",
        expected,
    )
    assert rows[paid].first_token_at == first and rows[paid].finished_at is not None
    assert rows[paid].prompt_tokens == 10 and rows[paid].completion_tokens == 20
    assert rows[paid].usage_estimated and rows[paid].lane == lane_before
    assert rows[paid].updated_at is not None
    assert (rows[fenced].status, rows[fenced].text) == ("streaming", None)
    assert (rows[failed].status, rows[failed].error) == ("failed", "provider said no")
    assert (rows[moved_lane].lane, rows[moved_lane].lane_reason) == ("stream", "deadline near")
    assert rows[moved_lane].status == "succeeded"
    assert rows[unpriced].status == "succeeded" and rows[unpriced].cost_usd is None
    assert set(ledger) == {paid}  # the only end with a price and usage
    entry = ledger[paid]
    assert (entry.route, entry.tier, entry.model) == ("stream", "flex", "sheepdog-mini")
    assert (entry.prompt_tokens, entry.completion_tokens, entry.estimated) == (10, 20, True)
    assert entry.cost_usd == expected and entry.standard_cost_usd == standard
    assert reservations == {
        paid: ("settled", expected),
        fenced: ("held", None),  # still the other owner's
        failed: ("released", 0),  # a failed stream spends nothing
    }
    assert events == sorted(
        [
            (paid, "request.succeeded"),
            (failed, "request.failed"),
            (moved_lane, "request.succeeded"),
            (unpriced, "request.succeeded"),
        ]
    )

    # The same ends again (a retried flush): nothing moves twice, nothing is counted twice.
    again = store.finish_many(db_url, {paid: ends[paid]})
    assert isinstance(again[paid], store.Fenced)
    with session_scope(db_url) as session:
        assert len(session.scalars(select(CostEntry).where(CostEntry.tenant == tenant)).all()) == 1


def test_a_succeeded_end_is_charged_the_answers_a_retry_took_back(db_url: str) -> None:
    """The row keeps the answer's usage; the ledger, the row's cost and the settled hold add
    what the provider billed for the attempts before it (estimated). They were free."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    (item,) = hooked_requests(db_url, "nobody", [tenant])
    claim = store.claim_many(db_url, {item.id: item})[item.id]
    with session_scope(db_url) as session:
        session.add(Reservation(request_id=item.id, tenant=tenant, amount_usd=Decimal("1")))
    end = End(
        Status.SUCCEEDED,
        "answer",
        "stop",
        prompt_tokens=10,
        completion_tokens=20,
        taken_back=TakenBack(prompt_tokens=8, completion_tokens=5),
    )
    cost = store.finish_many(db_url, {item.id: (claim, end)})[item.id]
    assert cost == store.stream_cost("sheepdog-mini", 18, 25) and cost is not None
    with session_scope(db_url) as session:
        row = session.get(Request, item.id)
        entry = session.get(CostEntry, item.id)
        hold = session.get(Reservation, item.id)
        assert row is not None and entry is not None and hold is not None
        assert (row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (10, 20, False)
        assert row.cost_usd == cost
        assert (entry.prompt_tokens, entry.completion_tokens, entry.estimated) == (18, 25, True)
        assert entry.cost_usd == cost
        assert entry.standard_cost_usd == store.stream_cost("sheepdog-mini", 18, 25, "standard")
        assert (hold.state, hold.settled_usd) == ("settled", cost)


def test_a_flush_of_tenants_with_and_without_webhooks(db_url: str) -> None:
    """The end statement itself says which moved rows' tenants have webhooks: their deliveries
    are written, the others' not, and nobody's end waits on a second query."""
    hooked, plain = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    items = hooked_requests(db_url, hooked, [hooked, plain, hooked, plain])
    claims = store.claim_many(db_url, {item.id: item for item in items})
    ends = {rid: (claim, End(Status.SUCCEEDED, "ok", "stop")) for rid, claim in claims.items()}
    result = store.finish_many(db_url, ends)
    assert set(result) == {item.id for item in items} and not any(result.values())
    with session_scope(db_url) as session:
        delivered = {
            (d.tenant, d.subject_id)
            for d in session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.tenant.in_([hooked, plain]))
            )
        }
        ended = set(session.scalars(select(Request.status).where(Request.id.in_(list(claims)))))
    assert delivered == {(hooked, items[0].id), (hooked, items[2].id)}
    assert ended == {"succeeded"}
