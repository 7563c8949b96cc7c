"""The per-stream Redis reads of a worker's loop, batched across streams.

Every stream reads Redis twice before its first token: its cancel flag before the provider
call, and once it owns the row the flag again plus (for a row taken over from an earlier
attempt) the last message of its replay log. A thousand streams starting at once made that two
thousand commands, each a round trip and a pooled connection on the loop; here whatever is
pending goes out as ONE script call per round trip (as the publisher does for messages), so a
lone stream waits one round trip as before and a burst costs a few.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from core import keys
from streaming.drain import drain_forever

log = logging.getLogger("sheepdog.streaming.lookups")

# Lua: what a replay log holds, read whole (only for a stream taken over from an earlier
# attempt, whose text the provider billed): its newest message, its `token` messages and the
# runs of them (a `reset` ends a run: a call). A message's type is the first "type" of its JSON
# (encode writes it before any text).
LOG_TEXT = """
local function log_text(key)
  local entries = redis.call('XRANGE', key, '-', '+')
  if #entries == 0 then return nil end
  local tokens, runs, open = 0, 0, false
  for _, entry in ipairs(entries) do
    local kind = string.match(entry[2][2], '"type":"(%a+)"')
    if kind == 'token' then
      tokens = tokens + 1
      if not open then runs = runs + 1; open = true end
    elseif kind == 'reset' then
      open = false
    end
  end
  return {entries[#entries][2][2], tokens, runs}
end
"""
# KEYS: cancel flags, then replay logs; ARGV[1]: how many flags. Returns 1/0 per flag, then per
# log what it holds (LOG_TEXT), or nil when the log is empty.
LOOKUP = (
    LOG_TEXT
    + """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  out[i] = redis.call('EXISTS', KEYS[i])
end
for i = n + 1, #KEYS do
  out[i] = log_text(KEYS[i]) or false
end
return out
"""
)
# KEYS[1]: one replay log; returns what it holds (LOG_TEXT), or nil.
ONE_LOG = LOG_TEXT + "return log_text(KEYS[1])"


@dataclass(frozen=True, slots=True)
class LogSeen:
    """What a replay log holds for a stream taken over from an earlier attempt: its newest
    message, and the text sent before (token messages, and the runs of them: calls)."""

    last: bytes
    tokens: int
    runs: int

    @classmethod
    def of(cls, reply: Any) -> LogSeen | None:
        """From LOG_TEXT's reply (None: an empty log)."""
        if not reply:
            return None
        message, tokens, runs = reply
        return cls(message, int(tokens), int(runs))


def log_seen(client: Any, names: keys.Keys, request_id: str) -> LogSeen | None:
    """What the request's replay log holds, read now (a sync Redis client): for the janitor,
    which fails a stream its workers kept losing."""
    return LogSeen.of(client.eval(ONE_LOG, 1, names.replay_log(request_id)))


_Reply = tuple[bool, LogSeen | None]
_Pending = tuple[str, bool, "asyncio.Future[_Reply]"]


class Lookups:
    """Batches the cancel-flag and last-message reads of all streams of a process."""

    def __init__(self, client: aioredis.Redis, names: keys.Keys) -> None:
        self._names = names
        self._script = client.register_script(LOOKUP)
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()

    async def cancelled(self, request_id: str) -> bool:
        """Whether the request's cancel flag is set."""
        flag, _ = await self._ask(request_id, False)
        return flag

    async def cancelled_and_log(self, request_id: str) -> _Reply:
        """The cancel flag and what the replay log holds (None when empty)."""
        return await self._ask(request_id, True)

    def _ask(self, request_id: str, last: bool) -> asyncio.Future[_Reply]:
        done: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, last, done))
        self._wake.set()
        return done

    async def run(self) -> None:
        """The batch loop; runs for the life of the process."""
        await drain_forever(self._wake, self._take, self._lookup)

    def _take(self) -> list[_Pending]:
        batch, self._pending = self._pending, []
        return batch

    async def _lookup(self, batch: list[_Pending]) -> None:
        flags = [self._names.cancel_flag(rid) for rid, _, _ in batch]
        logs = [self._names.replay_log(rid) for rid, last, _ in batch if last]
        try:
            reply: list[Any] = await self._script(keys=flags + logs, args=[len(flags)])
        except asyncio.CancelledError:
            raise
        except Exception as err:  # each caller handles a Redis error as before (a retry)
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(err)
            return
        at = len(flags)
        for i, (_, last, done) in enumerate(batch):
            seen = None
            if last:
                seen = LogSeen.of(reply[at])
                at += 1
            if not done.done():
                done.set_result((bool(reply[i]), seen))
