"""Emulated batch through its plain functions (flush, emulate, poll, ingest) against a simulator
without Batch API endpoints, on SQLite and PostgreSQL: same results as the native path, the
standard rate in the ledger, retries and faults, cancellation past the maximum wait."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from sqlalchemy import select

from batch.emulated_executor import emulate
from batch.emulated_job import state_keys
from batch.flush import flush
from batch.ingest import ingest
from batch.poll import poll
from core import keys
from core.db import session_scope
from models.tables import CostEntry
from rules.prices import price_table
from tests.fixtures.batch import add_requests, drive, jobs, rows
from tests.fixtures.emulated import provider, settings_for, unique, write_providers
from tests.fixtures.simulator import start_simulator

MINI = "sheepdog-mini"


@pytest.fixture(scope="module")
def relay() -> Iterator[Any]:
    """A provider without /v1/files and /v1/batches."""
    with start_simulator(no_batch_api=True, api_key="sk-relay") as sim:
        yield sim


@pytest.fixture
def make(batch_db: str, redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """Settings on one provider entry (its own broker prefix, removed after the test)."""
    prefix = f"t-emulated-{uuid.uuid4().hex[:6]}:"

    def build(name: str, entry: dict[str, Any], **extra: Any) -> Any:
        path = write_providers(tmp_path / f"{name}.toml", {name: entry})
        return settings_for(
            batch_db, redis_url, path, tmp_path / "work", broker_prefix=prefix, **extra
        )

    yield build
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{prefix}*"):
        r.delete(key)


def run_job(settings: Any) -> str:
    """Flush what is queued into one emulated job, run it and ingest it; the job id."""
    report = flush(settings)
    assert len(report.jobs) == 1, report.summary()
    job_id = report.jobs[0].job_id
    assert emulate(job_id, settings).outcome == "completed"
    assert job_id in poll(settings).to_ingest
    ingest(job_id, settings)
    return job_id


def test_same_results_as_native_at_the_standard_rate(
    make: Any, relay: Any, simulator: Any, redis_url: str
) -> None:
    prompts = [(MINI, f"native-vs-emulated {i}") for i in range(200)]
    native = make(unique("nat"), provider(simulator, batch_mode="native"))
    native_ids = add_requests(native, prompts)
    drive(native, native_ids)
    relay_name = unique("relay")
    emulated = make(relay_name, provider(relay, batch_mode="auto", requests_per_minute=60_000))
    ids = add_requests(emulated, prompts)
    job_id = run_job(emulated)

    job = next(j for j in jobs(emulated) if j.id == job_id)
    assert (job.mode, job.provider, job.status) == ("emulated", relay_name, "completed")
    assert (job.request_count, job.completed_count, job.failed_count) == (200, 200, 0)
    assert job.provider_batch_id is None and job.ingested_at is not None
    before, after = rows(native, native_ids), rows(emulated, ids)
    prices = price_table()
    for nid, eid in zip(native_ids, ids, strict=True):
        n, e = before[nid], after[eid]
        assert e.status == "succeeded" and e.route == "batch", (e.status, e.error)
        assert (e.text, e.prompt_tokens, e.completion_tokens) == (
            n.text,
            n.prompt_tokens,
            n.completion_tokens,
        )
        assert e.cost_usd == prices.cost(MINI, e.prompt_tokens, e.completion_tokens, "stream")
        assert n.cost_usd == prices.cost(MINI, n.prompt_tokens, n.completion_tokens, "batch")
    with session_scope(emulated.database_url) as session:
        ledger = session.scalars(select(CostEntry).where(CostEntry.request_id.in_(ids))).all()
    assert len(ledger) == 200
    assert all(c.route == "batch" and c.cost_usd == c.standard_cost_usd for c in ledger)
    assert not redis.Redis.from_url(redis_url).exists(
        *state_keys(keys.of(emulated), job_id)
    )  # forgotten
    assert relay.stats()["counters"].get("chat.requests", 0) >= 200


def test_provider_batch_discount_is_used(make: Any, relay: Any) -> None:
    settings = make(unique("relay"), provider(relay, batch_mode="emulated", batch_discount=0.25))
    ids = add_requests(settings, [(MINI, f"discounted {i}") for i in range(5)])
    run_job(settings)
    price = price_table().get(MINI).at_batch_discount(Decimal("0.25"))
    for row in rows(settings, ids).values():
        assert row.cost_usd == price.cost(row.prompt_tokens, row.completion_tokens, "batch")


def test_retries_429_and_5xx_fails_4xx_requeues_exhausted(make: Any, relay: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    relay.reset()  # counters of this test only
    relay.set_faults(
        [
            {"match": f"{tag}-t429", "status": 429, "retry_after_s": 0.2, "first": 3},
            {"match": f"{tag}-t500", "status": 500, "first": 3},
            {"match": f"{tag}-bad400", "status": 400, "message": "no such parameter"},
            {"match": f"{tag}-down503", "status": 503},
        ]
    )
    settings = make(
        unique("relay"),
        provider(relay, batch_mode="emulated"),
        emulated_max_attempts=4,
        emulated_backoff_base_s=0.02,
    )
    kinds = ["ok"] * 10 + ["t429"] * 3 + ["t500"] * 3 + ["bad400", "down503"]
    ids = add_requests(settings, [(MINI, f"{tag}-{k} question {i}") for i, k in enumerate(kinds)])
    job_id = run_job(settings)
    job = next(j for j in jobs(settings) if j.id == job_id)
    assert (job.completed_count, job.failed_count) == (16, 2)
    got = rows(settings, ids)
    for rid, kind in zip(ids, kinds, strict=True):
        row = got[rid]
        if kind == "bad400":
            assert row.status == "failed" and "no such parameter" in (row.error or "")
        elif kind == "down503":
            # Its retries ran out: requeued for the next batch, like an expired line.
            assert row.status == "queued" and "emulated_retries_exhausted" in (row.error or "")
        else:
            assert row.status == "succeeded" and row.text, (kind, row.status, row.error)
    counters = relay.stats()["counters"]
    assert counters.get("faults.status.429") == 3 and counters.get("faults.status.503") == 4
    relay.reset()


def test_overdue_job_is_cancelled_and_requeued(make: Any, relay: Any) -> None:
    settings = make(unique("relay"), provider(relay, batch_mode="emulated"), batch_max_wait_s=0)
    ids = add_requests(settings, [(MINI, f"overdue {i}") for i in range(4)])
    job_id = flush(settings).jobs[0].job_id
    report = poll(settings)  # no executor ran: no heartbeat, so cancelled at once
    assert job_id in report.cancelled and job_id in report.to_ingest
    assert emulate(job_id, settings).outcome == "idle"
    ingest(job_id, settings)
    assert {r.status for r in rows(settings, ids).values()} == {"queued"}


def test_second_executor_is_busy_and_lapsed_one_is_resent(
    make: Any, relay: Any, redis_url: str
) -> None:
    settings = make(
        unique("relay"), provider(relay, batch_mode="emulated"), emulated_heartbeat_ttl_s=30
    )
    add_requests(settings, [(MINI, f"busy {i}") for i in range(3)])
    job_id = flush(settings).jobs[0].job_id
    r = redis.Redis.from_url(redis_url)
    r.set(keys.of(settings).emulated(job_id, "heartbeat"), "someone-else", px=30_000)
    assert emulate(job_id, settings).outcome == "busy"
    assert poll(settings).resent == 0  # alive: nothing sent
    r.delete(keys.of(settings).emulated(job_id, "heartbeat"))
    assert poll(settings).resent == 1 and poll(settings).resent == 0  # once per TTL
    assert emulate(job_id, settings).outcome == "completed"


class _NotAnAnswer(BaseHTTPRequestHandler):
    """A relay that answers every chat completion 200 with a JSON body that is no answer."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.timeout(120)
def test_an_answer_that_is_not_an_object_is_retried_then_requeued(make: Any) -> None:
    """Before, `[]` as an answer escaped the executor's handling and the job waited out
    its 26 h limit with the line never accounted for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAnAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        odd = SimpleNamespace(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="sk-odd"
        )
        settings = make(
            unique("odd"),
            provider(odd, batch_mode="emulated"),
            emulated_max_attempts=2,
            emulated_backoff_base_s=0.02,
        )
        ids = add_requests(settings, [(MINI, f"{uuid.uuid4().hex[:6]} not an answer")])
        run_job(settings)
    finally:
        server.shutdown()
    row = rows(settings, ids)[ids[0]]
    assert row.status == "queued", (row.status, row.error)
    assert "malformed answer" in (row.error or ""), row.error


@pytest.mark.parametrize(
    ("mode", "configured", "discount"),
    [
        ("emulated", None, "0"),
        ("auto", None, "0"),
        ("unprobed", None, "0"),
        ("emulated", 0.25, "0.25"),
    ],
    ids=["emulated", "auto-probed", "auto-unprobed", "own-discount"],
)
def test_a_cap_and_a_hold_are_priced_at_the_rate_the_provider_bills(
    make: Any, relay: Any, mode: str, configured: float | None, discount: str
) -> None:
    """A provider with no Batch API bills its batch lines at the standard rate (or at its own
    `batch_discount`): a cost cap buys, and a budget holds, the tokens at that rate, so no
    answer costs more than its cap or its hold (the table's half-price batch rate let an
    emulated line cost 1.93x its cap). An `auto` provider the flush probes only after the
    submit: its lines are cut to that rate when the job is handed to the executor."""
    from core.providers import load_providers, resolve_batch_mode
    from rules.caps import max_tokens_for_cap
    from rules.tokens import count_message_tokens
    from sheepdog.client import Client
    from tests.fixtures.costs import budget, reservations

    entry = provider(relay, batch_mode="auto" if mode == "unprobed" else mode)
    if configured is not None:
        entry["batch_discount"] = configured
    name = unique("relay")
    settings = make(name, entry, batch_ingest_chunk=7)  # the hand-over refits 20 rows in 3 chunks
    if mode == "auto":  # the flush's probe has answered once: submit reads its answer
        assert resolve_batch_mode(load_providers(settings).get(name), settings) == "emulated"
    tenant = unique("t")
    budget(settings.database_url, tenant, daily_usd="1")
    cap = Decimal("0.000017")  # ~80 output tokens at the table's batch rate, ~38 at standard
    requests = [
        {
            "model": MINI,
            "messages": [{"role": "user", "content": f"capped {name} {i}"}],
            "priority": "low",
            "max_cost_usd": str(cap),
            "metadata": {"tenant": tenant},
        }
        for i in range(20)
    ]
    ids = Client(settings).submit_many(requests)
    price = price_table().get(MINI).at_batch_discount(Decimal(discount))
    at_submit = price_table().get(MINI) if mode == "unprobed" else price  # the table's rate
    before = rows(settings, ids)
    prompts = [count_message_tokens(request["messages"]) for request in requests]
    for rid, prompt in zip(ids, prompts, strict=True):
        assert before[rid].body["max_tokens"] == max_tokens_for_cap(
            at_submit, MINI, prompt, cap, "batch"
        )
    run_job(settings)
    held = reservations(settings.database_url, ids)
    ended = rows(settings, ids)
    for rid, prompt in zip(ids, prompts, strict=True):
        assert ended[rid].body["max_tokens"] == min(
            max_tokens_for_cap(price, MINI, prompt, limit, "batch")
            for limit in (cap, held[rid].amount_usd)
        )
    assert any(r.completion_tokens == r.body["max_tokens"] for r in ended.values())  # cut there
    for rid in ids:
        row = ended[rid]
        assert row.status == "succeeded", (row.status, row.error)
        assert row.cost_usd == price.cost(row.prompt_tokens, row.completion_tokens, "batch")
        assert row.cost_usd <= cap, (row.cost_usd, row.prompt_tokens, row.completion_tokens)
        assert held[rid].settled_usd == row.cost_usd <= held[rid].amount_usd


def test_a_line_its_cap_cannot_pay_for_at_the_standard_rate_fails_saying_so(
    make: Any, relay: Any
) -> None:
    """Capped at the table's batch rate (its `auto` provider not yet probed) with room for
    its prompt and one token there, not at the standard rate the relay bills: it fails at the
    hand-over with the reason, and nothing is billed."""
    from batch.emulated_job import TOO_POOR
    from rules.tokens import count_message_tokens
    from sheepdog.client import Client

    settings = make(unique("relay"), provider(relay, batch_mode="auto"))
    text = [{"role": "user", "content": f"too poor {unique('p')}"}]
    price = price_table().get(MINI)
    prompt = count_message_tokens(text)
    cap = price.cost(prompt, 1, "batch") + Decimal("0.0000000001")
    assert cap < price.cost(prompt, 1, "stream")
    rich, poor = Client(settings).submit_many(
        [
            {"model": MINI, "messages": text, "priority": "low"},
            {"model": MINI, "messages": text, "priority": "low", "max_cost_usd": str(cap)},
        ]
    )
    run_job(settings)
    ended = rows(settings, [rich, poor])
    assert ended[rich].status == "succeeded", ended[rich].error
    assert (ended[poor].status, ended[poor].error) == ("failed", TOO_POOR)
    assert ended[poor].cost_usd is None


def test_a_low_request_takes_flex_where_the_relay_s_batch_lane_costs_the_standard_rate(
    make: Any, relay: Any
) -> None:
    """The lane is chosen at the rates the provider bills: emulated batch lines cost the
    standard rate, so flex (half price, when sold) is the cheapest lane; without flex, batch."""
    from sheepdog.client import Client

    sells = make(unique("relay"), provider(relay, batch_mode="emulated", service_tiers=["flex"]))
    plain = make(unique("relay"), provider(relay, batch_mode="emulated"))
    body = {"model": MINI, "messages": [{"role": "user", "content": "hi"}], "priority": "low"}
    flex = Client(sells).submit(body)
    batch = Client(plain).submit(body)
    got = rows(sells, [flex, batch])
    assert (got[flex].route, got[flex].lane, got[flex].escalated) == ("stream", "flex", False)
    assert got[flex].lane_reason == "low: flex, cheaper than this provider's batch lane"
    assert (got[batch].route, got[batch].lane) == ("batch", "batch")
