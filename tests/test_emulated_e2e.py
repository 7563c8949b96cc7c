"""Emulated batch end to end through real workers and beat, on a deployment of this module's own
(PostgreSQL database, Redis DB, Celery queues, providers file):

- 5,000 requests on a provider without a Batch API: the configured rate is never exceeded, a
  SIGKILLed worker's job is resumed by another (every request succeeded once, about 5,000
  provider calls), and the answers equal a native Batch API run of the same lines;
- `auto` picks native for the simulator with a Batch API and emulated for the one without;
- the stream path keeps to its provider's limit and backs off on a 429's Retry-After.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import func, select

from core import keys
from core.db import session_scope
from core.settings import Settings
from models.tables import BatchJob, CostEntry, Request
from rules.prices import price_table
from tests.fixtures.emulated import max_in_window, provider, unique, write_providers
from tests.fixtures.ends import assert_ended
from tests.fixtures.pg import create_database, drop_database
from tests.fixtures.simulator import start_simulator

RPM = 24_000  # 400 a second: 5,000 lines in about 13 s
SLOW_RPM = 600  # the stream test's provider: 10 a second
JITTER_S = 0.05  # client-side delay between the limiter's slot and the simulator's clock


@pytest.fixture(scope="module")
def relay() -> Iterator[Any]:
    with start_simulator(no_batch_api=True, api_key="sk-relay") as sim:
        yield sim


@pytest.fixture(scope="module")
def deployment(stack: Any, simulator: Any, relay: Any, redis_url: str, tmp_path_factory: Any):  # type: ignore[no-untyped-def]
    """(env, settings, names): a database and a Redis DB of its own, three providers."""
    db = create_database("sheepdog_e")
    own_redis = redis_url.rsplit("/", 1)[0] + "/12"
    names = {"native": unique("nat"), "relay": unique("relay"), "slow": unique("slow")}
    path = write_providers(
        tmp_path_factory.mktemp("providers") / "providers.toml",
        {
            names["native"]: provider(simulator, models=["gpt-4.1-mini"], batch_mode="auto"),
            names["slow"]: provider(
                relay, models=["deepseek-v3.2"], batch_mode="auto", requests_per_minute=SLOW_RPM
            ),
            names["relay"]: provider(relay, batch_mode="auto", requests_per_minute=RPM),
        },
    )
    env = {
        **stack.env,
        "SHEEPDOG_REDIS_URL": own_redis,
        "SHEEPDOG_DATABASE_URL": db,
        "SHEEPDOG_PROVIDERS_FILE": path,
        "SHEEPDOG_EMULATED_HEARTBEAT_TTL_S": "2",
        "SHEEPDOG_BATCH_FLUSH_THRESHOLD": "0",
        "SHEEPDOG_BATCH_WORKDIR": str(tmp_path_factory.mktemp("batchwork")),
    }
    settings = Settings().model_copy(
        update={
            "redis_url": own_redis,
            "database_url": db,
            "providers_file": path,
            "broker_prefix": env["SHEEPDOG_BROKER_PREFIX"],
            "openai_api_key": SecretStr("sk-unused"),
            "batch_flush_threshold": 0,
        }
    )
    procs = [stack.start_worker(concurrency=40, env=env, name="emu-a"), stack.start_beat(env=env)]
    yield env, settings, names, procs
    for proc in procs:
        proc.stop()
    drop_database(db)


def statuses(settings: Settings, ids: list[str]) -> dict[str, int]:
    with session_scope(settings.database_url) as session:
        return dict(
            session.execute(
                select(Request.status, func.count())
                .where(Request.id.in_(ids))
                .group_by(Request.status)
            ).all()
        )


def wait_ended(settings: Settings, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = statuses(settings, ids)
        if set(states) <= {"succeeded", "failed", "cancelled"}:
            return
        assert time.monotonic() < deadline, f"not ended after {timeout}s: {states}"
        time.sleep(0.25)


def queue_rows(settings: Settings, bodies: list[dict[str, Any]]) -> list[str]:
    """Queued low-priority rows in one transaction (so one flush takes them all)."""
    from lifecycle.record import record_requests
    from sheepdog.client import Client

    client = Client(settings)
    items = [client.prepare({**b, "priority": "low"}) for b in bodies]
    with session_scope(settings.database_url) as session:
        record_requests(session, items)
    return [i.id for i in items]


def native_answers(sim: Any, bodies: list[dict[str, Any]]) -> dict[str, tuple[str, int, int]]:
    """The same lines through a real Batch API (the simulator's), by custom_id."""
    from openai import OpenAI

    client = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0)
    data = b"".join(
        orjson.dumps(
            {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": b}
        )
        + b"\n"
        for i, b in enumerate(bodies)
    )
    file = client.files.create(file=("compare.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while batch.status != "completed":
        assert time.monotonic() < deadline and batch.status not in ("failed", "expired")
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    out = {}
    for line in client.files.content(batch.output_file_id).text.splitlines():
        obj = orjson.loads(line)
        body = obj["response"]["body"]
        usage = body["usage"]
        out[obj["custom_id"]] = (
            body["choices"][0]["message"]["content"],
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    client.close()
    return out


def test_auto_mode_native_and_emulated_end_to_end(deployment: Any) -> None:
    _, settings, names, _ = deployment
    from sheepdog.client import Client

    client = Client(settings)
    tag = secrets.token_hex(4)
    reqs = [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"auto {tag} {model} {i}"}],
            "priority": "low",
            "max_tokens": 30,
        }
        for model in ("gpt-4.1-mini", "sheepdog-mini")
        for i in range(15)
    ]
    ids = client.submit_many(reqs)
    views = [client.result(rid, wait=60) for rid in ids]
    prices = price_table()
    for view in views:
        assert view.status == "succeeded", (view.status, view.error)
        assert view.usage is not None
        route = "batch" if view.model == "gpt-4.1-mini" else "stream"  # emulated: standard
        assert view.cost_usd == prices.cost(
            view.model, view.usage.prompt_tokens, view.usage.completion_tokens, route
        )
    with session_scope(settings.database_url) as session:
        found = session.execute(
            select(
                BatchJob.model, BatchJob.provider, BatchJob.mode, BatchJob.provider_batch_id
            ).where(BatchJob.id.in_({v.batch_job_id for v in views}))
        ).all()
    by_model = {m: (p, mode, pb) for m, p, mode, pb in found}
    assert by_model["gpt-4.1-mini"][:2] == (names["native"], "native")
    assert by_model["gpt-4.1-mini"][2] is not None
    assert by_model["sheepdog-mini"] == (names["relay"], "emulated", None)


def test_five_thousand_lines_rate_kept_survive_sigkill_match_native(
    deployment: Any, stack: Any, relay: Any, simulator: Any
) -> None:
    env, settings, _, procs = deployment
    tag = secrets.token_hex(4)
    bodies = [
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": f"five thousand {tag} question {i}"}],
            "max_tokens": 30,
        }
        for i in range(5000)
    ]
    relay.reset()
    ids = queue_rows(settings, bodies)
    r = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 60
    job_id = None
    while True:  # the beat's flush makes the job; kill its executor a third of the way in
        with session_scope(settings.database_url) as session:
            job_id = job_id or session.scalar(
                select(Request.batch_job_id).where(Request.id == ids[0])
            )
        if job_id and r.llen(keys.of(settings).emulated(job_id, "lines")) >= 1500:
            break
        assert time.monotonic() < deadline, "the emulated job did not get going"
        time.sleep(0.05)
    procs[0].kill()
    before_restart = r.llen(keys.of(settings).emulated(job_id, "lines"))
    procs.append(stack.start_worker(concurrency=40, env=env, name="emu-b"))
    wait_ended(settings, ids, timeout=120)

    assert statuses(settings, ids) == {"succeeded": 5000}
    with session_scope(settings.database_url) as session:
        ledger = session.scalar(
            select(func.count()).select_from(CostEntry).where(CostEntry.request_id.in_(ids))
        )
        job = session.get(BatchJob, job_id)
        assert job is not None
        assert (job.mode, job.status, job.completed_count, job.ingested_count) == (
            "emulated",
            "completed",
            5000,
            5000,
        )
    assert ledger == 5000
    arrivals = sorted(a["t"] for a in relay.stats()["chat_requests"])
    # About 5,000 calls: the lines checkpointed before the kill were not called again; only the
    # calls in flight at the kill (at most the executor's concurrency) were.
    assert 5000 <= len(arrivals) <= 5000 + 64, len(arrivals)
    assert before_restart >= 1500
    per_second = RPM / 60
    assert max_in_window(arrivals, 1.0) <= per_second + 1 + per_second * JITTER_S
    assert max_in_window(arrivals, 5.0) <= 5 * per_second + 1 + per_second * JITTER_S

    native = native_answers(simulator, bodies)
    with session_scope(settings.database_url) as session:
        got = {
            rid: (text, p, c)
            for rid, text, p, c in session.execute(
                select(
                    Request.id, Request.text, Request.prompt_tokens, Request.completion_tokens
                ).where(Request.id.in_(ids))
            )
        }
    assert all(got[rid] == native[str(i)] for i, rid in enumerate(ids))


def test_stream_path_keeps_the_provider_limit_and_backs_off_on_429(
    deployment: Any, relay: Any
) -> None:
    _, settings, _, _ = deployment
    from sheepdog.client import Client

    relay.reset()
    tag = secrets.token_hex(4)
    relay.set_faults([{"match": f"{tag}-first", "status": 429, "retry_after_s": 1.0, "first": 1}])
    client = Client(settings)
    first = client.submit(
        {
            "model": "deepseek-v3.2",
            "messages": [{"role": "user", "content": f"{tag}-first stream"}],
            "max_tokens": 20,
        }
    )
    assert_ended(client.result(first, wait=60))
    ids = client.submit_many(
        [
            {
                "model": "deepseek-v3.2",
                "messages": [{"role": "user", "content": f"{tag} stream {i}"}],
                "max_tokens": 20,
            }
            for i in range(12)
        ]
    )
    assert {client.result(rid, wait=60).status for rid in ids} == {"succeeded"}
    arrivals = sorted(
        a["t"] for a in relay.stats()["chat_requests"] if a["model"] == "deepseek-v3.2"
    )
    assert len(arrivals) == 14  # the 429, its retry, twelve more
    assert arrivals[1] - arrivals[0] >= 1.0 - JITTER_S  # the retry waited for Retry-After
    assert max_in_window(arrivals, 1.0) <= SLOW_RPM / 60 + 1
    relay.reset()
