"""Fault suite, streaming path: a stream worker SIGKILLed with 100 streams in flight, and the
provider's faults (429 storms, 5xx, 400, cut, stalled and slow streams). Real worker and beat
processes, a redis-server and a PostgreSQL database of this module's own, the simulator."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import select

from core import keys
from core.db import session_scope
from models.tables import CostEntry
from rules.tokens import count_message_tokens
from streaming.subscriber import events
from tests.fixtures.faults import Deployment, Figures, tally, wait_final, wait_for
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

MODEL = "sheepdog-mini"


def request(text: str, priority: str = "high") -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "priority": priority}


def direct_answer(simulator: Any, body: dict[str, Any]) -> str:
    """The simulator's answer to the same body, bypassing Sheepdog (answers are deterministic)."""
    from openai import OpenAI

    sdk = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0)
    try:
        return sdk.chat.completions.create(**body).choices[0].message.content or ""
    finally:
        sdk.close()


def followed(msgs: list[Any]) -> str:
    """What a follower that drops what it showed at each `reset` ends with."""
    shown: list[str] = []
    for m in msgs:
        if m.type == "reset":
            shown.clear()
        elif m.type == "token":
            shown.append(m.text or "")
    return "".join(shown)


def log_types(dep: Deployment, rid: str) -> list[Any]:
    """Every message of the request's replay log, checked to be in seq order without gaps."""
    msgs = list(events(rid, timeout=10, settings=dep.settings))
    assert [m.seq for m in msgs] == list(range(len(msgs))), rid
    return msgs


def test_sigkill_stream_worker_with_100_streams_in_flight(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    tag = f"kill100 {uuid.uuid4().hex}"
    # Slow tokens (20-60 of them, 100 ms apart): every stream is still running at the kill.
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 100}])
    doomed = dep.stream_worker("doomed", concurrency=120)
    client = dep.client()
    ids = client.submit_many(
        [request(f"{tag} #{i}", "high" if i % 5 == 0 else "normal") for i in range(100)]
    )
    r = redis.Redis.from_url(settings.redis_url)

    def shown() -> list[int]:
        with r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.xlen(keys.of(settings).replay_log(rid))
            return list(pipe.execute())

    wait_for(lambda: all(shown()), 60, "100 streams showing text")
    doomed.kill()  # SIGKILL: no cleanup, rows left `streaming`, replay logs half written
    before = dict(zip(ids, shown(), strict=True))
    heir = dep.stream_worker("heir", concurrency=150)
    beat = dep.stack.start_beat(name="janitor-beat")
    try:
        rows = wait_final(settings, ids, 120)
    finally:
        beat.stop()
        heir.stop()
    t = tally(settings, ids)
    fault_figures.record(
        "stream worker SIGKILLed mid-stream (janitor requeues)", t, "100 streams, all showing text"
    )
    assert t.lost == 0 and t.succeeded == 100, t
    assert all(row.attempts == 1 for row in rows.values())  # taken back once each
    for rid in ids:
        msgs = log_types(dep, rid)
        types = [m.type for m in msgs]
        # Everything shown before the kill was taken back: a reset follows it, then the answer
        # is written again from its start.
        assert "reset" in types[before[rid] :], (rid, types)
        last_reset = max(i for i, t in enumerate(types) if t == "reset")
        again = "".join(m.text or "" for m in msgs[last_reset + 1 :] if m.type == "token")
        assert types[-1] == "done" and again == rows[rid].text
    simulator.set_faults([])
    for rid in ids[:3]:
        assert rows[rid].text == direct_answer(simulator, rows[rid].body)
    check_invariants(settings, ids)
    # What the killed worker streamed was billed by the provider: charged beside the answer,
    # estimated (a piece a seq, its prompt once). It was free.
    with session_scope(settings.database_url) as session:
        ledger = {e.request_id: e for e in session.scalars(select(CostEntry))}
    for rid in ids:
        row, entry = rows[rid], ledger[rid]
        assert row.prompt_tokens is not None and row.completion_tokens is not None
        assert entry.estimated and not row.usage_estimated, rid
        # What the killed worker sent: the log up to the heir's reset (a piece or two may have
        # left the worker after `before` was read, as the kill took effect).
        types = [m.type for m in log_types(dep, rid)]
        sent = types.index("reset", before[rid])
        assert entry.completion_tokens == row.completion_tokens + sent, (rid, types)
        prompt = count_message_tokens(row.body["messages"])
        assert entry.prompt_tokens == row.prompt_tokens + prompt, rid


# Each provider fault: (name, rule fields, requests, what the policy makes of it).
PROVIDER_FAULTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("429 storm with Retry-After", {"status": 429, "retry_after_s": 0.3, "first": 15}, 10, "ok"),
    ("503 then recovery", {"status": 503, "first": 10}, 10, "ok"),
    ("500 on every attempt", {"status": 500}, 5, "provider answered 500 (gave up after 4"),
    ("400 bad request", {"status": 400}, 5, "provider rejected the request (400)"),
    ("stream cut after 3 chunks", {"cut_after": 3, "first": 10}, 10, "ok"),
    ("stream cut on every attempt", {"cut_after": 2}, 5, "gave up after 4 attempts"),
    (
        "stream stalled 3 s (idle limit 1 s)",
        {"stall_after": 2, "stall_s": 3, "first": 10},
        10,
        "ok",
    ),
    ("slow tokens (40 ms each)", {"chunk_delay_ms": 40}, 10, "ok"),
    # Some OpenAI-compatible servers never name a finish reason: [DONE] still ends the answer.
    ("[DONE] without a finish_reason", {"no_finish_reason": True}, 5, "ok"),
]


def test_provider_faults_end_as_the_policy_says(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    tags = {name: f"pf{i} {run}" for i, (name, *_) in enumerate(PROVIDER_FAULTS)}
    simulator.set_faults([{"match": tags[name], **rule} for name, rule, _, _ in PROVIDER_FAULTS])
    worker = dep.stream_worker("provider-faults", concurrency=100)
    client = dep.client()
    try:
        groups = {
            name: client.submit_many([request(f"{tags[name]} q{i}") for i in range(n)])
            for name, _, n, _ in PROVIDER_FAULTS
        }
        everything = [rid for ids in groups.values() for rid in ids]
        rows = wait_final(settings, everything, 90)
    finally:
        worker.stop()
    simulator.set_faults([])
    check_invariants(settings, everything)
    for name, _, _, expected in PROVIDER_FAULTS:
        ids = groups[name]
        t = tally(settings, ids)
        fault_figures.record(
            f"provider: {name}",
            t,
            "stream; " + ("answered" if expected == "ok" else f"fails: {expected}"),
        )
        assert t.lost == 0, (name, t)
        if expected == "ok":
            assert t.succeeded == len(ids), (name, t.reasons)
            sample = rows[ids[0]]
            assert sample.text == direct_answer(simulator, sample.body), name
            for rid in ids:
                # A subscriber that drops what it showed at each reset ends with the answer
                # (text shown before a cut or stall is followed by a reset; text the worker had
                # not shown yet, before its claim, needs none).
                msgs = log_types(dep, rid)
                assert msgs[-1].type == "done" and followed(msgs) == rows[rid].text, (name, rid)
        else:
            assert t.failed == len(ids), (name, t)
            assert all(expected in (rows[rid].error or "") for rid in ids), (
                name,
                {rows[rid].error for rid in ids},
            )


def streamed_under(
    dep: Deployment, simulator: Any, rules: list[dict[str, Any]], prompts: list[str]
) -> tuple[list[str], dict[str, Any]]:
    """Stream `prompts` through a worker of their own while the simulator applies `rules`;
    (ids, rows) once all have ended, the invariants checked, each row `succeeded` on its first
    attempt (the provider's data is odd, not failing)."""
    simulator.set_faults(rules)
    worker = dep.stream_worker("provider-data", concurrency=10)
    try:
        ids = dep.client().submit_many([request(p) for p in prompts])
        rows = wait_final(dep.settings, ids, 60)
    finally:
        worker.stop()
        simulator.set_faults([])
    check_invariants(dep.settings, ids)
    for rid in ids:
        row = rows[rid]
        assert (row.status, row.attempts) == ("succeeded", 0), (rid, row.status, row.error)
    return ids, rows


def test_an_answer_with_a_nul_ends_succeeded_as_its_followers_saw_it(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """A provider's answer may hold characters a PostgreSQL text column cannot (a NUL): the
    worker stores and publishes U+FFFD in its place, the same text on both sides, and the
    request ends `succeeded` on its first attempt. Other control characters pass as sent."""
    dep = fault_deployment
    tag = f"nul {uuid.uuid4().hex[:8]}"
    rule = {"match": tag, "append_text": " bell\x07 nul\x00 end"}
    ids, rows = streamed_under(dep, simulator, [rule], [f"{tag} q{i}" for i in range(3)])
    fault_figures.record("provider: an answer holding a NUL", tally(dep.settings, ids), "stream")
    for rid in ids:
        row = rows[rid]
        assert row.text == direct_answer(simulator, row.body) + " bell\x07 nul\ufffd end", rid
        msgs = log_types(dep, rid)
        assert msgs[-1].type == "done", (rid, msgs[-1])
        assert "".join(m.text or "" for m in msgs if m.type == "token") == row.text, rid


USAGES_THE_ROW_CANNOT_HOLD: list[dict[str, Any]] = [
    {"prompt_tokens": 2**40, "completion_tokens": 5},  # past an Integer column
    {"prompt_tokens": -3, "completion_tokens": 5},  # would credit the tenant's budget
    {"prompt_tokens": "many", "completion_tokens": 5},
    {"total_tokens": 9},
]


def test_a_usage_the_row_cannot_hold_is_counted_locally(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """A relay's usage chunk that is not token counts the row can hold: the request still ends
    `succeeded` on its first attempt, with its text, the counts made locally (marked
    estimated) and a cost from them."""
    dep = fault_deployment
    run = uuid.uuid4().hex[:8]
    tags = [f"usage{i} {run}" for i in range(len(USAGES_THE_ROW_CANNOT_HOLD))]
    rules = [
        {"match": t, "stream_usage": u}
        for t, u in zip(tags, USAGES_THE_ROW_CANNOT_HOLD, strict=True)
    ]
    ids, rows = streamed_under(dep, simulator, rules, [f"{t} q" for t in tags])
    t = tally(dep.settings, ids)
    fault_figures.record("provider: a usage chunk the row cannot hold", t, "stream; estimated")
    for rid in ids:
        row = rows[rid]
        assert row.usage_estimated, rid
        assert 0 < (row.prompt_tokens or 0) < 1000 and 0 < (row.completion_tokens or 0) < 1000
        assert row.cost_usd is not None and row.cost_usd > 0, rid
        assert row.text == direct_answer(simulator, row.body), rid


def test_an_answer_past_its_models_output_limit_ends_at_the_limit(
    fault_deployment: Deployment, simulator: Any
) -> None:
    """A request that names no max_tokens still has a limit: its model's most output tokens,
    four times over in pieces (a relay may stream smaller pieces than tokens). A provider that
    streams past it (never stopping, say) is cut there, `length`; the shipped sheepdog-mini
    allows 2,048 tokens. The simulator's set-up is restored after each test (autouse)."""
    simulator.configure(answer_tokens=[9000, 9000])
    ids, rows = streamed_under(fault_deployment, simulator, [], [f"long {uuid.uuid4().hex}"])
    row = rows[ids[0]]
    assert (row.finish_reason, row.completion_tokens) == ("length", 4 * 2048), row.finish_reason


# An attempt's time limits, shortened in the worker's environment below: the first text within
# the provider timeout plus the idle limit of the call (2 + 1 s), then text at least every idle
# limit; an answer still streaming 4 s after its first text ends there (`length`). Keep-alive
# comments are not text.
TIME_LIMITS_ENV = {"SHEEPDOG_PROVIDER_TIMEOUT_S": "2", "SHEEPDOG_STREAM_ANSWER_MAX_S": "4"}
KEEP_ALIVES = {"stall_s": 600, "keepalive_ms": 100}
TIME_LIMITS: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "keep-alives while the first token takes 1.5 s",
        {"ttft_ms": 1500, "keepalive_ms": 100},
        2,
        "ok",
    ),
    (
        "keep-alives only, twice, then the answer",
        {"stall_after": 0, **KEEP_ALIVES, "first": 2},
        2,
        "ok",
    ),
    (
        "keep-alives only after 3 tokens, twice",
        {"stall_after": 3, **KEEP_ALIVES, "first": 2},
        2,
        "ok",
    ),
    (
        "keep-alives only, on every attempt",
        {"stall_after": 0, **KEEP_ALIVES},
        2,
        "no text for 3s after the call (gave up after 4 attempts)",
    ),
    ("tokens trickling 300 ms apart", {"chunk_delay_ms": 300, "keepalive_ms": 100}, 2, "length"),
]


def test_an_attempt_has_time_limits_keep_alives_notwithstanding(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """A relay that keeps a stream open with comments while sending no text is retried, then
    the request fails with the reason; one that trickles tokens past the answer's time limit
    is ended there, `length`, with what it sent. The worker does it, not the janitor (no row
    taken back), and the followers end with what the row holds."""
    dep = fault_deployment
    run = uuid.uuid4().hex[:8]
    tags = {name: f"tl{i} {run}" for i, (name, *_) in enumerate(TIME_LIMITS)}
    simulator.set_faults([{"match": tags[name], **rule} for name, rule, _, _ in TIME_LIMITS])
    worker = dep.stream_worker("time-limits", concurrency=20, **TIME_LIMITS_ENV)
    beat = dep.stack.start_beat(name="time-limits-beat")  # the janitor, to see no row lapse
    try:
        groups = {
            name: dep.client().submit_many([request(f"{tags[name]} q{i}") for i in range(n)])
            for name, _, n, _ in TIME_LIMITS
        }
        everything = [rid for ids in groups.values() for rid in ids]
        rows = wait_final(dep.settings, everything, 90)
    finally:
        beat.stop()
        worker.stop()
        simulator.set_faults([])
    check_invariants(dep.settings, everything)
    for name, _, _, expected in TIME_LIMITS:
        ids = groups[name]
        t = tally(dep.settings, ids)
        fault_figures.record(f"provider: {name}", t, "stream; " + expected)
        assert t.lost == 0, (name, t)
        for rid in ids:
            row, msgs = rows[rid], log_types(dep, rid)
            # The worker ended it itself: no heartbeat lapsed for the janitor to take it back.
            assert row.attempts == 0, (name, rid, row.attempts, row.error)
            shown = followed(msgs)
            if expected in ("ok", "length"):
                assert row.status == "succeeded", (name, rid, row.status, row.error)
                assert msgs[-1].type == "done" and shown == row.text, (name, rid, msgs[-1])
                full = direct_answer(simulator, row.body)
                if expected == "ok":
                    assert row.text == full, (name, rid)
                else:  # cut at the time limit: a start of the answer, counted locally
                    assert row.finish_reason == "length" and row.usage_estimated, (name, rid)
                    assert row.text and full.startswith(row.text) and row.text != full, rid
            else:
                assert row.status == "failed", (name, rid, row.status, row.text)
                assert expected in (row.error or ""), (name, rid, row.error)
                assert msgs[-1].type == "error", (name, rid, msgs[-1])


def test_a_second_choice_in_the_stream_is_not_spliced_in(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """A relay that streams a second choice (index 1) between the first's chunks, as for
    `n=2`: the answer is choice 0's alone, stored and followed alike."""
    dep = fault_deployment
    tag = f"choices {uuid.uuid4().hex[:8]}"
    rule = {"match": tag, "second_choice": True}
    ids, rows = streamed_under(dep, simulator, [rule], [f"{tag} q{i}" for i in range(3)])
    fault_figures.record("provider: a second choice streamed", tally(dep.settings, ids), "stream")
    for rid in ids:
        row = rows[rid]
        assert row.text == direct_answer(simulator, row.body), rid
        msgs = log_types(dep, rid)
        assert "".join(m.text or "" for m in msgs if m.type == "token") == row.text, rid
