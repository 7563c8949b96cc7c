"""Sheepdog's own HTTP API: submit (one and a list), read, list, cancel, and the resumable
event stream. A real `sheepdog api` process in front of a
real worker, Redis, PostgreSQL and the simulator."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import httpx2
import redis

from core import keys
from core.db import session_scope
from tests.fixtures.api import ApiServer, new_tenant
from tests.fixtures.api_calls import MODEL, follow, req, sse, text_of
from tests.fixtures.workers import Stack


def test_submit_one_read_it_and_follow_it(api_server: ApiServer) -> None:
    key = api_server.key()
    with api_server.http(key) as http:
        r = http.post("/v1/requests", json=req("native one", "high"))
        assert r.status_code == 202, r.text
        rid = r.json()["id"]
        now = http.get(f"/v1/requests/{rid}")  # before or after the worker records it: found
        assert now.status_code == 200 and now.json()["id"] == rid
        events = follow(http, rid)
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    assert [e["id"] for e in events] == list(range(len(events)))
    assert [e["data"]["seq"] for e in events] == [e["id"] for e in events]
    assert events[-1]["event"] == "done" and events[-1]["data"]["usage"]
    assert text_of(events) == view["text"]
    assert view["metadata"]["tenant"] == view["tenant"]


def test_submit_a_list_all_or_nothing(api_server: ApiServer) -> None:
    key = api_server.key()
    tag = uuid.uuid4().hex
    with api_server.http(key) as http:
        bad = http.post(
            "/v1/requests", json=[req(f"{tag} a", "low"), req(f"{tag} b", "low", max_tokens=-1)]
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("request 1: ")
        first_bad = http.post("/v1/requests", json=[{"model": MODEL}, req(f"{tag} c", "low")])
        assert first_bad.json()["error"]["message"].startswith("request 0: ")
        ok = http.post("/v1/requests", json=[req(f"{tag} d", "low"), req(f"{tag} e", "high")])
        assert ok.status_code == 202, ok.text
        ids = ok.json()["ids"]
        assert len(ids) == 2
        deadline = time.monotonic() + 30
        while len(http.get("/v1/requests").json()["data"]) < 2:  # recorded by the worker
            assert time.monotonic() < deadline, "the accepted requests were not recorded"
            time.sleep(0.1)
        time.sleep(1)  # anything enqueued before them would be recorded by now too
        listed = http.get("/v1/requests").json()
    # Nothing of the refused calls was enqueued: the tenant has exactly the two accepted.
    assert sorted(v["id"] for v in listed["data"]) == sorted(ids)


def test_list_newest_first_with_cursor_and_filters(api_server: ApiServer) -> None:
    key = api_server.key()
    with api_server.http(key) as http:
        ids = [
            http.post("/v1/requests", json=req(f"list {i}", "high")).json()["id"] for i in range(5)
        ]
        for rid in ids:
            api_server.wait_final(key, rid)
        page = http.get("/v1/requests", params={"limit": 2}).json()
        seen = [v["id"] for v in page["data"]]
        while page["next_cursor"]:
            page = http.get(
                "/v1/requests", params={"limit": 2, "cursor": page["next_cursor"]}
            ).json()
            seen += [v["id"] for v in page["data"]]
        assert seen == list(reversed(ids))  # newest first, each once
        done = http.get("/v1/requests", params={"status": "succeeded"}).json()["data"]
        assert len(done) == 5
        assert http.get("/v1/requests", params={"status": "queued"}).json()["data"] == []
        later = http.get("/v1/requests", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert later["data"] == []
        assert http.get("/v1/requests", params={"status": "nope"}).status_code == 400
        assert http.get("/v1/requests", params={"cursor": "garbage"}).status_code == 400


def test_events_cut_mid_answer_resume_with_last_event_id(
    api_server: ApiServer, simulator: Any
) -> None:
    key = api_server.key()
    tag = f"resume {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 40}])
    with api_server.http(key) as http:
        rid = http.post("/v1/requests", json=req(tag, "high")).json()["id"]
        head = follow(http, rid, stop_at=3)  # dropped after seq 3, mid-answer
        assert head[-1]["id"] == 3 and head[-1]["event"] == "token"
        tail = follow(http, rid, after=head[-1]["id"])
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    seqs = [e["id"] for e in head + tail]
    assert seqs == list(range(len(seqs)))  # no gap, no duplicate
    assert tail[-1]["event"] == "done"
    assert text_of(head + tail) == view["text"]


def test_events_of_a_finished_request_whose_log_expired(api_server: ApiServer) -> None:
    key = api_server.key()
    with api_server.http(key) as http:
        rid = http.post("/v1/requests", json=req("expired log", "high")).json()["id"]
        view = api_server.wait_final(key, rid)
        assert view["status"] == "succeeded", view["error"]
        n = len(follow(http, rid))
        redis.Redis.from_url(api_server.settings.redis_url).delete(
            keys.of(api_server.settings).replay_log(rid)
        )
        fresh = follow(http, rid)
        assert [(e["id"], e["event"]) for e in fresh] == [(0, "token"), (1, "done")]
        assert fresh[0]["data"]["text"] == view["text"]
        resumed = follow(http, rid, after=n - 3)  # had part of it: dropped and sent whole
        assert [e["event"] for e in resumed] == ["reset", "token", "done"]
        assert [e["id"] for e in resumed] == [n - 2, n - 1, n]
        assert text_of(resumed) == view["text"]


def test_events_of_a_low_priority_request(api_server: ApiServer, stack: Stack) -> None:
    """The batch path publishes nothing: the stream waits for the row and sends its answer."""
    key = api_server.key()
    beat = stack.start_beat()  # flushes the batch, polls it, ingests it
    try:
        with api_server.http(key) as http:
            rid = http.post("/v1/requests", json=req("low one", "low")).json()["id"]
            events = follow(http, rid)
    finally:
        beat.stop()
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    assert [e["event"] for e in events] == ["token", "done"]
    assert text_of(events) == view["text"]


def test_cancel_own_request(api_server: ApiServer, simulator: Any) -> None:
    key = api_server.key()
    tag = f"slow {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    with api_server.http(key) as http:
        rid = http.post("/v1/requests", json=req(tag, "high")).json()["id"]
        follow(http, rid, stop_at=0)  # it is streaming
        r = http.post(f"/v1/requests/{rid}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == rid and r.json()["cancelled"] is True
        view = api_server.wait_final(key, rid)
        assert view["status"] == "cancelled"
        again = http.post(f"/v1/requests/{rid}/cancel").json()
        assert again == {"id": rid, "cancelled": False, "status": "cancelled"}


def test_event_stream_key_in_the_query_is_not_logged(api_server: ApiServer) -> None:
    """A browser's EventSource cannot send headers: the events call takes ?access_token=, and
    the access log masks it."""
    key = api_server.key()
    with api_server.http(key) as http:
        rid = http.post("/v1/requests", json=req("query key", "high")).json()["id"]
    with httpx2.Client(base_url=api_server.url, timeout=60) as anonymous:
        assert anonymous.get(f"/v1/requests/{rid}/events").status_code == 401
        with anonymous.stream(
            "GET", f"/v1/requests/{rid}/events", params={"access_token": key}
        ) as r:
            assert r.status_code == 200
            events = list(sse(r))
        assert events[-1]["event"] == "done"
        assert anonymous.get(f"/v1/requests/{rid}", params={"access_token": key}).status_code == 401
    log = api_server.proc.log_text()
    assert "/events?access_token=sk-***" in log
    assert key not in log


def test_concurrent_calls_are_refused_or_accepted_each_on_its_own(api_server: ApiServer) -> None:
    """Calls arriving together are enqueued together (api/batcher.py); a budget refusal of one
    tenant's call still refuses that call alone."""
    from concurrent.futures import ThreadPoolExecutor

    from costs.budget_limits import set_budget

    broke, fine = new_tenant(), new_tenant()
    with session_scope(api_server.settings.database_url) as session:
        set_budget(session, broke, daily_usd=Decimal(0))
    keys_ = {broke: api_server.key(broke), fine: api_server.key(fine)}

    def call(i: int) -> tuple[str, int, dict[str, Any]]:
        tenant = broke if i % 4 == 0 else fine
        with api_server.http(keys_[tenant]) as http:
            r = http.post("/v1/requests", json=req(f"together {i}", "low"))
        return tenant, r.status_code, r.json()

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(48)))
    for tenant, status, body in results:
        if tenant == broke:
            assert status == 402 and body["error"]["code"] == "budget_exceeded", body
        else:
            assert status == 202, body
    ids = {body["id"] for tenant, _, body in results if tenant == fine}
    assert len(ids) == 36
    for rid in list(ids)[:5]:
        assert api_server.view(keys_[fine], rid)["tenant"] == fine


def test_ownership_checks_asked_together_are_answered_each_on_its_own(
    api_server: ApiServer,
) -> None:
    """Event streams opened at once share one ownership query a round (api/batcher.py): each
    tenant still follows only its own requests, and another's or an unknown id is a 404."""
    from concurrent.futures import ThreadPoolExecutor

    from sheepdog.api.tenancy import Tenancy
    from sheepdog.client import Client

    a, b = api_server.key(), api_server.key()
    with api_server.http(a) as alice:
        # Low-priority ones: the server keeps no note of them, so each follow asks the rows.
        ids = [
            alice.post("/v1/requests", json=req(f"own {i}", "low")).json()["id"] for i in range(6)
        ]
    unknown, malformed = "req_" + "0" * 32, "not-an-id"
    asks = [(a, rid, 200) for rid in ids] + [(b, rid, 404) for rid in ids]
    asks += [(a, unknown, 404), (b, malformed, 404)]

    def open_events(ask: tuple[str, str, int]) -> tuple[int, int]:
        key, rid, expected = ask
        with (
            api_server.http(key) as http,
            http.stream("GET", f"/v1/requests/{rid}/events") as r,
        ):
            return r.status_code, expected

    with ThreadPoolExecutor(len(asks)) as pool:
        for got, expected in pool.map(open_events, asks):
            assert got == expected
    # One round with every tenant's asks mixed, as the server sends it.
    tenancy = Tenancy(Client(api_server.settings))
    tenant_a = api_server.view(a, ids[0])["tenant"]
    tenant_b = "tenant-" + uuid.uuid4().hex[:8]
    mixed = [(tenant_a, ids[0]), (tenant_b, ids[0]), (tenant_a, unknown), (tenant_b, malformed)]
    mixed.append((tenant_a, ids[1]))
    assert tenancy.statuses(mixed) == ["queued", None, None, None, "queued"]
