"""Fault suite, the edges the first suite missed: values the tables cannot hold (refused at the
edge, or failed alone at intake), and a stream worker stopped (SIGSTOP) until the janitor has
given its streams to another, then continued: its publishes are fenced as its row writes are.
Real worker and beat processes, a redis-server and a PostgreSQL database of this module's own,
the simulator."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest
import redis

from core import keys
from core.errors import InvalidRequest
from tests.fixtures.ends import assert_all_ended, assert_ended
from tests.fixtures.faults import Deployment, Figures, load_rows, tally, wait_final, wait_for
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def request(text: str, priority: str = "high", **extra: Any) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": priority,
        "max_tokens": 30,
        **extra,
    }


def queued_messages(dep: Deployment) -> int:
    """Messages waiting in the deployment's Celery queues (Redis lists under its prefix)."""
    r = redis.Redis.from_url(dep.settings.redis_url)
    prefix = dep.env["SHEEPDOG_BROKER_PREFIX"]
    return sum(int(r.llen(name)) for name in r.scan_iter(f"{prefix}*") if r.type(name) == b"list")


# Each passed validation before, and was then lost with its whole intake message (or claim).
UNSTORABLE_AT_THE_EDGE = [
    ("metadata: tenant is 101 characters", {"metadata": {"tenant": "t" * 101}}),
    ("max_cost_usd", {"max_cost_usd": "1e10"}),
    ("max_cost_usd", {"max_cost_usd": "1e30"}),
    ("max_cost_usd", {"max_cost_usd": "9999999999.99999999999"}),  # rounds up to 1e10
    ("deadline", {"deadline": "9999-12-31T23:59:59-12:00"}),
    ("metadata: tenant must be printable text", {"metadata": {"tenant": "a\x00b"}}),
    ("idempotency_key: idempotency_key contains a NUL", {"idempotency_key": "k\x00"}),
]


def test_values_the_tables_cannot_hold(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    client = dep.client()
    run = uuid.uuid4().hex[:8]
    # At the edge: one clear line, nothing enqueued (no worker runs yet to take anything).
    before = queued_messages(dep)
    for field_name, bad in UNSTORABLE_AT_THE_EDGE:
        for priority in ("low", "high"):
            with pytest.raises(InvalidRequest) as err:
                client.submit_many(
                    [request(f"ok {run}", priority), request(f"bad {run}", priority, **bad)]
                )
            text = str(err.value)
            assert "\n" not in text and field_name in text, text
    assert queued_messages(dep) == before
    # Past the edge: a row the database still refuses (a link to a document that does not
    # exist) fails alone with its reason, in the intake bulk and in the stream claims; its
    # idempotency key names that failed row, not a lost id.
    broken = {"metadata": {"tenant": "documents", "document_id": "987654321"}}
    low = [request(f"low {run} {i}", "low") for i in range(20)]
    low.insert(7, request(f"low bad {run}", "low", idempotency_key=f"lowbad-{run}", **broken))
    high = [request(f"high {run} {i}") for i in range(10)]
    high.insert(3, request(f"high bad {run}", idempotency_key=f"highbad-{run}", **broken))
    procs = [
        dep.stream_worker("edges"),
        dep.batch_worker("edges-batch"),
        dep.stack.start_beat(name="edges-beat"),
    ]
    try:
        low_ids = client.submit_many(low)
        high_ids = client.submit_many(high)
        everything = low_ids + high_ids
        rows = wait_final(settings, everything, 90)
    finally:
        for p in procs:
            p.stop()
    bad_ids = {low_ids[7], high_ids[3]}
    for rid in bad_ids:
        assert_ended(rows[rid], "failed")
        assert "could not be stored" in (rows[rid].error or ""), rows[rid].error
    assert_all_ended([rows[rid] for rid in everything if rid not in bad_ids])
    # The key still answers with the id it gave, and that id has its failed row.
    again = client.submit_many([low[7], high[3]])
    assert again == [low_ids[7], high_ids[3]]
    assert all(client.get(rid) is not None for rid in again)
    t = tally(settings, everything)
    checked = check_invariants(settings, everything)
    fault_figures.record(
        "a row the database refuses (broken document link) in an intake bulk and a stream claim",
        t,
        "21 low in one intake message + 11 high; the refused row fails alone with its reason",
        garbled=checked.garbled,
    )
    assert t.lost == 0 and t.failed == 2, t


def test_stopped_stream_worker_cannot_garble_what_followers_see(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """SIGSTOP a stream worker with 40 streams in flight until the janitor has given them all to
    another worker, then SIGCONT it: with a long idle limit it still holds its provider streams
    and sends what it buffered. Redis must refuse every message of the superseded attempts: no
    seq reused, nothing after `done`, and each follower's text is the row's."""
    dep = fault_deployment
    settings = dep.settings
    tag = f"sigstop {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 100}])
    stale = dep.stream_worker("stale", SHEEPDOG_STREAM_IDLE_TIMEOUT_S="120")
    client = dep.client()
    r = redis.Redis.from_url(settings.redis_url)
    ids = client.submit_many([request(f"{tag} #{i}", max_tokens=60) for i in range(40)])

    def shown() -> int:
        with r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.exists(keys.of(settings).replay_log(rid))
            return sum(pipe.execute())

    wait_for(lambda: shown() == len(ids), 60, "40 streams showing text")
    stale.signal_all(signal.SIGSTOP)  # the worker and its stream engine
    stopped_at = time.monotonic()
    heir = dep.stream_worker("heir")
    beat = dep.stack.start_beat(name="sigstop-beat")
    followers: dict[str, str] = {}
    try:
        wait_for(
            lambda: all(row.attempts >= 1 for row in load_rows(settings, ids).values()),
            60,
            "the janitor to take every stream back",
        )
        stale.signal_all(signal.SIGCONT)
        rows = wait_final(settings, ids, 120)
        stuck = time.monotonic() - stopped_at
        time.sleep(3)  # the continued worker sends what it buffered, then finds its rows gone
        for rid in ids:
            # A follower drops what it showed on `reset` (the janitor's take-over restarts
            # each answer): `text` is what it shows at the end.
            stream = client.stream(rid, timeout=20)
            for _ in stream:
                pass
            followers[rid] = stream.text  # type: ignore[attr-defined]
    finally:
        stale.signal_all(signal.SIGCONT)
        beat.stop()
        heir.stop()
        stale.stop()
    t = tally(settings, ids)
    checked = check_invariants(settings, ids, followers)
    fault_figures.record(
        "stream worker SIGSTOPped past the heartbeat timeout, then continued",
        t,
        "40 streams; idle limit 120 s on the stopped worker; its publishes fenced by attempts",
        garbled=checked.garbled,
        stuck_s=stuck,
    )
    assert t.lost == 0 and t.succeeded == len(ids), t
    assert all(rows[rid].attempts >= 1 for rid in ids)
