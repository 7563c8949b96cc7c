"""Messages published outside the stream engine's loop: by the janitor, a cancel, or a request
cancelled before it started."""

from __future__ import annotations

from core import keys
from core.redis_conn import get_redis
from core.settings import Settings
from models.stream_message import encode
from streaming.publisher import Mode, last_message, next_seq, publish_now


def publish_error(
    settings: Settings, request_id: str, reason: str, type_: str = "error", *, attempts: int
) -> int:
    """Publish one message outside the engine's loop as attempt `attempts` (an `error` ends the
    log; a `reset` takes the stream over from every older attempt); the seq it went out with,
    or -1 when the fence refused it."""
    redis = get_redis(settings.redis_url)
    names = keys.of(settings)
    seq = next_seq(last_message(redis, names, request_id))  # used only if the fence was lost
    payload = encode(request_id, seq, type_, error=reason if type_ == "error" else None)  # type: ignore[arg-type]
    mode = Mode.FINAL if type_ == "error" else Mode.TAKE_OVER
    # An error ends the request (its row is final already): the log is kept the short TTL.
    return publish_now(
        redis,
        names,
        request_id,
        payload,
        settings.replay_ttl_s,
        attempts,
        mode,
        done_ttl_s=settings.replay_done_ttl_s,
    )
