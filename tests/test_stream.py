"""The streaming path end to end: real Redis, PostgreSQL, a real stream worker, the simulator."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from core import keys
from core.db import session_scope
from models.tables import CostEntry, Request
from streaming.subscriber import RESET, Reset, StreamFailed, events, stream_text
from tests.fixtures.ends import assert_ended
from tests.fixtures.streaming import StreamDeployment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def deployment(stack: Any, stream_deployment: StreamDeployment) -> Iterator[StreamDeployment]:
    """One stream worker (plus the default queue) on the isolated deployment."""
    proc = stack.start_worker(
        queues="stream,default", concurrency=300, env=stream_deployment.env, name="stream-main"
    )
    yield stream_deployment
    proc.stop()


@pytest.fixture
def client(deployment: StreamDeployment) -> Any:
    return deployment.client()


def prompt(tag: str) -> str:
    return f"{tag} {uuid.uuid4().hex}"


def submit(client: Any, text: str, **extra: Any) -> str:
    request = {"model": "sheepdog-mini", "messages": [{"role": "user", "content": text}]}
    request.update(extra)
    request.setdefault("priority", "high")
    return str(client.submit(request))


def row(deployment: StreamDeployment, request_id: str) -> Request:
    with session_scope(deployment.settings.database_url) as session:
        found = session.scalar(select(Request).where(Request.id == request_id))
        assert found is not None
        return found


def direct_answer(simulator: Any, body: dict[str, Any]) -> str:
    """The simulator's answer to the same body through the SDK, bypassing Sheepdog."""
    from openai import OpenAI

    sdk = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0)
    try:
        return sdk.chat.completions.create(**body).choices[0].message.content or ""
    finally:
        sdk.close()


def follow(deployment: StreamDeployment, request_id: str, timeout: float = 30) -> list[str]:
    return list(stream_text(request_id, timeout=timeout, settings=deployment.settings))


def test_messages_in_order_and_complete(deployment: StreamDeployment, client: Any, simulator: Any):
    rid = submit(client, prompt("order"))
    msgs = list(events(rid, timeout=30, settings=deployment.settings))
    assert [m.seq for m in msgs] == list(range(len(msgs)))
    assert [m.type for m in msgs[:-1]] == ["token"] * (len(msgs) - 1)
    done = msgs[-1]
    assert done.type == "done" and done.usage is not None and done.cost_usd is not None
    text = "".join(m.text or "" for m in msgs[:-1])
    stored = row(deployment, rid)
    assert_ended(stored)
    assert stored.text == text == direct_answer(simulator, stored.body)
    assert stored.completion_tokens == done.usage.completion_tokens == len(msgs) - 1
    assert not stored.usage_estimated
    assert stored.started_at and stored.first_token_at and stored.finished_at
    assert str(stored.cost_usd) == str(done.cost_usd) or float(stored.cost_usd) == float(
        done.cost_usd
    )
    with session_scope(deployment.settings.database_url) as session:
        entry = session.scalar(select(CostEntry).where(CostEntry.request_id == rid))
        assert entry is not None and entry.route == "stream"
        assert entry.completion_tokens == stored.completion_tokens


def test_late_subscriber_gets_everything(deployment: StreamDeployment, client: Any):
    rid = submit(client, prompt("late"))
    view = client.result(rid, wait=30)
    assert_ended(view)
    stream = stream_text(rid, timeout=10, settings=deployment.settings)
    assert "".join(stream) == view.text
    assert stream.result is not None and stream.result.text == view.text


def test_subscriber_joining_mid_stream(deployment: StreamDeployment, client: Any, simulator: Any):
    tag = prompt("mid")
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 20}])
    rid = submit(client, tag)
    key = keys.of(deployment.settings).replay_log(rid)
    while deployment.redis.xlen(key) < 3:
        pass
    pieces = follow(deployment, rid)
    assert "".join(pieces) == row(deployment, rid).text


def test_cut_stream_resets_and_ends_with_the_full_answer(
    deployment: StreamDeployment, client: Any, simulator: Any
):
    tag = prompt("cut")
    simulator.set_faults([{"match": tag, "cut_after": 5, "first": 1}])
    rid = submit(client, tag)
    stream = stream_text(rid, timeout=30, settings=deployment.settings)
    pieces = list(stream)
    # The cut comes after 5 chunks; the last may reach the worker cut mid-line (dropped), so
    # the reset follows at most 5 pieces of text.
    assert pieces.count(RESET) == 1 and 1 <= pieces.index(RESET) <= 5
    assert isinstance(pieces[pieces.index(RESET)], Reset)
    stored = row(deployment, rid)
    assert_ended(stored)
    assert stream.text == stored.text == direct_answer(simulator, stored.body)
    # The row has the answer's usage; the ledger adds the attempt the retry took back (its
    # prompt and pieces, estimated), which the provider billed too.
    from rules.tokens import count_message_tokens

    shown = pieces.index(RESET)
    with session_scope(deployment.settings.database_url) as session:
        entry = session.get(CostEntry, rid)
    assert entry is not None and entry.estimated and not stored.usage_estimated
    assert stored.prompt_tokens is not None and stored.completion_tokens is not None
    prompt_est = count_message_tokens(stored.body["messages"])
    assert entry.prompt_tokens == stored.prompt_tokens + prompt_est
    assert shown <= entry.completion_tokens - stored.completion_tokens <= 5
    assert entry.cost_usd == stored.cost_usd
    msgs = list(events(rid, timeout=5, settings=deployment.settings))
    assert [m.seq for m in msgs] == list(range(len(msgs)))


def test_rate_limit_honours_retry_after(deployment: StreamDeployment, client: Any, simulator: Any):
    tag = prompt("429")
    simulator.reset()
    simulator.set_faults([{"match": tag, "status": 429, "retry_after_s": 1.0, "first": 1}])
    rid = submit(client, tag)
    assert_ended(client.result(rid, wait=30))
    arrivals = [r["t"] for r in simulator.stats()["chat_requests"]]
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.9  # waited for Retry-After, not the 0.05 s backoff


def test_stall_past_idle_timeout_is_retried(
    deployment: StreamDeployment, client: Any, simulator: Any
):
    tag = prompt("stall")
    simulator.set_faults([{"match": tag, "stall_after": 3, "stall_s": 5, "first": 1}])
    rid = submit(client, tag)
    stream = stream_text(rid, timeout=30, settings=deployment.settings)
    pieces = list(stream)
    assert RESET in pieces
    stored = row(deployment, rid)
    assert_ended(stored)
    assert stream.text == stored.text == direct_answer(simulator, stored.body)


def given_up(
    deployment: StreamDeployment, client: Any, simulator: Any, name: str, **fault: Any
) -> Request:
    """A stream the simulator spoils on every attempt (`fault`): its row, once it failed."""
    tag = prompt(name)
    simulator.set_faults([{"match": tag, **fault}])
    rid = submit(client, tag)
    with pytest.raises(StreamFailed, match="gave up after 4 attempts"):
        follow(deployment, rid)
    return row(deployment, rid)


def test_server_errors_retried_then_given_up(
    deployment: StreamDeployment, client: Any, simulator: Any
):
    stored = given_up(deployment, client, simulator, "503", status=503)
    assert stored.status == "failed" and stored.cost_usd is None  # no answer: nothing billed


def test_a_stream_cut_on_every_attempt_is_charged_what_was_streamed(
    deployment: StreamDeployment, client: Any, simulator: Any
):
    """Each of the four attempts streams 3 pieces and is cut: the provider billed four
    prompts and every piece (it failed, and was charged nothing)."""
    from rules.tokens import count_message_tokens

    stored = given_up(deployment, client, simulator, "cut-all", cut_after=3)
    assert stored.status == "failed" and stored.usage_estimated, stored.error
    assert stored.prompt_tokens == 4 * count_message_tokens(stored.body["messages"])
    assert stored.completion_tokens is not None and stored.completion_tokens >= 4 * 2
    with session_scope(deployment.settings.database_url) as session:
        entry = session.get(CostEntry, stored.id)
        assert entry is not None and entry.cost_usd == stored.cost_usd > 0


@pytest.mark.parametrize("status", [400, 401, 404])
def test_non_retryable_errors_fail_at_once(
    deployment: StreamDeployment, client: Any, simulator: Any, status: int
):
    tag = prompt(f"e{status}")
    simulator.reset()
    simulator.set_faults([{"match": tag, "status": status, "message": "no thanks"}])
    rid = submit(client, tag)
    with pytest.raises(StreamFailed, match=f"rejected the request \\({status}\\): no thanks"):
        follow(deployment, rid)
    stored = row(deployment, rid)
    assert stored.status == "failed" and "no thanks" in (stored.error or "")
    assert len(simulator.stats()["chat_requests"]) == 1


def test_cost_cap_stops_at_max_tokens(deployment: StreamDeployment, client: Any):
    rid = submit(client, prompt("cap"), max_tokens=4)
    pieces = follow(deployment, rid)
    stored = row(deployment, rid)
    assert len(pieces) == 4 and stored.completion_tokens == 4
    assert_ended(stored)
    assert stored.finish_reason == "length"


def test_cancel_before_start(deployment: StreamDeployment, client: Any):
    item = client.prepare(
        {"model": "sheepdog-mini", "messages": [{"role": "user", "content": prompt("cq")}]}
    )
    assert client.cancel(item.id) is True  # not recorded yet
    client._send([item])
    with pytest.raises(StreamFailed, match="cancelled"):
        follow(deployment, item.id)
    stored = row(deployment, item.id)
    assert stored.status == "cancelled" and stored.text is None
    assert stored.cost_usd is None  # nothing was asked of the provider: nothing charged
    assert client.cancel(item.id) is False  # already ended


def test_a_cancel_at_the_claim_ends_the_stream_without_an_engine_error(
    deployment: StreamDeployment, client: Any, stack: Any
):
    """Cancelled right after its submit, a stream is often stopped at its claim, before its
    job took the claim's grant: its end message then failed (AssertionError in the engine,
    EngineError in the task) and followers waited for the row. Twenty such streams."""
    ids = []
    for i in range(20):
        rid = submit(client, prompt(f"cancel-at-claim {i}"))
        client.cancel(rid)
        ids.append(rid)
    for rid in ids:
        try:
            follow(deployment, rid, timeout=30)
        except StreamFailed as err:
            assert "cancelled" in str(err), err
        stored = row(deployment, rid)
        assert stored.status in ("cancelled", "succeeded"), (rid, stored.status, stored.error)
    [worker] = [p for p in stack.procs if p.name == "stream-main"]
    log = worker.log_text()
    assert "AssertionError" not in log and "EngineError" not in log, log[-3000:]


def test_cancel_after_success_changes_nothing(deployment: StreamDeployment, client: Any):
    rid = submit(client, prompt("cs"))
    text = "".join(follow(deployment, rid))
    before = row(deployment, rid)
    assert_ended(before)
    assert client.cancel(rid) is False
    after = row(deployment, rid)
    assert (after.status, after.text, after.error) == ("succeeded", text, None)
    assert not deployment.redis.exists(
        keys.of(deployment.settings).cancel_flag(rid)
    )  # nothing announced for an ended request
    assert [m.type for m in events(rid, timeout=5, settings=deployment.settings)][-1] == "done"


def test_cancel_in_flight(deployment: StreamDeployment, client: Any, simulator: Any):
    from costs.budget_limits import set_budget
    from models.tables import Reservation

    tag = prompt("cf")
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    with session_scope(deployment.settings.database_url) as session:
        set_budget(session, tenant, daily_usd=10)  # type: ignore[arg-type]
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    rid = submit(client, tag, metadata={"tenant": tenant})
    stream = stream_text(rid, timeout=30, settings=deployment.settings)
    first = next(stream)
    assert first
    assert client.cancel(rid) is True
    with pytest.raises(StreamFailed, match="cancelled"):
        list(stream)
    stored = row(deployment, rid)
    assert stored.status == "cancelled" and stored.error == "cancelled"
    assert stored.text and len(stored.text) < len(direct_answer(simulator, stored.body))
    # The provider billed the prompt and the text it sent: charged, estimated (it was free,
    # so a caller could stream long answers and cancel them near the end on no budget).
    assert stored.usage_estimated and stored.completion_tokens and stored.prompt_tokens
    assert stored.completion_tokens >= len(stored.text.split())
    with session_scope(deployment.settings.database_url) as session:
        entry = session.get(CostEntry, rid)
        assert entry is not None and entry.estimated and entry.cost_usd == stored.cost_usd > 0
        hold = session.get(Reservation, rid)  # settled to the charge, not released at $0
        assert hold is not None and (hold.state, hold.settled_usd) == ("settled", entry.cost_usd)


def test_a_submit_whose_row_failed_stops_the_stream_it_sent(
    deployment: StreamDeployment, client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
):
    """A stream message goes out before its row. When the rows then fail (the producer's
    connection lost before the commit), submit says ServiceUnavailable and the stream must not
    run on: it was only flagged, which a task that had already started never reads, so it ran
    to its end, succeeded and was charged, for a caller told it was not stored. The worker
    records the row it did not find; the low request's is not there, so the submit did not
    commit unseen (intake/idempotency.py's committed_unseen)."""
    import time

    from sqlalchemy.exc import OperationalError

    import intake.submit as submit_module
    from core.errors import ServiceUnavailable

    tag = prompt("unrecorded")
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    sent: list[str] = []

    def started_then_lost(session: Any, items: Any) -> Any:
        sent.extend(item.id for item in items)
        log = keys.of(deployment.settings).replay_log(sent[0])
        until = time.monotonic() + 15
        while not deployment.redis.exists(log) and time.monotonic() < until:
            time.sleep(0.02)  # until the worker streams it
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(submit_module, "record_safely", started_then_lost)
    low = {"model": "sheepdog-mini", "messages": [{"role": "user", "content": tag}]}
    with pytest.raises(ServiceUnavailable, match="database"):
        client.submit_many([{**low, "priority": "high"}, {**low, "priority": "low"}])
    rid = sent[0]
    assert deployment.redis.exists(keys.of(deployment.settings).replay_log(rid))
    with pytest.raises(StreamFailed, match="cancelled"):
        follow(deployment, rid)
    stored = row(deployment, rid)
    assert_ended(stored, "cancelled")
    assert len(stored.text or "") < len(direct_answer(simulator, stored.body))


def test_redelivered_message_does_not_run_twice(
    deployment: StreamDeployment, client: Any, simulator: Any
):
    item = client.prepare(
        {"model": "sheepdog-mini", "messages": [{"role": "user", "content": prompt("dup")}]}
    )
    client._send([item])
    assert_ended(client.result(item.id, wait=30))
    simulator.reset()
    before = deployment.redis.xlen(keys.of(deployment.settings).replay_log(item.id))
    client._send([item])  # the intake message again: the claim refuses it
    app = client.celery
    app.send_task("sheepdog.stream", kwargs={"request_id": item.id}, queue="stream")
    probe = submit(client, prompt("probe"))  # FIFO queue: done once the duplicates are handled
    client.result(probe, wait=30)
    assert deployment.redis.xlen(keys.of(deployment.settings).replay_log(item.id)) == before
    assert row(deployment, item.id).attempts == 0
    # the id-only message never calls the provider; the intake one may start before its claim
    assert len(simulator.stats()["chat_requests"]) <= 2


def test_two_hundred_concurrent_streams(deployment: StreamDeployment, client: Any, simulator: Any):
    tag = prompt("many")
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 20}])
    ids = client.submit_many(
        [
            {"model": "sheepdog-mini", "messages": [{"role": "user", "content": f"{tag} {i}"}]}
            for i in range(200)
        ]
    )
    for rid in ids:
        assert_ended(client.result(rid, wait=60))
    for rid in ids[:: len(ids) // 10]:
        msgs = list(events(rid, timeout=5, settings=deployment.settings))
        head = deployment.redis.xrange(keys.of(deployment.settings).replay_log(rid), count=2)
        assert [m.seq for m in msgs] == list(range(len(msgs))), (rid, head)
        assert "".join(m.text or "" for m in msgs) == row(deployment, rid).text


def test_cli_submit_follow_and_follow_after_a_restart(deployment: StreamDeployment, simulator: Any):
    import subprocess
    import sys

    tag = prompt("cli")
    simulator.set_faults([{"match": tag, "cut_after": 3, "first": 1}])
    cmd = [sys.executable, "-m", "sheepdog"]
    out = subprocess.run(
        [
            *cmd,
            "submit",
            "--model",
            "sheepdog-mini",
            "--prompt",
            tag,
            "--priority",
            "high",
            "--follow",
        ],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rid, rest = out.stdout.split("\n", 1)
    final = row(deployment, rid).text
    assert rest.count("\n[restarting]\n") == 1 and rest.endswith(f"\n[restarting]\n{final}\n")
    again = subprocess.run(
        [*cmd, "follow", rid],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0 and again.stdout.endswith(f"\n[restarting]\n{final}\n")
