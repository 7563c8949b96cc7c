"""The streaming claim (store.claim_many) on a real PostgreSQL database, in both statement
orders: every kind of request in one batch gets the one right answer, and a producer's row
committed while the claim's insert waits on it is still claimed."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from core.db import get_engine, session_scope
from lifecycle.moves import move
from lifecycle.record import record_requests
from models.status import Status
from streaming import store
from tests.test_stream_writer import intake, status

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("rows_first", [True, False])
def test_every_kind_of_request_in_one_batch(pg_url: str, rows_first: bool) -> None:
    queued, new, ended, id_only, missing = intake(pg_url, 5)
    with session_scope(pg_url) as session:
        record_requests(session, [queued, ended, id_only])
        move(session, ended.id, Status.FAILED, error="ended before")

    claims = store.claim_many(
        pg_url,
        {
            queued.id: queued,  # the producer's row: moved
            new.id: new,  # no row yet: inserted streaming
            ended.id: ended,  # a redelivery of an ended request: not claimed
            id_only.id: None,  # an id-only message whose row is queued: moved
            missing.id: None,  # an id-only message without a row: nothing to claim
        },
        rows_first=rows_first,
    )

    assert set(claims) == {queued.id, new.id, id_only.id}
    assert all(c.attempts == 0 and c.fresh and c.tenant and c.model for c in claims.values())
    assert [status(pg_url, r.id) for r in (queued, new, ended, id_only)] == [
        "streaming",
        "streaming",
        "failed",
        "streaming",
    ]
    # Claimed once: the same batch again finds nothing queued.
    again = store.claim_many(pg_url, {queued.id: queued, new.id: new}, rows_first=rows_first)
    assert again == {}


def waiting_on_lock(pg_url: str, timeout_s: float = 20.0) -> None:
    """Return once a session of this database waits on a lock (else fail)."""
    deadline = time.monotonic() + timeout_s
    with get_engine(pg_url).connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
            conn.rollback()  # a fresh snapshot of the activity view each time
            if waiting:
                return
            time.sleep(0.01)
    pytest.fail("the claim never waited on the producer's uncommitted row")


@pytest.mark.parametrize("rows_first", [True, False])
def test_a_row_committed_while_the_insert_waits_is_claimed(pg_url: str, rows_first: bool) -> None:
    """The producer sends the message, then writes its row: the claim's move finds no row,
    its insert conflicts with the producer's uncommitted one and waits; once that commits,
    the claim must still own the request (not leave it queued with no worker)."""
    item = intake(pg_url, 1)[0]
    with Session(get_engine(pg_url)) as producer:
        record_requests(producer, [item])  # in the producer's open transaction
        result: dict[str, store.Claim] = {}
        claiming = threading.Thread(
            target=lambda: result.update(
                store.claim_many(pg_url, {item.id: item}, rows_first=rows_first)
            )
        )
        claiming.start()
        waiting_on_lock(pg_url)  # the claim's insert now waits on the producer's row
        producer.commit()
        claiming.join(10)
    assert item.id in result and result[item.id].attempts == 0
    assert status(pg_url, item.id) == "streaming"
