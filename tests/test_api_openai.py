"""The official openai SDK against the front door's /v1/chat/completions and /v1/models: a real
`sheepdog api` process, a real worker, Redis, PostgreSQL and the simulator."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from core.db import session_scope
from costs.budget_limits import set_budget
from tests.fixtures.api import ApiServer, new_tenant

MODEL = "sheepdog-mini"


def sdk(api: ApiServer, key: str) -> OpenAI:
    return OpenAI(base_url=api.base_url, api_key=key, max_retries=0, timeout=60)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_from_the_price_table(api_server: ApiServer) -> None:
    names = [m.id for m in sdk(api_server, api_server.key()).models.list()]
    assert MODEL in names and "gpt-4.1" in names


def test_completion_sync(api_server: ApiServer) -> None:
    key = api_server.key()
    out = sdk(api_server, key).chat.completions.create(model=MODEL, messages=ask("hello sync"))
    assert out.id.startswith("req_") and out.object == "chat.completion"
    view = api_server.wait_final(key, out.id)
    assert view["status"] == "succeeded", view["error"]
    assert out.choices[0].message.content == view["text"]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None
    assert out.usage.completion_tokens == view["usage"]["completion_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stream_sync_with_usage_chunk(api_server: ApiServer) -> None:
    key = api_server.key()
    stream = sdk(api_server, key).chat.completions.create(
        model=MODEL,
        messages=ask("hello stream"),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Sheepdog-Priority": "high"},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    rid = ids.pop()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    assert view["priority"] == "high"
    assert text == view["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == view["usage"]["completion_tokens"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])


def test_async_stream_and_completion(api_server: ApiServer) -> None:
    key = api_server.key()

    async def run() -> tuple[Any, str, str]:
        client = AsyncOpenAI(base_url=api_server.base_url, api_key=key, max_retries=0)
        try:
            whole = await client.chat.completions.create(model=MODEL, messages=ask("async one"))
            stream = await client.chat.completions.create(
                model=MODEL, messages=ask("async two"), stream=True
            )
            parts, rid = [], ""
            async for chunk in stream:
                rid = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            return whole, rid, "".join(parts)
        finally:
            await client.close()

    whole, rid, text = asyncio.run(run())
    assert whole.choices[0].message.content == api_server.wait_final(key, whole.id)["text"]
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    assert text == view["text"] and text


def test_headers_deadline_cost_cap_and_idempotency(api_server: ApiServer) -> None:
    key = api_server.key()
    client = sdk(api_server, key)
    deadline = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    headers = {
        "X-Sheepdog-Deadline": deadline,
        "X-Sheepdog-Max-Cost-Usd": "0.5",
        "Idempotency-Key": f"k-{uuid.uuid4().hex}",
    }
    first = client.chat.completions.create(
        model=MODEL, messages=ask("idempotent"), extra_headers=headers
    )
    again = client.chat.completions.create(
        model=MODEL, messages=ask("idempotent"), extra_headers=headers
    )
    assert (
        again.id == first.id
        and again.choices[0].message.content == first.choices[0].message.content
    )
    view = api_server.wait_final(key, first.id)
    assert view["idempotency_key"] == headers["Idempotency-Key"]  # as the tenant gave it


def test_errors_map_to_sdk_exceptions(api_server: ApiServer) -> None:
    key = api_server.key()
    client = sdk(api_server, key)
    with pytest.raises(openai.BadRequestError, match="unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=ask("x"))
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=ask("x"), top_p=0.5)
    with pytest.raises(openai.BadRequestError, match="priority low") as low:
        client.chat.completions.create(
            model=MODEL, messages=ask("x"), extra_headers={"X-Sheepdog-Priority": "low"}
        )
    assert low.value.code == "priority_not_supported"
    with pytest.raises(openai.BadRequestError, match="deadline"):
        client.chat.completions.create(
            model=MODEL, messages=ask("x"), extra_headers={"X-Sheepdog-Deadline": "2001-01-01"}
        )
    with pytest.raises(openai.AuthenticationError):
        sdk(api_server, "sk-sd-not-a-key").chat.completions.create(model=MODEL, messages=ask("x"))
    with pytest.raises(openai.NotFoundError):
        client.get("/requests/req_0123456789abcdef0123456789abcdef", cast_to=object)
    limited = sdk(api_server, api_server.key(rate_limit_per_minute=1))
    limited.models.list()  # the one call the rate allows, plus a burst of one
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as rate:
        limited.models.list()
    assert int(rate.value.response.headers["retry-after"]) >= 1


# Each was coerced (true -> 1, "10" -> 10, 10.0 -> 10, a null text part -> "None") or taken for
# no limit (max_completion_tokens 0); the native API refused them all.
NOT_COERCED: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_tokens must be positive"),
    ({"temperature": "0.5"}, "temperature"),
    ({"n": True}, "n"),
    ({"stream": "true"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "include_usage"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 12}]}]}, "a number"),
]


@pytest.mark.parametrize(("extra", "why"), NOT_COERCED)
def test_values_of_the_wrong_type_are_refused(
    api_server: ApiServer, extra: dict[str, Any], why: str
) -> None:
    key = api_server.key()
    with api_server.http(key) as http:
        body = {"model": MODEL, "messages": ask("coerce"), **extra}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (extra, r.status_code, r.text)
        assert why in r.json()["error"]["message"], (extra, r.text)
        assert http.get("/v1/requests").json()["data"] == []  # nothing enqueued


def test_budget_refusal_reaches_the_caller(api_server: ApiServer) -> None:
    tenant = new_tenant()
    with session_scope(api_server.settings.database_url) as session:
        set_budget(session, tenant, daily_usd=0)  # type: ignore[arg-type]
    client = sdk(api_server, api_server.key(tenant))
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=ask("over budget"))
    assert refused.value.status_code == 402
    assert refused.value.code == "budget_exceeded" and tenant in refused.value.message


def test_retried_stream_never_yields_spliced_text(api_server: ApiServer, simulator: Any) -> None:
    """The stream is cut after 3 chunks on its first attempt: the worker retries and resets.
    The OpenAI client gets the first attempt's text and then an error naming the request, never
    the second attempt's text after it; the request itself goes on and succeeds."""
    key = api_server.key()
    tag = f"cut {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "cut_after": 3, "first": 1}])
    stream = sdk(api_server, key).chat.completions.create(
        model=MODEL, messages=ask(tag), stream=True
    )
    parts: list[str] = []
    rid = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            rid = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    assert rid and rid in err.value.message and "restarted" in err.value.message
    view = api_server.wait_final(key, rid)
    assert view["status"] == "succeeded", view["error"]
    shown = "".join(parts)
    assert shown and view["text"].startswith(shown) and shown != view["text"]


def test_restart_before_any_text_is_invisible(api_server: ApiServer, simulator: Any) -> None:
    key = api_server.key()
    tag = f"cut0 {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "status": 503, "first": 1}])
    out = sdk(api_server, key).chat.completions.create(model=MODEL, messages=ask(tag), stream=True)
    chunks = list(out)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    view = api_server.wait_final(key, chunks[0].id)
    assert view["status"] == "succeeded", view["error"]
    assert text == view["text"]


def test_a_failed_request_is_an_error_both_ways(api_server: ApiServer, simulator: Any) -> None:
    """The provider refuses (400, not retried): the request ends failed, and the SDK raises."""
    key = api_server.key()
    tag = f"refused {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "status": 400}])
    client = sdk(api_server, key)
    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model=MODEL, messages=ask(tag))
    assert whole.value.status_code == 502 and whole.value.code == "request_failed"
    assert whole.value.response.headers["x-should-retry"] == "false"
    rid = whole.value.message.split("request ", 1)[1].split(" ", 1)[0]
    assert api_server.wait_final(key, rid)["status"] == "failed"
    with pytest.raises(openai.APIError, match="failed: provider rejected"):
        for _ in client.chat.completions.create(model=MODEL, messages=ask(tag), stream=True):
            pass


def test_service_tier_maps_to_a_lane(api_server: ApiServer) -> None:
    """OpenAI's `service_tier`: priority asks for the priority lane (a high request; the test
    provider sells no tiers, so it runs on the standard stream lane and says why), default
    changes nothing, flex is refused in OpenAI's error shape with nothing enqueued."""
    key = api_server.key()
    client = sdk(api_server, key)
    out = client.chat.completions.create(
        model=MODEL, messages=ask("tier priority"), service_tier="priority"
    )
    view = api_server.wait_final(key, out.id)
    assert view["status"] == "succeeded", view["error"]
    assert view["priority"] == "high" and view["lane"] == "stream", view
    plain = client.chat.completions.create(
        model=MODEL, messages=ask("tier default"), service_tier="default"
    )
    assert api_server.wait_final(key, plain.id)["status"] == "succeeded"
    with pytest.raises(openai.BadRequestError, match="service_tier flex") as err:
        client.chat.completions.create(model=MODEL, messages=ask("tier flex"), service_tier="flex")
    assert err.value.code == "service_tier_not_supported"
    with pytest.raises(openai.BadRequestError, match="lane 'priority' is for priority high"):
        client.chat.completions.create(
            model=MODEL,
            messages=ask("tier priority, normal"),
            service_tier="priority",
            extra_headers={"X-Sheepdog-Priority": "normal"},
        )
