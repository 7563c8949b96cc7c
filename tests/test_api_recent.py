"""The API process's memory of the streams it has just submitted (sheepdog/api/recent.py): a
tenant's own id is known, another's is not, and entries are forgotten after keep_s to 2x."""

from __future__ import annotations

import pytest

from sheepdog.api.recent import RecentStreams, keep_for

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_known_for_keep_s_to_twice_that_then_forgotten() -> None:
    clock = Clock()
    recent = RecentStreams(10.0, clock)
    recent.add("acme", ["req_a", "req_b"])
    assert recent.tenant_of("req_a") == "acme" and recent.tenant_of("req_x") is None
    clock.now += 11  # 11 s old: still known (now the older generation)
    assert recent.tenant_of("req_a") == "acme"
    recent.add("other", ["req_c"])
    clock.now += 10  # req_a 21 s old: forgotten; req_c (10 s) still known
    assert recent.tenant_of("req_a") is None and recent.tenant_of("req_c") == "other"
    recent.add("acme", ["req_x"])  # 121: a new generation
    clock.now += 15  # 136: a turn; req_x (15 s) is in the old generation
    recent.add("other", ["req_y"])
    assert recent.tenant_of("req_x") == "acme"
    clock.now += 6  # 142: req_x 21 s old: forgotten, though no turn came since
    assert recent.tenant_of("req_x") is None and recent.tenant_of("req_y") == "other"
    clock.now += 100  # a long quiet spell forgets everything at once
    assert recent.tenant_of("req_y") is None and len(recent) == 0


def test_keep_follows_the_replay_logs_done_ttl() -> None:
    assert keep_for(3600, 60) == 15.0
    assert keep_for(3600, 10) == 5.0
    assert keep_for(8, 60) == 4.0  # the shorter of the two
    assert keep_for(3600, 1) == 0.0  # logs kept a second: the row is always asked
    off = RecentStreams(keep_for(3600, 1))
    off.add("acme", ["req_a"])
    assert off.tenant_of("req_a") is None
