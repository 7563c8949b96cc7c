"""Fault suite, Redis losing its data the hostile way: SIGKILLed 1.5 s after a burst of 300
streams and 2,000 low-priority requests was submitted (intake and claims still under way,
streams in flight, followers reading), then started again empty. Every request whose id
`submit` returned must end (the producer wrote its row first), and every follower must end
with the stored answer: none shown a replay log with a gap as an answer, none left waiting on a
log that lost its end. A redis-server of this module's own (never the machine's
6379), a PostgreSQL database of the module's own, real workers and beat, the simulator."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from streaming.subscriber import StreamFailed
from tests.fixtures.faults import Deployment, Figures, tally, wait_final
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

STREAMS, LOW, FOLLOWED = 300, 2000, 60


def request(text: str, priority: str) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": priority,
        "max_tokens": 30,
    }


def follow(client: Any, rid: str, out: dict[str, str], errors: dict[str, str]) -> None:
    stream = client.stream(rid, timeout=150)
    try:
        for _ in stream:
            pass
        out[rid] = stream.text
    except StreamFailed as err:
        errors[rid] = err.reason
    except Exception as err:
        errors[rid] = repr(err)


def test_redis_killed_right_after_a_burst_loses_nothing(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    tag = f"redisloss {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 60}])
    procs = [
        dep.stream_worker("stream", concurrency=400),
        dep.batch_worker("batch"),
        dep.stack.start_beat(name="beat"),
    ]
    client = dep.client()
    texts: dict[str, str] = {}
    errors: dict[str, str] = {}
    try:
        streams = client.submit_many(
            [request(f"{tag} s{i}", "high" if i % 2 else "normal") for i in range(STREAMS)]
        )
        threads = [
            threading.Thread(target=follow, args=(client, rid, texts, errors), daemon=True)
            for rid in streams[:FOLLOWED]
        ]
        for t in threads:
            t.start()
        low = client.submit_many([request(f"{tag} b{i}", "low") for i in range(LOW)])
        time.sleep(1.5)
        dep.redis_server.kill()  # queues, unacked messages, locks, replay logs: all gone
        killed_at = time.monotonic()
        time.sleep(1)
        dep.redis_server.start()  # same port, empty
        everything = streams + low
        wait_final(settings, everything, 150)
        stuck = time.monotonic() - killed_at
        for t in threads:
            t.join(60)
        assert all(p.alive() for p in procs)
    finally:
        for p in procs:
            p.stop()
    t = tally(settings, everything)
    checked = check_invariants(settings, everything, texts)
    fault_figures.record(
        "Redis SIGKILLed 1.5 s after submit (intake and claims under way), restarted empty",
        t,
        f"{STREAMS} streams + {LOW} low; {FOLLOWED} followers live, {len(errors)} of them failed",
        garbled=checked.garbled,
        stuck_s=stuck,
    )
    assert t.lost == 0 and t.succeeded == len(everything), t
    # Every follower ends with the stored answer, soon after its row: one whose log lost its
    # end reads the row (streaming/subscriber.py), rather than waiting out its timeout.
    assert not errors, errors
    assert len(texts) == FOLLOWED
