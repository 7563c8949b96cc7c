"""A follower whose replay log loses its end (Redis restarted empty after the follower's last
entry, or the log expired) ends with the stored row's answer within a few seconds of the row's
end, instead of waiting on an empty log until its timeout; what it shows is the stored text."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import update

from core import keys
from core.db import session_scope
from core.settings import Settings
from models.stream_message import encode
from models.tables import Request
from streaming.publisher import FIELD
from streaming.subscriber import RESET, ROW_CHECK_S, astream_text, stream_text
from tests.fixtures.costs import insert_rows, make_item


def _started(settings: Settings, shown: str) -> str:
    """A request with a row (streaming) and a replay log holding one token, no end."""
    item = make_item(settings, f"t-{uuid.uuid4().hex[:8]}", priority="high")
    insert_rows(settings.database_url, [item])
    with session_scope(settings.database_url) as session:
        session.execute(update(Request).where(Request.id == item.id).values(status="streaming"))
    r = redis.Redis.from_url(settings.redis_url)
    r.xadd(keys.of(settings).replay_log(item.id), {FIELD: encode(item.id, 0, "token", text=shown)})
    return item.id


def _end_row(settings: Settings, rid: str, text: str, after_s: float) -> threading.Timer:
    def end() -> None:
        with session_scope(settings.database_url) as session:
            session.execute(
                update(Request)
                .where(Request.id == rid)
                .values(status="succeeded", text=text, finish_reason="stop")
            )

    timer = threading.Timer(after_s, end)
    timer.start()
    return timer


@pytest.mark.parametrize("shown", ["Hello world", "Hello"])
def test_a_follower_ends_from_the_row_when_the_log_holds_no_end(
    db_url: str, redis_url: str, shown: str
) -> None:
    settings = Settings(database_url=db_url, redis_url=redis_url)
    rid = _started(settings, shown)
    _end_row(settings, rid, "Hello world", after_s=0.5)
    t0 = time.monotonic()
    follower = stream_text(rid, timeout=30, settings=settings)
    pieces = list(follower)
    took = time.monotonic() - t0
    # What was shown since the last reset is the stored text.
    last_reset = max((i for i, p in enumerate(pieces) if p is RESET), default=-1)
    assert "".join(pieces[last_reset + 1 :]) == "Hello world", pieces
    assert follower.result is not None and follower.result.text == "Hello world"
    assert pieces == (["Hello world"] if shown == "Hello world" else [shown, RESET, "Hello world"])
    assert took < 2 * ROW_CHECK_S + 5, took  # not the 30 s timeout


def test_the_async_follower_too(db_url: str, redis_url: str) -> None:
    settings = Settings(database_url=db_url, redis_url=redis_url)
    rid = _started(settings, "Hel")
    _end_row(settings, rid, "Hello world", after_s=0.5)

    async def follow() -> tuple[list[Any], str]:
        follower = astream_text(rid, timeout=30, settings=settings)
        pieces = [piece async for piece in follower]
        return pieces, follower.text

    pieces, text = asyncio.run(follow())
    assert pieces == ["Hel", RESET, "Hello world"] and text == "Hello world", pieces


def test_a_follower_ends_from_the_row_while_redis_is_away(db_url: str, redis_url: str) -> None:
    settings = Settings(database_url=db_url, redis_url=redis_url)
    rid = _started(settings, "Hel")
    _end_row(settings, rid, "Hello world", after_s=0).join()
    away = Settings(database_url=db_url, redis_url="redis://127.0.0.1:1/0")  # nothing listens
    t0 = time.monotonic()
    follower = stream_text(rid, timeout=30, settings=away)
    assert list(follower) == ["Hello world"]
    assert time.monotonic() - t0 < 2 * ROW_CHECK_S + 5
