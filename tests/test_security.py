"""Security at the message layer: JSON only, unguessable ids, no key in messages."""

from __future__ import annotations

import pickle
import time
import uuid

import pytest
from kombu import Connection, Exchange, Producer
from sqlalchemy import select

from core.db import session_scope
from models.tables import Request


@pytest.fixture(scope="module")
def lone_worker(stack):  # type: ignore[no-untyped-def]
    """A worker on a Redis DB of its own, so its log shows what it did with our message."""
    redis_url = stack.env["SHEEPDOG_REDIS_URL"].rsplit("/", 1)[0] + "/3"  # see fixtures/services.py
    proc = stack.start_worker(
        queues="default",
        concurrency=2,
        name="lone",
        env={"SHEEPDOG_REDIS_URL": redis_url, "SHEEPDOG_BROKER_PREFIX": ""},
    )
    yield proc, redis_url
    proc.stop()


def test_a_pickled_message_is_refused(lone_worker, stack) -> None:  # type: ignore[no-untyped-def]
    from core.settings import Settings
    from sheepdog.client import Client

    proc, redis_url = lone_worker
    item = Client(Settings(redis_url=redis_url)).prepare(
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": "pickled"}],
            "priority": "low",
        }
    )
    task_id = str(uuid.uuid4())
    body = pickle.dumps(([[item.model_dump(mode="json")]], {}, {}))
    with Connection(redis_url) as conn:
        Producer(conn).publish(
            body,
            exchange=Exchange("default", type="direct"),
            routing_key="default",
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={
                "lang": "py",
                "task": "sheepdog.intake",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "argsrepr": "",
                "kwargsrepr": "",
            },
        )
    deadline = time.monotonic() + 20
    while "Refusing to deserialize" not in proc.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Refusing to deserialize untrusted content of type pickle" in proc.log_text()
    assert proc.alive()
    with session_scope(stack.env["SHEEPDOG_DATABASE_URL"]) as session:
        assert session.scalar(select(Request).where(Request.id == item.id)) is None


@pytest.mark.unit
def test_request_ids_are_random_and_unguessable() -> None:
    from models.request import new_request_id

    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 36 and i.startswith("req_") for i in ids)  # 128 random bits in hex


def test_the_api_key_never_travels_in_a_task_message(settings_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from core.settings import Settings
    from sheepdog.client import Client

    secret = "sk-do-not-leak-" + uuid.uuid4().hex
    monkeypatch.setenv("SHEEPDOG_OPENAI_API_KEY", secret)
    client = Client(Settings())
    item = client.prepare(
        {"model": "sheepdog-mini", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert secret not in item.model_dump_json()
    assert "prompt" not in item.argsrepr() and "hi" not in item.argsrepr().split()
