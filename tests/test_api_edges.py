"""The front door's edges: bad, huge, mistyped and unknown bodies get a 4xx in OpenAI's shape
and enqueue nothing; no key, --no-auth, Redis or the database away; health and metrics. A real
`sheepdog api` process (and a worker) on the module's stack."""

from __future__ import annotations

import base64
import gzip
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import orjson
import pytest

from tests.fixtures.api import ApiServer, free_port, start_api
from tests.fixtures.workers import ROOT, Stack

MODEL = "sheepdog-mini"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "edge"}], "priority": "low"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "edge"}]}


def openai_error(r: httpx2.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and "\n" not in error["message"]
    return dict(error)


def test_bad_bodies_get_openai_shaped_4xx_and_enqueue_nothing(api_server: ApiServer) -> None:
    key = api_server.key()
    role_robot = {**GOOD, "messages": [{"role": "robot", "content": "x"}]}
    limit = 1024 * 1024  # SHEEPDOG_API_MAX_BODY_BYTES of the test server
    huge = (
        b'{"model": "sheepdog-mini", "messages": [{"role": "user", "content": "'
        + b"x" * (limit + 10)
        + b'"}]}'
    )

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    json_type = {"Content-Type": "application/json"}
    with api_server.http(key) as http:
        for path in ("/v1/requests", "/v1/chat/completions"):
            e = openai_error(http.post(path, content=b"{not json", headers=json_type), 400)
            assert e["code"] == "invalid_json" and e["type"] == "invalid_request_error"
            e = openai_error(http.post(path, content=b"", headers=json_type), 400)
            e = openai_error(
                http.post(path, content=b"{}", headers={"Content-Type": "text/plain"}), 415
            )
            assert "application/json" in e["message"]
            openai_error(http.post(path, data={"model": MODEL}), 415)  # a form
            zipped = {**json_type, "Content-Encoding": "gzip"}
            e = openai_error(http.post(path, content=gzip.compress(b"{}"), headers=zipped), 415)
            assert "uncompressed" in e["message"], e
            e = openai_error(http.post(path, content=huge, headers=json_type), 413)
            assert e["code"] == "body_too_large"
            e = openai_error(http.post(path, content=chunked(), headers=json_type), 413)
            openai_error(http.post(path, json=5), 400)
        e = openai_error(http.post("/v1/requests", json={**GOOD, "colour": "red"}), 400)
        assert "colour" in e["message"] and e["message"].startswith("invalid request: ")
        e = openai_error(http.post("/v1/chat/completions", json={**CHAT, "colour": "red"}), 400)
        assert "colour" in e["message"] and e["param"] == "colour"
        e = openai_error(http.post("/v1/requests", json=[]), 400)
        e = openai_error(http.post("/v1/requests", json=[GOOD, "x"]), 400)
        assert e["message"].startswith("request 1: ")
        # `param` names the field to blame, as OpenAI's errors do (it was null on every refusal
        # of the request's own rules), and on the chat endpoint the header that set it.
        e = openai_error(http.post("/v1/requests", json=[GOOD, role_robot]), 400)
        assert e["param"] == "[1].messages[0].role", e
        e = openai_error(http.post("/v1/requests", json={**GOOD, "model": "gpt-9"}), 400)
        assert e["param"] == "model", e
        in_seconds = {"X-Sheepdog-Deadline": "1965000000"}
        e = openai_error(http.post("/v1/chat/completions", json=CHAT, headers=in_seconds), 400)
        assert e["param"] == "X-Sheepdog-Deadline" and "ISO 8601" in e["message"], e
        e = openai_error(http.post("/v1/requests", json={**GOOD, "deadline": 1965000000}), 400)
        assert e["param"] == "deadline", e
        over = {**CHAT, "max_completion_tokens": 10**6}  # the name the body used
        e = openai_error(http.post("/v1/chat/completions", json=over), 400)
        assert e["param"] == "max_completion_tokens", e
        image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
        body = {**CHAT, "messages": [{"role": "user", "content": [image]}]}
        e = openai_error(http.post("/v1/chat/completions", json=body), 400)
        assert "only text parts" in e["message"]
        e = openai_error(http.post("/v1/chat/completions", json={**CHAT, "n": 2}), 400)
        role = {**GOOD, "messages": [{"role": "robot", "content": "x"}]}
        e = openai_error(http.post("/v1/requests", json=role), 400)
        assert "unknown role 'robot'" in e["message"]
        # The same one-line reason as the CLI gives: the client's own validation.
        e = openai_error(http.post("/v1/requests", json={**GOOD, "max_tokens": 0}), 400)
        assert e["message"] == "invalid request: max_tokens: max_tokens must be positive, got 0"
        openai_error(http.get("/v1/nowhere"), 404)
        openai_error(http.delete("/v1/requests"), 405)
        # A sentinel request after all of that: once it is recorded, it is the tenant's only one.
        sentinel = http.post("/v1/requests", json=GOOD).json()["id"]
        deadline = time.monotonic() + 30
        while not http.get("/v1/requests").json()["data"]:
            assert time.monotonic() < deadline, "the sentinel was not recorded"
            time.sleep(0.1)
        time.sleep(1)
        assert [v["id"] for v in http.get("/v1/requests").json()["data"]] == [sentinel]


def test_odd_query_and_header_values_are_400_not_500(api_server: ApiServer) -> None:
    """Values that passed a loose check and then broke a conversion (several dashes, digits
    that are not ASCII, past 64 bits, a time past the year 9999 once in UTC, a NUL)."""
    key = api_server.key()
    with api_server.http(key) as http:
        rid = http.post("/v1/requests", json=GOOD).json()["id"]
        for value in (b"--5", b"\xb2", b"9" * 4301, b"18446744073709551615"):
            r = http.get(f"/v1/requests/{rid}/events", headers={b"Last-Event-ID": value})
            assert openai_error(r, 400)["param"] == "Last-Event-ID", value
        r = http.get(f"/v1/requests/{rid}/events", params={"last_event_id": "\u00b2"})
        assert openai_error(r, 400)["param"] == "Last-Event-ID"
        assert (
            openai_error(http.get("/v1/requests", params={"limit": "\u00b2"}), 400)["param"]
            == "limit"
        )
        late = "9999-12-31T23:59:59-12:00"
        assert (
            openai_error(http.get("/v1/requests", params={"since": late}), 400)["param"] == "since"
        )
        for at, cursor_id in ((late, rid), ("2026-01-01T00:00:00+00:00", "req_\x00")):
            raw = base64.urlsafe_b64encode(orjson.dumps([at, cursor_id])).decode().rstrip("=")
            r = http.get("/v1/requests", params={"cursor": raw})
            assert openai_error(r, 400)["code"] == "invalid_cursor", at
        assert openai_error(http.delete("/v1/webhooks/%00"), 404)["code"] == "not_found"
        # An empty limit is none, as an empty status, since or cursor (it was a 400).
        assert http.get("/v1/requests", params={"limit": "", "status": ""}).status_code == 200
        # An empty Idempotency-Key or Content-Encoding is none, as on the chat endpoint.
        empty = {"Idempotency-Key": "", "Content-Encoding": ""}
        assert http.post("/v1/requests", json=GOOD, headers=empty).status_code == 202


def test_sixteen_metadata_pairs_of_the_callers_own(api_server: ApiServer) -> None:
    """OpenAI's limit is 16 pairs; the door adds `tenant` (and `user` from OpenAI's field), and
    those counted, so 16 of the caller's own were refused as "17 pairs, over the limit of 16"."""
    own = {f"k{i}": "v" for i in range(16)}
    with api_server.http(api_server.key()) as http:
        r = http.post("/v1/requests", json={**GOOD, "metadata": {**own, "user": "u-1"}})
        assert r.status_code == 202, r.text
        view = http.get(f"/v1/requests/{r.json()['id']}").json()
        assert view["metadata"] == {**own, "user": "u-1", "tenant": view["tenant"]}
        r = http.post("/v1/requests", json={**GOOD, "metadata": {**own, "k16": "v"}})
        e = openai_error(r, 400)
        assert "17 pairs besides tenant and user, over the limit of 16" in e["message"]


def test_no_key_or_a_wrong_scheme_is_401(api_server: ApiServer) -> None:
    with api_server.http() as http:
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
            r = http.get("/v1/models", headers=headers)
            e = openai_error(r, 401)
            assert e["type"] == "authentication_error"
            assert r.headers["www-authenticate"].startswith("Bearer")
        e = openai_error(http.post("/v1/requests", json=GOOD), 401)


def test_health_ready_and_metrics(api_server: ApiServer) -> None:
    key = api_server.key()
    with api_server.http(key) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "redis": "ok", "database": "ok"}
        http.get("/v1/models")
        http.get("/v1/requests/req_unknown")
        text = http.get("/metrics").text
    assert 'sheepdog_api_requests_total{code="200",endpoint="/v1/models",method="GET"}' in text
    assert (
        'sheepdog_api_requests_total{code="404",endpoint="/v1/requests/{id}",method="GET"}' in text
    )
    assert "sheepdog_api_open_streams" in text
    assert 'sheepdog_api_time_to_first_byte_seconds_count{endpoint="/v1/models"}' in text
    assert "req_unknown" not in text  # endpoints are route templates, never ids


def test_no_auth_only_on_loopback(stack: Stack) -> None:
    cmd = [sys.executable, "-m", "sheepdog", "api", "--no-auth", "--address", "0.0.0.0"]
    cmd += ["--port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--no-auth serves only a loopback address" in done.stderr
    origin = "http://app.example"
    cors = {"SHEEPDOG_API_CORS_ORIGINS": origin}
    with start_api(stack, "--no-auth", **cors) as api, api.http() as http:
        rid = http.post("/v1/requests", json=GOOD).json()["id"]
        view = http.get(f"/v1/requests/{rid}").json()
        assert view["tenant"] == "default"
        # CORS for the configured browser origin only (an EventSource page, say).
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        }
        r = http.options(f"/v1/requests/{rid}/events", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        # The chat endpoint's own headers, and those the OpenAI JS SDK sends from a browser,
        # were refused (400 "Disallowed CORS headers").
        sdk_headers = "authorization, content-type, x-sheepdog-priority, x-sheepdog-deadline,"
        sdk_headers += " x-sheepdog-max-cost-usd, idempotency-key, x-stainless-os"
        chat = {**preflight, "Access-Control-Request-Method": "POST"}
        chat["Access-Control-Request-Headers"] = sdk_headers
        r = http.options("/v1/chat/completions", headers=chat)
        assert r.status_code == 200, r.text
        r = http.options(
            "/v1/webhooks/x", headers={**preflight, "Access-Control-Request-Method": "DELETE"}
        )
        assert r.status_code == 200, r.text
        r = http.get(f"/v1/requests/{rid}", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        r = http.get(f"/v1/requests/{rid}", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("away", ["redis", "database"])
def test_redis_or_database_away_is_503(stack: Stack, api_server: ApiServer, away: str) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = (
        {"SHEEPDOG_REDIS_URL": f"redis://{dead}/0"}
        if away == "redis"
        else {"SHEEPDOG_DATABASE_URL": f"postgresql://postgres@{dead}/nowhere"}
    )
    key = api_server.key()  # made in the real database
    with start_api(stack, **env) as api, api.http(key) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()[away] == "unreachable"
        if away == "redis":
            # A low-priority request needs only its row (its durable copy; beat batches it from
            # the table once Redis is back): taken, and readable.
            r = http.post("/v1/requests", json=GOOD)
            assert r.status_code == 202, r.text
            view = http.get(f"/v1/requests/{r.json()['id']}")
            assert view.status_code == 200 and view.json()["status"] == "queued", view.text
            # Its event stream needs Redis: a 503 before the head (it was a 200 whose body
            # broke, with a traceback in the log).
            e = openai_error(http.get(f"/v1/requests/{r.json()['id']}/events"), 503)
            assert e["code"] == "unavailable"
            # What needs Redis (a stream's message, an idempotency key) is refused.
            keyed = {**GOOD, "idempotency_key": "away"}
            e = openai_error(http.post("/v1/requests", json=keyed), 503)
        else:
            e = openai_error(http.post("/v1/requests", json=GOOD), 503)
        assert e["code"] == "unavailable" and dead not in e["message"]
        e = openai_error(http.post("/v1/chat/completions", json=CHAT), 503)


@pytest.mark.unit
def test_sheepdog_errors_the_door_did_not_know_are_logged() -> None:
    """A missing webhook key is the server's configuration (503, logged for the operator);
    any other error of Sheepdog's the map does not know is a 500, logged, not a silent one."""
    import logging

    from core.errors import SheepdogError
    from sheepdog.api.errors import from_sheepdog
    from webhooks.crypto import WebhookKeyError

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("sheepdog.api")
    logger.addHandler(handler)
    try:
        missing = from_sheepdog(WebhookKeyError("webhook signing secrets need a key"))
        other = from_sheepdog(SheepdogError("something new"))
    finally:
        logger.removeHandler(handler)
    assert (missing.status, missing.code) == (503, "unavailable")
    assert "need a key" not in missing.message  # the hint is the operator's
    assert (other.status, other.code) == (500, "internal_error")
    assert any("need a key" in m for m in seen) and any("something new" in m for m in seen)


@pytest.mark.unit
def test_a_last_event_id_with_a_minus_is_none() -> None:
    """`-0` resumed after seq 0, so the answer's first token was skipped."""
    from starlette.requests import Request

    from sheepdog.api.native import last_event_id

    def seen(value: bytes) -> int:
        scope = {"type": "http", "headers": [(b"last-event-id", value)], "query_string": b""}
        return last_event_id(Request(scope))

    assert [seen(v) for v in (b"-0", b"-1", b"-00", b" -5 ", b"0", b"7")] == [-1, -1, -1, -1, 0, 7]
