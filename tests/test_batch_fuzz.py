"""Fuzzed output files never crash the ingest and never mark a request succeeded without an
answer (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from batch.claim import claim
from batch.ingest import ingest
from batch.job_status import move_job_now
from batch.jsonl import split_lines
from batch.results import _parse_validated, parse_line
from core.db import session_scope
from models.tables import storable
from tests.fixtures.batch import add_requests, make_settings, rows, wipe

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def ok_line(cid: str, content: Any = "an answer", usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not False:
        body["usage"] = usage or {"prompt_tokens": 5, "completion_tokens": 7}
    return {
        "id": "br",
        "custom_id": cid,
        "response": {"status_code": 200, "body": body},
        "error": None,
    }


def line_for(cid: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    valid = st.builds(ok_line, cid, st.text(max_size=30) | st.none())
    no_usage = st.builds(lambda c: ok_line(c, "text", False), cid)
    bad_usage = st.builds(lambda c, u: ok_line(c, "x", u), cid, JSON)
    error = st.builds(
        lambda c, code: {"custom_id": c, "response": None, "error": {"code": code, "message": "m"}},
        cid,
        st.sampled_from(["batch_expired", "batch_cancelled", "x", None]),
    )
    status = st.builds(
        lambda c, s, b: {"custom_id": c, "response": {"status_code": s, "body": b}},
        cid,
        st.integers(100, 600),
        JSON,
    )
    structured = st.one_of(valid, no_usage, bad_usage, error, status).map(
        lambda o: json.dumps(o).encode()
    )
    junk = st.binary(max_size=60) | JSON.map(lambda v: json.dumps(v).encode())
    truncated = st.tuples(valid, st.integers(0, 40)).map(
        lambda t: json.dumps(t[0]).encode()[: t[1]]
    )
    return st.one_of(structured, structured, junk, truncated)


@pytest.mark.unit
@given(st.lists(line_for(st.sampled_from(["req_a", "req_b", "zzz"])), max_size=20))
@hsettings(max_examples=300, deadline=None)
def test_parse_line_never_raises_nor_invents_answers(lines: list[bytes]) -> None:
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is not None and parsed[1].kind == "ok":
            obj = json.loads(raw)
            content = obj["response"]["body"]["choices"][0]["message"]["content"]
            assert parsed[1].text == storable(content)  # a NUL as U+FFFD, as stored
            assert parsed[1].text is not None


def odd_answer(cid: str, status: Any, tokens: Any, line_id: Any, extra: Any) -> bytes:
    """An answer line with lax-typed fields (200.0, "7", True, ...) the models may coerce."""
    line = ok_line(cid, usage={"prompt_tokens": tokens, "completion_tokens": 3})
    line["response"]["status_code"] = status
    line["id"] = line_id
    line["response"]["body"]["choices"].extend(extra)
    return json.dumps(line).encode()


LAX = st.sampled_from([200, 200.0, "200", True, 1, None]) | st.integers(-2, 400)
ODD_ANSWERS = st.builds(
    odd_answer,
    st.sampled_from(["req_a", ""]),
    LAX,
    LAX,
    st.none() | st.text(max_size=3) | st.integers(0, 2),
    st.lists(JSON, max_size=2),
)


@pytest.mark.unit
@given(st.lists(line_for(st.sampled_from(["req_a", "zzz"])) | ODD_ANSWERS, max_size=20))
@hsettings(max_examples=300, deadline=None)
def test_fast_path_agrees_with_the_models(lines: list[bytes]) -> None:
    """parse_line's orjson fast path gives exactly what the pydantic models give."""
    for raw in lines:
        assert parse_line(raw) == _parse_validated(raw), raw


@pytest.mark.unit
@given(st.lists(st.binary(max_size=30), max_size=10), st.integers(1, 7))
def test_split_lines_matches_splitlines(parts: list[bytes], size: int) -> None:
    data = b"".join(parts)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    expected = [x for x in data.split(b"\n") if x.strip()]
    assert list(split_lines(chunks)) == expected


@pytest.fixture(scope="module")
def fuzz_settings(
    batch_sqlite_url: str, redis_url: str, simulator: Any, tmp_path_factory: Any
) -> Any:
    return make_settings(batch_sqlite_url, redis_url, simulator, tmp_path_factory.mktemp("fz"))


@given(data=st.data())
@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzzed_output_files_never_crash_ingest(fuzz_settings: Any, data: st.DataObject) -> None:
    settings = fuzz_settings
    wipe(settings.database_url)
    ids = add_requests(settings, [("sheepdog-mini", f"fuzz {i}") for i in range(4)])
    with session_scope(settings.database_url) as session:
        (group,) = claim(session, settings).groups
    move_job_now(
        settings,
        group.job_id,
        data.draw(st.sampled_from(["completed", "expired"])),
        provider_batch_id=f"batch_fz_{group.job_id}",
    )
    cid = st.sampled_from([*ids, "req_unknown"])
    lines = data.draw(st.lists(line_for(cid), max_size=25))
    blob = data.draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"])).join(lines)
    size = data.draw(st.integers(1, 64))
    chunks = [blob[i : i + size] for i in range(0, len(blob), size)]
    report = ingest(group.job_id, settings, lines=split_lines(chunks))
    assert report.skipped is None
    got = rows(settings, ids)
    answers: dict[str, set[str]] = {}
    for raw in lines:
        parsed = parse_line(raw.strip())
        if parsed is not None and parsed[1].kind == "ok":
            answers.setdefault(parsed[0], set()).add(parsed[1].text or "")
    for rid, row in got.items():
        assert row.status in {"succeeded", "failed", "queued"}
        if row.status == "succeeded":
            assert row.text is not None and row.text in answers.get(rid, set())
            assert row.cost_usd is not None
        if row.status == "queued":
            assert row.batch_job_id is None


def test_an_answer_and_a_reason_with_a_nul_are_stored_on_postgresql(
    batch_pg_url: str, redis_url: str, simulator: Any, tmp_path: Any
) -> None:
    """PostgreSQL's text cannot hold a NUL: the answer is stored with U+FFFD in its place, an
    error line's reason likewise, a finish reason cut to its column, and lines whose custom_id
    no request can have are malformed, rather than the whole ingest failing on them."""
    settings = make_settings(batch_pg_url, redis_url, simulator, tmp_path)
    wipe(settings.database_url)
    ids = add_requests(settings, [("sheepdog-mini", f"nul {i}") for i in range(2)])
    with session_scope(settings.database_url) as session:
        (group,) = claim(session, settings).groups
    move_job_now(settings, group.job_id, "completed", provider_batch_id=f"batch_n_{group.job_id}")
    refused = {"custom_id": ids[1], "response": None, "error": {"code": "x", "message": "m\x00"}}
    answer = ok_line(ids[0], "a\x00b")
    answer["response"]["body"]["choices"][0]["finish_reason"] = "stop\x00" + "s" * 60
    # Ids no request can have: lines that name no request, not an ingest that fails on them.
    strangers = [ok_line("req_" + "x" * 60), ok_line("req_\x00"), {**refused, "custom_id": "r\x00"}]
    lines = [json.dumps(o).encode() for o in (answer, refused, *strangers)]
    report = ingest(group.job_id, settings, lines=split_lines([b"\n".join(lines)]))
    assert report.skipped is None
    got = rows(settings, ids)
    assert (got[ids[0]].status, got[ids[0]].text) == ("succeeded", "a\ufffdb")
    assert got[ids[0]].finish_reason == ("stop\ufffd" + "s" * 60)[:32]
    for raw in lines[2:]:
        assert parse_line(raw) is None and _parse_validated(raw) is None, raw
    assert got[ids[1]].status == "failed" and "\x00" not in (got[ids[1]].error or "")


@pytest.mark.unit
def test_a_usage_past_an_integer_column_is_refused_on_both_paths() -> None:
    """Counts PostgreSQL's Integer columns cannot hold make the line malformed, as negative
    ones do, on the fast path and through the models alike (not an ingest that fails whole)."""
    for usage in (
        {"prompt_tokens": 2**31, "completion_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": -1},
    ):
        raw = json.dumps(ok_line("req_a", "text", usage)).encode()
        assert parse_line(raw) is None and _parse_validated(raw) is None, usage
    raw = json.dumps(
        ok_line("req_a", "text", {"prompt_tokens": 2**31 - 1, "completion_tokens": 0})
    ).encode()
    accepted = parse_line(raw)
    assert accepted is not None and accepted == _parse_validated(raw)


@pytest.mark.unit
def test_only_choice_0_is_the_answer_among_several() -> None:
    """A relay answering `n` > 1 in a batch line: choice 0's text is taken, wherever it is in
    the list; a line with several choices and no choice 0 is malformed."""
    line = ok_line("req_a", "the answer")
    first = line["response"]["body"]["choices"][0]
    other = {**first, "index": 1, "message": {"role": "assistant", "content": "another"}}
    line["response"]["body"]["choices"] = [other, first]
    got = parse_line(json.dumps(line).encode())
    assert got is not None and got[1].text == "the answer", got
    line["response"]["body"]["choices"] = [other, {**other, "index": 2}]
    assert parse_line(json.dumps(line).encode()) is None
