"""A tenant's webhooks through the front door with its own key: add (the secret shown once),
list, rotate, remove, failed deliveries — and never another tenant's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.api import ApiServer, start_api
from tests.fixtures.workers import Stack
from webhooks.crypto import new_key


@pytest.fixture(scope="module")
def hooks_api(stack: Stack) -> Iterator[ApiServer]:
    env = {"SHEEPDOG_WEBHOOK_SECRET_KEY": new_key(), "SHEEPDOG_WEBHOOK_ALLOW_PRIVATE": "true"}
    with start_api(stack, **env) as server:
        yield server


def test_a_tenant_manages_its_own_webhooks(hooks_api: ApiServer) -> None:
    a, b = hooks_api.key(), hooks_api.key()
    with hooks_api.http(a) as http_a, hooks_api.http(b) as http_b:
        made = http_a.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        assert made.status_code == 201, made.text
        added = made.json()
        endpoint_id = added["endpoint"]["id"]
        assert added["secret"].startswith("whsec_")
        again = http_a.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/other"}).json()
        assert again["secret"] is None  # the tenant's secret is shown once

        listed = http_a.get("/v1/webhooks").json()["data"]
        assert {e["id"] for e in listed} == {endpoint_id, again["endpoint"]["id"]}
        assert http_b.get("/v1/webhooks").json()["data"] == []
        assert http_b.delete(f"/v1/webhooks/{endpoint_id}").status_code == 404

        rotated = http_a.post("/v1/webhooks/rotate-secret").json()["secret"]
        assert rotated.startswith("whsec_") and rotated != added["secret"]
        assert http_a.get("/v1/webhooks/failed").json()["data"] == []

        # Ids no row can have (a NUL, a number past an Integer column) are unknown, not 500s.
        for ref in ("msg_%00", "9" * 30, "%00"):
            r = http_a.post(f"/v1/webhooks/deliveries/{ref}/redeliver")
            assert r.status_code == 404, (ref, r.status_code, r.text)
        assert http_a.delete("/v1/webhooks/%00").status_code == 404
        assert http_a.delete(f"/v1/webhooks/{endpoint_id}").status_code == 204
        assert http_a.delete(f"/v1/webhooks/{endpoint_id}").status_code == 404
        assert len(http_a.get("/v1/webhooks").json()["data"]) == 1


def test_bad_webhook_bodies_are_refused_in_openai_shape(hooks_api: ApiServer) -> None:
    key = hooks_api.key()
    with hooks_api.http(key) as http:
        for body in (
            {"url": "ftp://127.0.0.1/x"},
            {"url": "http://127.0.0.1:9/x", "events": ["request.exploded"]},
            {"url": "http://127.0.0.1:9/x", "extra": 1},
            {"events": ["request.failed"]},
            # No request line can carry these (a 500, or deliveries failing forever, before):
            {"url": "http://127.0.0.1:9/a\u0000"},
            {"url": "http://127.0.0.1:9/caf\u00e9"},
            {"url": "http://[::1"},
        ):
            r = http.post("/v1/webhooks", json=body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "code"}
        assert http.get("/v1/webhooks").json()["data"] == []
        request = {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": "hook"}],
            "priority": "low",
            "webhook_url": "http://127.0.0.1:9/a\u0000",
        }
        r = http.post("/v1/requests", json=request)
        assert r.status_code == 400 and "webhook_url" in r.json()["error"]["message"], r.text
        assert http.get("/v1/requests").json()["data"] == []
    with hooks_api.http() as anonymous:
        assert anonymous.get("/v1/webhooks").status_code == 401
