"""Redis clients: one blocking pool per process, sized for a threads pool of streams."""

from __future__ import annotations

from functools import lru_cache

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo

from core.errors import REDIS_HINT, ServiceUnavailable, redact_url

POOL_SIZE = 400
ASYNC_POOL_SIZE = 64


def _url(url: str | None) -> str:
    if url is None:
        from core.settings import get_settings

        url = get_settings().redis_url
    return url


@lru_cache(maxsize=1)
def _driver_info() -> DriverInfo:
    """What each connection tells Redis it is (CLIENT SETINFO), made once: redis-py otherwise
    looks its own version up in the package metadata at every connect (~0.3 ms of CPU here, which a
    burst of new connections pays hundreds of times)."""
    return DriverInfo()


@lru_cache(maxsize=8)
def get_redis(url: str | None = None) -> redis.Redis:
    """A client on a BlockingConnectionPool (waits for a free connection rather than failing
    with MaxConnectionsError when hundreds of threads share it)."""
    pool = redis.BlockingConnectionPool.from_url(
        _url(url),
        max_connections=POOL_SIZE,
        timeout=30,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=30,
        retry_on_timeout=True,
        driver_info=_driver_info(),
    )
    return redis.Redis(connection_pool=pool)


def new_async_redis(url: str | None = None, max_connections: int = 0) -> aioredis.Redis:
    """An asyncio client; one per event loop (asyncio clients cannot cross loops). A command
    that meets a dead pooled connection (Redis restarted) reconnects and tries again.

    Its pool waits for a free connection rather than failing: a worker's loop starting a burst
    of streams sends hundreds of commands at once, and a pool that raised MaxConnectionsError
    failed some of them after their row was claimed (left streaming until the janitor). One
    loop gains nothing from more connections than this (Redis runs one command at a time), and
    each connection it opens costs the loop a connect and a handshake. `max_connections`
    (default ASYNC_POOL_SIZE) is for a pool of blocking reads, one connection each."""
    pool = aioredis.BlockingConnectionPool.from_url(
        _url(url),
        max_connections=max_connections or ASYNC_POOL_SIZE,
        timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        driver_info=_driver_info(),
    )
    return aioredis.Redis.from_pool(pool)


def check_redis(url: str | None = None) -> None:
    """Raise ServiceUnavailable (one line) when Redis does not answer a PING."""
    url = _url(url)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        raise ServiceUnavailable("Redis", redact_url(url), REDIS_HINT) from None
