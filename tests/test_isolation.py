"""Two deployments on ONE Redis database (prefixes `...a:` and `...b:`), each with its own
PostgreSQL database, real worker and beat: A's provider has no Batch API, B's has one, both are
the implicit provider `default`. Nothing of one reaches the other: the batch-mode cache, the
queued-low counter and its threshold flush, cancels, follows, locks and rate limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import select

from batch.jobs import job_lock, unlock
from core import keys
from core.db import session_scope
from core.ratelimit import RateLimiter, RateLimits
from core.settings import Settings
from models.tables import BatchJob
from sheepdog.client import Client
from streaming.janitor import sweep
from streaming.subscriber import StreamTimeout, stream_text
from tests.fixtures.pg import create_database, drop_database
from tests.fixtures.simulator import start_simulator

MINI = "sheepdog-mini"
THRESHOLD = 100


@dataclass
class Side:
    """One deployment: its settings, client and simulator."""

    name: str
    settings: Settings
    client: Client
    sim: Any

    @property
    def names(self) -> keys.Keys:
        return keys.of(self.settings)


@pytest.fixture(scope="module")
def relay() -> Iterator[Any]:
    """A's provider: no Batch API."""
    with start_simulator(no_batch_api=True, api_key="sk-relay", time_scale=1000) as sim:
        yield sim


@pytest.fixture(scope="module")
def sides(stack: Any, simulator: Any, relay: Any, redis_url: str) -> Iterator[tuple[Side, Side]]:
    databases = [create_database("sheepdog_iso"), create_database("sheepdog_iso")]
    made: list[Side] = []
    try:
        for name, sim, db in (("a", relay, databases[0]), ("b", simulator, databases[1])):
            prefix = f"{stack.env['SHEEPDOG_BROKER_PREFIX']}{name}:"
            env = {
                **stack.env,
                "SHEEPDOG_BROKER_PREFIX": prefix,
                "SHEEPDOG_DATABASE_URL": db,
                "SHEEPDOG_OPENAI_BASE_URL": sim.base_url,
                "SHEEPDOG_OPENAI_API_KEY": sim.api_key,
                "SHEEPDOG_BATCH_FLUSH_THRESHOLD": str(THRESHOLD),
                # Only the threshold or an explicit flush sends a batch in this module.
                "SHEEPDOG_BATCH_FLUSH_INTERVAL_S": "3600",
            }
            settings = Settings(
                redis_url=redis_url,
                broker_prefix=prefix,
                database_url=db,
                openai_base_url=sim.base_url,
                openai_api_key=sim.api_key,
                batch_flush_threshold=THRESHOLD,
            )
            stack.start_worker(concurrency=40, env=env, name=f"iso-{name}")
            stack.start_beat(env=env, name=f"iso-{name}-beat")
            made.append(Side(name, settings, Client(settings), sim))
        yield made[0], made[1]
    finally:
        stack.stop_all()
        for db in databases:
            drop_database(db)


def low(tag: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "model": MINI,
            "messages": [{"role": "user", "content": f"{tag} {i}"}],
            "priority": "low",
            "max_tokens": 20,
        }
        for i in range(n)
    ]


def counter(side: Side) -> int:
    value = redis.Redis.from_url(side.settings.redis_url).get(side.names.queued_low_count)
    return int(value or 0)


def wait_for(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.2)


def statuses(side: Side, ids: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for rid in ids:
        view = side.client.get(rid)
        status = view.status if view else "unrecorded"
        found[status] = found.get(status, 0) + 1
    return found


def assert_all_succeeded(side: Side, ids: list[str], wait: float = 120) -> None:
    for rid in ids:
        view = side.client.result(rid, wait=wait)
        assert view.status == "succeeded", (side.name, rid, view.status, view.error)


def batch_modes(side: Side) -> set[str]:
    with session_scope(side.settings.database_url) as session:
        return set(session.scalars(select(BatchJob.mode)))


def test_counters_flushes_and_batch_mode_cache_stay_apart(sides: tuple[Side, Side]) -> None:
    a, b = sides
    r = redis.Redis.from_url(a.settings.redis_url)
    a_ids = a.client.submit_many(low("iso a", 90))
    b_ids = b.client.submit_many(low("iso b", 20))
    wait_for("both counters counted", lambda: counter(a) == 90 and counter(b) == 20)
    # 110 queued on one Redis database, but neither deployment passed ITS threshold.
    assert statuses(a, a_ids) == {"queued": 90}
    assert statuses(b, b_ids) == {"queued": 20}

    # B flushes first: `auto` finds its Batch API (native) and caches that for B only.
    b.client.celery.send_task("sheepdog.batch.flush", kwargs={"reason": "test"})
    assert_all_succeeded(b, b_ids)
    assert batch_modes(b) == {"native"}
    assert statuses(a, a_ids) == {"queued": 90}  # B's flush took nothing of A's
    assert counter(a) == 90

    # A's 100th request passes A's threshold: A flushes, emulated (its provider has no Batch
    # API), and every request of A succeeds despite B's cached `native`.
    a_ids += a.client.submit_many(low("iso a more", 10))
    assert_all_succeeded(a, a_ids)
    assert batch_modes(a) == {"emulated"}
    assert batch_modes(b) == {"native"}
    assert r.get(b.names.provider_batch_mode("default", b.sim.base_url)) == b"native"
    assert r.get(a.names.provider_batch_mode("default", a.sim.base_url)) == b"emulated"
    # The cache is keyed by the base URL too: B's cache says nothing about another URL.
    assert r.get(b.names.provider_batch_mode("default", a.sim.base_url)) is None


def test_cancel_and_follow_of_another_deployments_id_touch_nothing(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    tag = f"iso slow {time.time_ns()}"
    b.sim.set_faults([{"match": tag, "chunk_delay_ms": 40}])
    rid = b.client.submit(
        {"model": MINI, "messages": [{"role": "user", "content": tag}], "priority": "high"}
    )
    wait_for("B's stream started", lambda: (v := b.client.get(rid)) is not None and v.status)
    a.client.cancel(rid)  # A does not know the id: B's request must go on
    with pytest.raises(StreamTimeout):
        "".join(stream_text(rid, timeout=2, settings=a.settings))  # nothing of B's shown
    view = b.client.result(rid, wait=60)
    assert view.status == "succeeded", (view.status, view.error)
    assert "".join(stream_text(rid, timeout=10, settings=b.settings)) == view.text
    r = redis.Redis.from_url(b.settings.redis_url)
    assert not r.exists(b.names.cancel_flag(rid))
    assert not r.exists(a.names.replay_log(rid))


def test_locks_and_rate_limits_are_per_deployment(sides: tuple[Side, Side]) -> None:
    a, b = sides
    r = redis.Redis.from_url(a.settings.redis_url)
    r.set(a.names.janitor_lock, "someone", ex=30)  # A's janitor pass runs elsewhere
    try:
        assert sweep(a.settings).skipped
        # B's beat has its worker sweep B now and then, under B's own lock: a sweep of B skipped
        # while B's janitor holds that lock says nothing about A's; once it is free B sweeps.
        deadline = time.monotonic() + 30
        while sweep(b.settings).skipped:
            assert r.get(b.names.janitor_lock) != b"someone", "A's lock held B back"
            assert time.monotonic() < deadline, "B's janitor lock never came free"
            time.sleep(0.1)
    finally:
        r.delete(a.names.janitor_lock)

    lock_a, lock_b = job_lock(a.settings, "job-x"), job_lock(b.settings, "job-x")
    assert lock_a.acquire()
    try:
        assert lock_b.acquire()  # the same job id in another deployment is another job
        unlock(lock_b)
    finally:
        unlock(lock_a)

    limits = RateLimits(60, None)
    limiter_a = RateLimiter(r, "default", limits, a.names)
    limiter_b = RateLimiter(r, "default", limits, b.names)
    limiter_a.penalize(30)  # a 429 with Retry-After: 30 at A's provider
    try:
        assert limiter_a.try_acquire(1) > 0
        assert limiter_b.try_acquire(1) == 0  # B's provider of the same name is not held
    finally:
        r.delete(
            a.names.rate_limit("default", "requests"), b.names.rate_limit("default", "requests")
        )
