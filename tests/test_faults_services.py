"""Fault suite, services: Redis SIGKILLed and started again mid-run (a redis-server of this
module's own, without persistence, never the machine's 6379), and PostgreSQL stopped
(immediate: every connection cut) and started again mid-run (a throwaway cluster of this
module's own, never the machine's main one). Workers and beat keep running throughout."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from core import keys
from core.db import session_scope
from core.errors import ServiceUnavailable
from lifecycle.record import record_requests
from tests.fixtures.api import ApiServer, start_api
from tests.fixtures.faults import (
    Deployment,
    Figures,
    PgCluster,
    RedisServer,
    drop_database,
    load_rows,
    make_deployment,
    new_database,
    tally,
    wait_final,
    wait_for,
)
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def request(text: str, priority: str) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": priority,
        "max_tokens": 30,
    }


def mixed(tag: str, streams: int, low: int) -> list[dict[str, Any]]:
    return [request(f"{tag} s{i}", "high" if i % 2 else "normal") for i in range(streams)] + [
        request(f"{tag} b{i}", "low") for i in range(low)
    ]


def start_processes(dep: Deployment) -> list[Any]:
    return [
        dep.stream_worker("stream", concurrency=100),
        dep.batch_worker("batch"),
        dep.stack.start_beat(name="beat"),
    ]


def streams_showing(dep: Deployment, ids: list[str]) -> int:
    r = redis.Redis.from_url(dep.settings.redis_url)
    with r.pipeline(transaction=False) as pipe:
        for rid in ids:
            pipe.exists(keys.of(dep.settings).replay_log(rid))
        return sum(pipe.execute())


class FollowedThroughTheDoor:
    """Streams followed by sheepdog-client, one thread each: each text as it ended."""

    def __init__(self, door: ApiServer, ids: list[str]) -> None:
        self._key = door.key("default")
        self._url = door.url
        self._texts: dict[str, str | BaseException] = {}
        self._threads = [threading.Thread(target=self._follow, args=(rid,)) for rid in ids]
        for t in self._threads:
            t.start()

    def _follow(self, rid: str) -> None:
        from sheepdog_client import Client as DoorClient

        try:
            with DoorClient(self._url, api_key=self._key, max_reconnects=20) as door:
                self._texts[rid] = door.stream(rid, timeout=90).final_text()
        except BaseException as err:  # shown by texts()
            self._texts[rid] = err

    def texts(self, timeout: float) -> dict[str, str | BaseException]:
        for t in self._threads:
            t.join(timeout)
        return dict(self._texts)


def test_redis_killed_and_restarted_mid_run(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    tag = f"redis {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 60}])  # streams in flight at the kill
    procs = start_processes(dep)
    client = dep.client()
    api = contextlib.ExitStack()
    try:
        door = api.enter_context(start_api(dep.stack))
        ids = client.submit_many(mixed(tag, 30, 200))
        streams = ids[:30]
        # Five of the streams followed through the front door's event streams as well.
        followed = FollowedThroughTheDoor(door, streams[:5])
        # Wait until every request is in the database (intake done, streams claimed) and the
        # streams are showing text: then the kill takes queues, unacked messages, locks and
        # replay logs, and leaves the database.
        wait_for(lambda: len(load_rows(settings, ids)) == len(ids), 30, "all rows recorded")
        wait_for(lambda: streams_showing(dep, streams) >= 20, 30, "streams in flight")
        # Stream rows queued whose only message is in Redis (as after a janitor requeue).
        orphans = [client.prepare(request(f"{tag} lost{i}", "high")) for i in range(10)]
        with session_scope(settings.database_url) as session:
            record_requests(session, orphans)
        dep.redis_server.kill()
        with pytest.raises(ServiceUnavailable):  # refused, not accepted and dropped
            client.submit(request(f"{tag} during", "high"))
        time.sleep(1)
        dep.redis_server.start()  # same port, empty
        after = client.submit_many(mixed(f"{tag} after", 10, 20))  # and work goes on
        everything = ids + [o.id for o in orphans] + after
        wait_final(settings, everything, 90)
        assert all(p.alive() for p in procs)
        texts = followed.texts(60)
        door_log = door.proc.log_text()
    finally:
        api.close()
        for p in procs:
            p.stop()
    rows = load_rows(settings, streams[:5])
    assert texts == {rid: rows[rid].text for rid in streams[:5]}  # resumed through the loss
    assert "unexpected error" not in door_log and "Traceback" not in door_log, door_log[-3000:]
    t = tally(settings, everything)
    checked = check_invariants(settings, everything)
    fault_figures.record(
        "Redis SIGKILLed and restarted empty, after every row was recorded",
        t,
        "30 streams + 200 batch in flight, 10 queued"
        " stream rows resent by the janitor, 30 submitted after",
        garbled=checked.garbled,
    )
    assert t.succeeded == len(everything) and t.lost == 0, t


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_deployment(
    pg_cluster: PgCluster, fault_redis: RedisServer, simulator: Any, tmp_path: Any
) -> Iterator[Deployment]:
    db = new_database(pg_cluster.admin_url)
    # Redis DB 1: the janitor's and the flush's locks are not shared with the Redis test's.
    dep = make_deployment(tmp_path, fault_redis, db, simulator)
    dep.env["SHEEPDOG_REDIS_URL"] = fault_redis.url(1)
    yield dep
    dep.stack.stop_all()
    drop_database(pg_cluster.admin_url, db)


def test_postgres_stopped_and_started_mid_run(
    pg_cluster: PgCluster, pg_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = pg_deployment
    settings = dep.settings
    tag = f"pg {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 60}])
    procs = start_processes(dep)
    client = dep.client()
    try:
        ids = client.submit_many(mixed(tag, 30, 200))
        wait_for(lambda: len(load_rows(settings, ids)) == len(ids), 30, "all rows recorded")
        wait_for(lambda: streams_showing(dep, ids[:30]) >= 20, 30, "streams in flight")
        pg_cluster.stop("immediate")  # every connection cut, as in a crash
        # Refused while the database is down: a request's row is its first durable copy, so
        # submit cannot hand out ids it has no row for (stream messages it sent are cancelled).
        with pytest.raises(ServiceUnavailable, match="database"):
            client.submit_many(mixed(f"{tag} during", 10, 20))
        time.sleep(3)
        pg_cluster.start()
        during = client.submit_many(mixed(f"{tag} after", 10, 20))
        everything = ids + during
        wait_final(settings, everything, 90)
        assert all(p.alive() for p in procs)
    finally:
        for p in procs:
            p.stop()
    t = tally(settings, everything)
    checked = check_invariants(settings, everything)
    fault_figures.record(
        "PostgreSQL stopped (immediate) and restarted",
        t,
        "30 streams + 200 batch in flight; submit refused while it was down, 30 after",
        garbled=checked.garbled,
    )
    assert t.succeeded == len(everything) and t.lost == 0, t
