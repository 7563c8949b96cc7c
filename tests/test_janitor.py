"""The janitor: dead stream workers are found by heartbeat and their requests finished."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core import keys
from core.db import session_scope
from lifecycle.moves import move
from lifecycle.record import record_requests
from models.status import Status
from models.tables import Request, utcnow
from streaming.janitor import sweep
from streaming.subscriber import RESET, StreamFailed, events, stream_text
from tests.fixtures.ends import assert_ended
from tests.fixtures.streaming import StreamDeployment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def deployment(stream_deployment: StreamDeployment) -> StreamDeployment:
    return stream_deployment


@pytest.fixture
def client(deployment: StreamDeployment) -> Any:
    return deployment.client()


def body(tag: str) -> dict[str, Any]:
    return {"model": "sheepdog-mini", "messages": [{"role": "user", "content": tag}]}


def read(deployment: StreamDeployment, request_id: str) -> Request:
    with session_scope(deployment.settings.database_url) as session:
        row = session.scalar(select(Request).where(Request.id == request_id))
        assert row is not None
        return row


def stale_row(deployment: StreamDeployment, client: Any, attempts: int = 0) -> str:
    """A stream request left `streaming` by a worker that died 10 s ago."""
    item = client.prepare(body(f"stale {uuid.uuid4().hex}"))
    long_ago = utcnow() - timedelta(seconds=10)
    with session_scope(deployment.settings.database_url) as session:
        record_requests(session, [item])
        assert move(session, item.id, Status.STREAMING, heartbeat_at=long_ago, attempts=attempts)
    return str(item.id)


def direct_answer(simulator: Any, request_body: dict[str, Any]) -> str:
    from openai import OpenAI

    sdk = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0)
    try:
        return sdk.chat.completions.create(**request_body).choices[0].message.content or ""
    finally:
        sdk.close()


def test_killed_worker_is_replaced_and_the_stream_completes(
    deployment: StreamDeployment, client: Any, simulator: Any, stack: Any
):
    tag = f"kill {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 100}])
    doomed = stack.start_worker(queues="stream", concurrency=20, env=deployment.env, name="doomed")
    rid = client.submit({**body(tag), "priority": "high"})
    stream = stream_text(rid, timeout=60, settings=deployment.settings)
    seen = [next(stream) for _ in range(3)]
    assert all(seen)
    doomed.kill()  # SIGKILL mid-stream: no chance to clean up
    assert read(deployment, rid).status == "streaming"
    heir = stack.start_worker(
        queues="stream,default", concurrency=20, env=deployment.env, name="heir"
    )
    beat = stack.start_beat(env=deployment.env, name="janitor-beat")
    try:
        rest = list(stream)  # the janitor notices the silence, resets, and the heir finishes
    finally:
        beat.stop()
        heir.stop()
    assert RESET in rest
    row = read(deployment, rid)
    assert_ended(row)
    assert row.attempts == 1
    assert stream.text == row.text == direct_answer(simulator, row.body)
    msgs = list(events(rid, timeout=5, settings=deployment.settings))
    assert [m.seq for m in msgs] == list(range(len(msgs)))


@pytest.fixture
def worker(deployment: StreamDeployment, stack: Any) -> Iterator[Any]:
    proc = stack.start_worker(queues="stream", concurrency=20, env=deployment.env, name="sweeper")
    yield proc
    proc.stop()


def test_two_janitors_at_once_requeue_once(
    deployment: StreamDeployment, client: Any, worker: Any, simulator: Any
):
    rid = stale_row(deployment, client)
    reports = []
    runs = [
        threading.Thread(target=lambda: reports.append(sweep(deployment.settings, client.celery)))
        for _ in range(2)
    ]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    again = sweep(deployment.settings, client.celery)  # and once more, later
    assert sum(r.requeued for r in [*reports, again]) == 1
    view = client.result(rid, wait=30)
    assert_ended(view)
    assert view.attempts == 1
    msgs = list(events(rid, timeout=5, settings=deployment.settings))
    assert [m.type for m in msgs].count("reset") == 1
    assert view.text == direct_answer(simulator, read(deployment, rid).body)


def test_past_max_attempts_fails_with_reason(deployment: StreamDeployment, client: Any):
    rid = stale_row(deployment, client, attempts=deployment.settings.stream_max_attempts - 1)
    assert sweep(deployment.settings, client.celery).failed >= 1
    row = read(deployment, rid)
    assert row.status == "failed" and "worker lost" in (row.error or "")
    with pytest.raises(StreamFailed, match="worker lost"):
        list(stream_text(rid, timeout=5, settings=deployment.settings))


def test_past_max_attempts_is_charged_what_its_workers_sent(
    deployment: StreamDeployment, client: Any
):
    """The workers it lost sent text the provider billed (its replay log: two calls, three
    pieces); the failed row was charged nothing, and its hold was released."""
    from models.stream_message import encode
    from models.tables import CostEntry
    from rules.tokens import count_message_tokens
    from streaming.publisher import FIELD

    rid = stale_row(deployment, client, attempts=deployment.settings.stream_max_attempts - 1)
    log_key = keys.of(deployment.settings).replay_log(rid)
    for seq, kind in enumerate(["token", "token", "reset", "token"]):
        text = "x" if kind == "token" else None
        deployment.redis.xadd(log_key, {FIELD: encode(rid, seq, kind, text=text)})
    assert sweep(deployment.settings, client.celery).failed >= 1
    row = read(deployment, rid)
    assert row.status == "failed" and "worker lost" in (row.error or "")
    prompt = count_message_tokens(row.body["messages"])
    assert (row.prompt_tokens, row.completion_tokens) == (2 * prompt, 3) and row.usage_estimated
    with session_scope(deployment.settings.database_url) as session:
        entry = session.get(CostEntry, rid)
        assert entry is not None and entry.cost_usd == row.cost_usd and entry.estimated
    with pytest.raises(StreamFailed, match="worker lost"):
        list(stream_text(rid, timeout=5, settings=deployment.settings))


def test_fresh_heartbeat_is_left_alone(deployment: StreamDeployment, client: Any):
    rid = stale_row(deployment, client)
    with session_scope(deployment.settings.database_url) as session:
        session.execute(update(Request).where(Request.id == rid).values(heartbeat_at=utcnow()))
    sweep(deployment.settings, client.celery)
    assert read(deployment, rid).status == "streaming"
    with session_scope(deployment.settings.database_url) as session:  # tidy: end it
        move(session, rid, Status.FAILED, error="test over")


def test_lost_queued_message_is_resent_once(deployment: StreamDeployment, client: Any, worker: Any):
    item = client.prepare(body(f"lost {uuid.uuid4().hex}"))
    with session_scope(deployment.settings.database_url) as session:
        record_requests(session, [item])  # recorded, but its message never reached a worker
        session.execute(
            update(Request)
            .where(Request.id == item.id)
            .values(updated_at=utcnow() - timedelta(seconds=10))
        )
    first = sweep(deployment.settings, client.celery)
    second = sweep(deployment.settings, client.celery)
    assert first.resent >= 1 and second.resent == 0
    assert_ended(client.result(item.id, wait=30))


def test_cancel_of_a_queued_batch_row_is_immediate(deployment: StreamDeployment, client: Any):
    item = client.prepare({**body(f"low {uuid.uuid4().hex}"), "priority": "low"})
    assert item.route == "batch"
    with session_scope(deployment.settings.database_url) as session:
        record_requests(session, [item])
    started = time.monotonic()
    assert client.cancel(item.id) is True
    assert read(deployment, item.id).status == "cancelled"
    assert time.monotonic() - started < 30


def test_cancel_of_a_batched_row_says_it_is_in_a_batch(deployment: StreamDeployment, client: Any):
    """A provider has a batched request (a batch is cancelled whole or not at all): the cancel
    says so and changes nothing; it used to answer `cancelled` while the row went on to
    succeed and be billed."""
    item = client.prepare({**body(f"low {uuid.uuid4().hex}"), "priority": "low"})
    with session_scope(deployment.settings.database_url) as session:
        record_requests(session, [item])
    with session_scope(deployment.settings.database_url) as session:
        assert move(session, item.id, Status.BATCHED, from_=[Status.QUEUED])
    assert client.cancel_outcome(item.id) == "in a batch"
    assert client.cancel(item.id) is False
    assert read(deployment, item.id).status == "batched"
