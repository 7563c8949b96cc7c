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

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_connparams = kombu_redis.Channel._connparams


def _connparams_of_live_transport(self: Any, asynchronous: bool = False) -> Any:
    if self.connection.client is None:
        raise redis.exceptions.ConnectionError("this channel's broker connection is closed")
    return _connparams(self, asynchronous=asynchronous)


kombu_redis.Channel._connparams = _connparams_of_live_transport  # type: ignore[method-assign]
