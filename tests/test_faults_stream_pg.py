"""Fault suite, streaming path: PostgreSQL stopped (immediate) with streams in flight, for longer
than the heartbeat timeout and the writer's retry window, then started again. Ends and claims
that fall into the outage fail; nothing may stay `streaming`: every request ends succeeded, or
failed with a reason, and the worker keeps serving afterwards. A throwaway cluster of this
module's own (never the machine's main one), a redis-server of the module's own, real worker
and beat processes, the simulator with slow chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from core import keys
from core.errors import ServiceUnavailable
from tests.fixtures.faults import (
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

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

OUTAGE_S = 6.0  # > heartbeat timeout (2 s) and the writer's retry window (4 s) of FAST_ENV


def request(text: str) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": "high",
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster()
    pg.start()
    yield pg
    pg.destroy()


def test_streams_in_flight_through_a_postgres_outage_all_end(
    cluster: PgCluster,
    fault_redis: RedisServer,
    simulator: Any,
    tmp_path: Any,
    fault_figures: Figures,
) -> None:
    db = new_database(cluster.admin_url)
    dep = make_deployment(tmp_path, fault_redis, db, simulator)
    dep.env["SHEEPDOG_REDIS_URL"] = fault_redis.url(2)  # locks not shared with other modules
    settings = dep.settings
    tag = f"pgout {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 80}])  # 1.6-4.8 s a stream
    worker = dep.stream_worker("pg-outage", concurrency=100)
    beat = dep.stack.start_beat(name="pg-outage-beat")
    client = dep.client()
    r = redis.Redis.from_url(settings.redis_url)

    def showing(ids: list[str]) -> int:
        with r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.exists(keys.of(settings).replay_log(rid))
            return sum(pipe.execute())

    try:
        ids = client.submit_many([request(f"{tag} #{i}") for i in range(40)])
        wait_for(lambda: showing(ids) >= 30, 30, "streams in flight")
        cluster.stop("immediate")  # every connection cut, as in a crash
        # Refused while the database is down (a request's row is its first durable copy).
        with pytest.raises(ServiceUnavailable, match="database"):
            client.submit_many([request(f"{tag} during {i}") for i in range(10)])
        time.sleep(OUTAGE_S)  # streams end meanwhile: their ends cannot be written
        cluster.start()
        during = client.submit_many([request(f"{tag} during {i}") for i in range(10)])
        rows = wait_final(settings, ids + during, 90)
        # The worker's writer and heartbeat came through: new work still flows.
        after = client.submit_many([request(f"{tag} after {i}") for i in range(10)])
        wait_final(settings, after, 60)
        assert worker.alive()
        log = worker.log_text()
    finally:
        beat.stop()
        worker.stop()
        simulator.set_faults([])
    everything = ids + during + after
    t = tally(settings, everything)
    fault_figures.record(
        "PostgreSQL stopped 6 s (past heartbeat timeout) under 40 streams",
        t,
        "40 streams in flight, submit refused during it, 10 + 10 after; ends lost in the outage "
        "re-streamed by the janitor",
    )
    assert t.lost == 0, t
    assert not [
        rid for rid, row in load_rows(settings, everything).items() if row.status == "streaming"
    ]
    assert all(row.error for row in rows.values() if row.status == "failed")
    assert "Task exception was never retrieved" not in log
    check_invariants(settings, everything)
    drop_database(cluster.admin_url, db)
