"""What a stream is charged for text no answer's usage pays for (streaming/billing.py), and what
a worker taking a stream over reads of the text earlier attempts sent (streaming/lookups.py,
on a real Redis): the token messages of the replay log and their runs, never its resets."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from core import keys
from core.settings import Settings
from models.stream_message import encode
from streaming.billing import Billed
from streaming.end import TakenBack
from streaming.lookups import Lookups
from streaming.publisher import FIELD


@pytest.mark.unit
def test_what_is_billed_beside_an_answer_or_for_a_cut() -> None:
    assert Billed().cut(10, 0, "") == {} and Billed().before(lambda: 10, answered=True) is None
    assert Billed(calls=1).before(lambda: 10, answered=True) is None  # the answer's own call
    assert Billed(calls=2, pieces=5).before(lambda: 10, answered=True) == TakenBack(10, 5)
    assert Billed(calls=1, pieces=5).before(lambda: 10, answered=False) == TakenBack(10, 5)
    cut = Billed(calls=2, pieces=5).cut(10, 3, "a b c")
    assert cut == {"prompt_tokens": 20, "completion_tokens": 8, "usage_estimated": True}


def _log_of(settings: Settings, rid: str, types: list[str]) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    key = keys.of(settings).replay_log(rid)
    for seq, kind in enumerate(types):
        text = '"type":"reset"' if kind == "token" else None  # a text that looks like a type
        client.xadd(key, {FIELD: encode(rid, seq, kind, text=text)})  # type: ignore[arg-type]
    client.expire(key, 60)


@pytest.mark.parametrize(
    ("types", "tokens", "runs"),
    [
        (["reset"], 0, 0),  # the janitor's fence alone: a worker killed before its first text
        (["token", "token", "reset"], 2, 1),
        (["token", "reset", "token", "token", "reset", "reset", "token"], 4, 3),
    ],
)
def test_a_taken_over_log_is_read_as_the_text_it_holds(
    redis_url: str, types: list[str], tokens: int, runs: int
) -> None:
    """A log was charged a piece a seq: the janitor's reset alone cost a prompt and a piece."""
    settings = Settings(redis_url=redis_url, broker_prefix=f"t-bill-{uuid.uuid4().hex[:6]}:")
    rid = "req_" + uuid.uuid4().hex
    _log_of(settings, rid, types)

    async def read() -> tuple[bool, object]:
        client = aioredis.Redis.from_url(redis_url)
        lookups = Lookups(client, keys.of(settings))
        loop = asyncio.create_task(lookups.run())
        try:
            empty = await lookups.cancelled_and_log("req_" + uuid.uuid4().hex)
            assert empty == (False, None)
            return await lookups.cancelled_and_log(rid)
        finally:
            loop.cancel()
            await client.aclose()

    cancelled, seen = asyncio.run(read())
    assert not cancelled and seen is not None
    assert (seen.tokens, seen.runs) == (tokens, runs)  # type: ignore[attr-defined]
    assert f'"seq":{len(types) - 1}'.encode() in seen.last  # type: ignore[attr-defined]
