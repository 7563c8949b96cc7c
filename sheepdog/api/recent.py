"""The streaming requests this API process has just submitted, and whose they are.

A caller that follows a stream opens its event stream right after the POST (sheepdog-client
does, on the same keep-alive connection, so the same process): with the tenant known here that
GET needs no database lookup before it starts following. A request's tenant never changes, so
an entry is never wrong, only forgotten: after `keep_s` to twice that. While an entry lives the
request's replay log still holds its end if it has ended (a log is kept at least twice `keep_s`
after its last message), so the follower may treat the row as open. Only ids this call minted
are kept: a request with an idempotency key may be answered with an older request's id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

KEEP_S = 15.0


def keep_for(replay_ttl_s: int, replay_done_ttl_s: int) -> float:
    """How long entries live: KEEP_S, or less when the replay logs are kept shorter (0: off)."""
    keep = min(KEEP_S, min(replay_ttl_s, replay_done_ttl_s) / 2)
    return keep if keep >= 1.0 else 0.0


class RecentStreams:
    """Request id -> tenant for the streams submitted in the last `keep_s` (to 2x) seconds;
    two generations of dicts, so forgetting costs nothing per entry. Event loop only."""

    def __init__(self, keep_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._keep = keep_s
        self._clock = clock
        self._new: dict[str, str] = {}
        self._old: dict[str, str] = {}
        self._since = clock()  # when the new generation began
        self._old_since = self._since - 2 * keep_s  # when the old one began

    def add(self, tenant: str, ids: Iterable[str]) -> None:
        if self._keep <= 0:
            return
        self._turn()
        for rid in ids:
            self._new[rid] = tenant

    def tenant_of(self, request_id: str) -> str | None:
        """The tenant that submitted it here lately, or None (not known here: ask the row)."""
        self._turn()
        found = self._new.get(request_id)
        if found is None and self._clock() - self._old_since < 2 * self._keep:
            found = self._old.get(request_id)
        return found

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def _turn(self) -> None:
        now = self._clock()
        age = now - self._since
        if age < self._keep:
            return
        # A generation begun 2 x keep_s ago holds nothing worth keeping.
        self._old = self._new if age < 2 * self._keep else {}
        self._old_since = self._since
        self._new, self._since = {}, now
