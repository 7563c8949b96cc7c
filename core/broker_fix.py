"""A fix for Celery 5.7 / kombu 5.7 on Redis: a worker must outlive its broker going away.

When the broker connection drops, Celery's consumer `collect()`s the connection, which detaches
its transport (`transport.client = None`), and reconnects with a new one. Two things still use
the old channel afterwards: the consumer's `close()` of the old connection (it tries to restore
the unacknowledged messages again) and the acknowledgement of every task that was running
during the outage. Both reach `Channel._connparams`, which reads the detached client:
AttributeError ('NoneType' object has no attribute 'hostname'). Neither caller expects that
error, so the consumer reports an "Unrecoverable error" and the worker shuts down (seen with a
Redis restart while stream tasks ran; tests/test_faults_services.py).

A channel whose transport was detached has no broker left to talk to: saying so with the
transport's own connection error lets both callers do what they do for a lost connection (skip
the close; log "Couldn't ack"). The message was in the old broker's unacked set: a restarted,
empty Redis has lost it anyway; a Redis that kept it re-delivers it after the visibility
timeout, and the task, idempotent, finds its request ended and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_connparams = kombu_redis.Channel._connparams


def _connparams_of_live_transport(self: Any, asynchronous: bool = False) -> Any:
    if self.connection.client is None:
        raise redis.exceptions.ConnectionError("this channel's broker connection is closed")
    return _connparams(self, asynchronous=asynchronous)


# kombu builds a new redis-py client object for every command that is not handed one (each
# publish, each event flush, each QoS append and ack): ~0.3 ms of Python apiece here, building
# the client's table of ~170 response callbacks, on the producer's path to LPUSH and on the
# consumer's path from BRPOP to the task. A client object holds no connection of its own (it
# takes one from the channel's pool per command, thread-safely), so one per channel and pool
# does the same work; a new pool (after a reconnect or a fork) gets a new client.
@contextmanager
def _conn_or_reuse(self: Any, client: Any = None) -> Iterator[Any]:
    if client:
        yield client
        return
    pool = self.pool
    cached = self.__dict__.get("_sheepdog_sync_client")
    if cached is None or cached.connection_pool is not pool:
        cached = self._create_client()
        self.__dict__["_sheepdog_sync_client"] = cached
    yield cached


def install() -> None:
    """Patch kombu's Redis channel, for this process: called when the process builds its first
    Celery app (core/celery_app.celery_for: a worker's, beat's, Flower's, or a producer's first
    send), never at import. Idempotent."""
    kombu_redis.Channel._connparams = _connparams_of_live_transport  # type: ignore[method-assign]
    kombu_redis.Channel.conn_or_acquire = _conn_or_reuse  # type: ignore[method-assign]
