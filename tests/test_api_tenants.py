"""What a tenant's key reaches through the front door: its own requests only (another's id
answers 404 as an unknown one does), idempotency keys of its own, no document links, and
nothing once revoked. A real `sheepdog api` process in front of a real worker, Redis,
PostgreSQL and the simulator."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from core.db import session_scope
from core.errors import InvalidRequest
from models.tables import Request as RequestRow
from tests.fixtures.api import ApiServer
from tests.fixtures.api_calls import req


def test_tenant_isolation(api_server: ApiServer, simulator: Any) -> None:
    a, b = api_server.key(), api_server.key()
    tag = f"iso {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 50}])
    with api_server.http(a) as alice, api_server.http(b) as bob:
        rid = alice.post("/v1/requests", json=req(tag, "high")).json()["id"]
        unknown = "req_" + "0" * 32
        for path in (f"/v1/requests/{rid}", f"/v1/requests/{unknown}"):
            r = bob.get(path)
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "request_not_found"
        assert bob.get(f"/v1/requests/{rid}").json()["error"]["message"] == f"no request {rid}"
        assert bob.get(f"/v1/requests/{rid}/events").status_code == 404
        assert bob.post(f"/v1/requests/{rid}/cancel").status_code == 404
        assert bob.get("/v1/requests").json()["data"] == []
        view = api_server.wait_final(a, rid)
        assert view["status"] == "succeeded", view["error"]  # bob's cancel did nothing
        assert [v["id"] for v in alice.get("/v1/requests").json()["data"]] == [rid]
        # Idempotency keys are each tenant's own: the same key makes bob a request of his own.
        key = f"same-{uuid.uuid4().hex}"
        ra = alice.post("/v1/requests", json=req("idem", "low", idempotency_key=key)).json()["id"]
        rb = bob.post("/v1/requests", json=req("idem", "low", idempotency_key=key)).json()["id"]
        assert ra != rb
        assert (
            alice.post("/v1/requests", json=req("idem", "low", idempotency_key=key)).json()["id"]
            == ra
        )


def test_the_idempotency_key_header_keys_a_native_submit(api_server: ApiServer) -> None:
    """The standard header, as an HTTP client's retry sends it, works on POST /v1/requests as on
    the chat endpoint (two retries used to make two requests); with a list, or a body naming
    another key, it is a 400."""
    key = f"hdr-{uuid.uuid4().hex}"
    with api_server.http(api_server.key()) as http:
        sent = [
            http.post(
                "/v1/requests", json=req("hdr", "low"), headers={"Idempotency-Key": key}
            ).json()["id"]
            for _ in range(2)
        ]
        assert sent[0] == sent[1]
        assert http.get(f"/v1/requests/{sent[0]}").json()["idempotency_key"] == key
        for body in ([req("hdr", "low")], req("hdr", "low", idempotency_key="other")):
            r = http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
            assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key", r.text


def _at_once(api: ApiServer, key: str, body: Any, headers: dict[str, str]) -> list[Any]:
    """Four POSTs of `body` released together, each on its own connection."""
    import threading

    barrier = threading.Barrier(4)
    answers: list[Any] = []

    def post() -> None:
        with api.http(key) as http:
            barrier.wait()
            answers.append(http.post("/v1/requests", json=body, headers=headers))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


@pytest.mark.parametrize("budgeted", [False, True])
def test_concurrent_resends_never_get_an_id_that_does_not_exist(
    api_server: ApiServer, budgeted: bool
) -> None:
    """Four identical POSTs at once with one Idempotency-Key (a client's retries racing): a 202
    answered with the first submit's id before its row existed (404 right after), or with the
    id of a submit a budget then refused (404 for good). Each answer now is a 202 whose id
    reads back at once, a 409 in progress, or the first submit's own 402."""
    from costs.budget_limits import set_budget
    from tests.fixtures.api import new_tenant

    tenant = new_tenant()
    if budgeted:
        with session_scope(api_server.settings.database_url) as session:
            set_budget(session, tenant, daily_usd=0)  # type: ignore[arg-type]
    key = api_server.key(tenant)
    body = {**req("race"), "priority": "high", "max_tokens": 20}
    seen: list[tuple[int, str]] = []
    for trial in range(8):
        answers = _at_once(api_server, key, body, {"Idempotency-Key": f"race-{uuid.uuid4().hex}"})
        with api_server.http(key) as http:
            for r in answers:
                code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
                seen.append((r.status_code, code))
                if r.status_code == 202:
                    rid = r.json()["id"]
                    assert http.get(f"/v1/requests/{rid}").status_code == 200, (trial, rid)
                elif r.status_code == 409:
                    assert code == "idempotency_key_in_progress", r.text
                    assert r.headers["retry-after"] == "1"
                else:
                    assert (r.status_code, budgeted) == (402, True), r.text
    if budgeted:
        assert {s for s, _ in seen} <= {402, 409} and (402, "budget_exceeded") in seen, seen
    else:
        assert 202 in {s for s, _ in seen}, seen


def test_no_tenant_can_hold_anothers_idempotency_keys(api_server: ApiServer) -> None:
    """Tenant names may hold a "/", and the default tenant's keys were kept bare: neither lets a
    tenant reach another's keys (its request ids, or a 409 on the other's own submit). A key
    as long as the door allows is taken, and shown back as given."""
    run = uuid.uuid4().hex[:8]
    team, acme = api_server.key(f"acme{run}/team"), api_server.key(f"acme{run}")
    beta, default = api_server.key(f"beta{run}"), api_server.key("default")
    with (
        api_server.http(team) as t,
        api_server.http(acme) as a,
        api_server.http(beta) as b,
        api_server.http(default) as d,
    ):

        def submit(http: Any, key: str, text: str) -> Any:
            return http.post("/v1/requests", json=req(text, "low", idempotency_key=key))

        first = submit(t, "x", "one").json()["id"]
        other = submit(a, "team/x", "two")  # `acme` + `team/x` read as `acme/team` + `x`
        assert other.status_code == 202 and other.json()["id"] != first, other.text
        early = submit(d, f"beta{run}/next", "three")  # the default tenant's bare keys
        assert early.status_code == 202, early.text
        own = submit(b, "next", "four")
        assert own.status_code == 202 and own.json()["id"] != early.json()["id"], own.text
        longest = "k" * 183
        rid = submit(a, longest, "five").json()["id"]
        assert a.get(f"/v1/requests/{rid}").json()["idempotency_key"] == longest
        conflict = submit(t, "x", "another text")
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"]["message"].startswith("idempotency key 'x' was already")
        too_long = submit(a, longest + "k", "six")
        assert too_long.status_code == 400, too_long.text
        assert too_long.json()["error"]["message"] == (
            "idempotency_key: at most 183 characters, got 184"
        )


def test_revoked_key_gets_401(api_server: ApiServer) -> None:
    from sheepdog.tenant_keys import create_key, revoke_key

    key, info = create_key(api_server.settings.database_url, "revokee")
    with api_server.http(key) as http:
        assert http.get("/v1/requests").status_code == 200
        assert revoke_key(api_server.settings.database_url, info.id) is True
        time.sleep(0.6)  # the server trusts a key it looked up for SHEEPDOG_API_KEY_CACHE_S
        r = http.get("/v1/requests")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "authentication_error"


def test_no_caller_links_a_document(api_server: ApiServer) -> None:
    """Links to a document are the nightly document job's (its tenant's): no key is made for
    that tenant, one made before answers 401, and another tenant's `document_id` is metadata of
    its own (no link)."""
    from models.tables import ApiKey
    from sheepdog.tenant_keys import create_key

    url = api_server.settings.database_url
    with pytest.raises(InvalidRequest, match="nightly document job"):
        create_key(url, "documents")
    old, info = create_key(url, "was-documents")
    with session_scope(url) as session:  # as a key made before the tenant was refused
        row = session.get(ApiKey, info.id)
        assert row is not None
        row.tenant = "documents"
    with api_server.http(old) as http:
        r = http.get("/v1/requests")
        assert r.status_code == 401 and "document job" in r.json()["error"]["message"], r.text
    with api_server.http(api_server.key()) as http:
        meta = {"document_id": "987654321", "mine": "kept"}
        rid = http.post("/v1/requests", json=req("doc", "low", metadata=meta)).json()["id"]
        view = http.get(f"/v1/requests/{rid}").json()
    assert view["metadata"]["document_id"] == "987654321" and view["metadata"]["mine"] == "kept"
    with session_scope(url) as session:
        stored = session.get(RequestRow, rid)
        assert stored is not None and stored.document_id is None
