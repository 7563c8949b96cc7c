"""A provider's request and token limits, shared by every worker through Redis.

The limiter is GCRA (the generic cell rate algorithm, as in leaky-bucket-as-meter) with no burst:
each request moves the provider's "theoretical arrival time" forward by 60/rpm seconds and each
token by 60/tpm, in one atomic Lua script on Redis' own clock. A caller may go when the arrival
time is not in the future, so in any window of a minute at most rpm + 1 requests start and the
long-run rate is exactly the configured one. A 429 pushes the arrival time past its Retry-After for
every worker at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from core import keys

# Shared by the scripts: Redis' own clock in microseconds, a key's theoretical arrival time
# (never in the past), and storing one (%d keeps every microsecond: a plain number would be
# written as 1.7e+15).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function tat(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v < now then return now end
  return v
end
local function store(key, value)
  local ttl = math.floor((value - now) / 1000) + 60000
  redis.call('SET', key, string.format('%d', value), 'PX', ttl)
end
"""

_ACQUIRE = (
    _PRELUDE
    + """
local req_us = tonumber(ARGV[1])
local tok_us = tonumber(ARGV[2]) * tonumber(ARGV[3])
local burst_us = tonumber(ARGV[4] or '0')
local tat_r = tat(KEYS[1])
local tat_t = tat(KEYS[2])
local wait = 0
if req_us > 0 and tat_r - burst_us > now then wait = tat_r - burst_us - now end
if tok_us > 0 and tat_t > now and tat_t - now > wait then wait = tat_t - now end
if wait > 0 then return wait end
if req_us > 0 then store(KEYS[1], tat_r + req_us) end
if tok_us > 0 then store(KEYS[2], tat_t + tok_us) end
return 0
"""
)

_PENALIZE = (
    _PRELUDE
    + """
local until_us = now + tonumber(ARGV[1])
if tat(KEYS[1]) < until_us then store(KEYS[1], until_us) end
return 0
"""
)


# Reserve the next free slot instead of asking "may I go now?": the slot is the later of the two
# arrival times (never before now), both move on from it, and the caller sleeps until it. A
# caller that wakes late loses nothing, so a saturated pacer runs at the configured rate rather
# than rate / (1 + wake-up delay / interval). Starts stay at least one interval apart.
_RESERVE = (
    _PRELUDE
    + """
local req_us = tonumber(ARGV[1])
local tok_us = tonumber(ARGV[2]) * tonumber(ARGV[3])
local slot = math.max(tat(KEYS[1]), tat(KEYS[2]))
if req_us > 0 then store(KEYS[1], slot + req_us) end
if tok_us > 0 then store(KEYS[2], slot + tok_us) end
return slot - now
"""
)


@dataclass(frozen=True)
class RateLimits:
    """A limiter's rates (None: that dimension is not limited)."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    # Requests that may start at once above the rate (GCRA's burst tolerance; 0 for providers,
    # whose pacers want starts spread out; the front door's per-key limits allow a few).
    burst: int = 0

    def burst_us(self) -> float:
        per_req, _ = self.intervals_us()
        return per_req * self.burst

    def intervals_us(self) -> tuple[float, float]:
        per_req = 60e6 / self.requests_per_minute if self.requests_per_minute else 0.0
        per_tok = 60e6 / self.tokens_per_minute if self.tokens_per_minute else 0.0
        return per_req, per_tok


class RateLimiter:
    """Blocking limiter for one provider (thread-safe; shares state through Redis)."""

    def __init__(
        self, client: redis.Redis, provider: str, limits: RateLimits, names: keys.Keys
    ) -> None:
        self.provider = provider
        self.limits = limits
        self._keys = [names.rate_limit(provider, "requests"), names.rate_limit(provider, "tokens")]
        self._acquire = client.register_script(_ACQUIRE)
        self._penalize = client.register_script(_PENALIZE)

    def try_acquire(self, tokens: int) -> float:
        """Take one request and `tokens` tokens if allowed now: 0.0; else seconds to wait."""
        per_req, per_tok = self.limits.intervals_us()
        wait_us = self._acquire(
            keys=self._keys, args=[per_req, per_tok, max(tokens, 0), self.limits.burst_us()]
        )
        return int(wait_us) / 1e6

    def acquire(self, tokens: int, timeout: float | None = None) -> None:
        """Wait until one request with `tokens` tokens may start; TimeoutError past `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (wait := self.try_acquire(tokens)) > 0:
            if deadline is not None and time.monotonic() + wait > deadline:
                raise TimeoutError(f"rate limit of {self.provider}: no slot within {timeout}s")
            time.sleep(wait)

    def penalize(self, seconds: float) -> None:
        """Hold every worker's next request to this provider for `seconds` (a 429's
        Retry-After)."""
        self._penalize(keys=[self._keys[0]], args=[int(seconds * 1e6)])


class AsyncRateLimiter:
    """The asyncio twin of RateLimiter (same keys, same script)."""

    def __init__(
        self, client: aioredis.Redis, provider: str, limits: RateLimits, names: keys.Keys
    ) -> None:
        self.provider = provider
        self.limits = limits
        self._keys = [names.rate_limit(provider, "requests"), names.rate_limit(provider, "tokens")]
        self._acquire = client.register_script(_ACQUIRE)
        self._reserve = client.register_script(_RESERVE)
        self._penalize = client.register_script(_PENALIZE)

    async def try_acquire(self, tokens: int) -> float:
        """Take one request and `tokens` tokens if allowed now: 0.0; else seconds to wait."""
        per_req, per_tok = self.limits.intervals_us()
        wait_us = await self._acquire(
            keys=self._keys, args=[per_req, per_tok, max(tokens, 0), self.limits.burst_us()]
        )
        return int(wait_us) / 1e6

    async def acquire(self, tokens: int) -> None:
        per_req, per_tok = self.limits.intervals_us()
        while True:
            wait_us = await self._acquire(keys=self._keys, args=[per_req, per_tok, max(tokens, 0)])
            if int(wait_us) <= 0:
                return
            await asyncio.sleep(int(wait_us) / 1e6)

    async def reserve(self, tokens: int) -> None:
        """Take the next free slot for one request with `tokens` tokens and sleep until it
        (for a pacer that starts calls one after another: no slot is lost to wake-up delay)."""
        per_req, per_tok = self.limits.intervals_us()
        wait_us = await self._reserve(keys=self._keys, args=[per_req, per_tok, max(tokens, 0)])
        if int(wait_us) > 0:
            await asyncio.sleep(int(wait_us) / 1e6)

    async def penalize(self, seconds: float) -> None:
        await self._penalize(keys=[self._keys[0]], args=[int(seconds * 1e6)])
