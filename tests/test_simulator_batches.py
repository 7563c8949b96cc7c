"""Files and batches on the simulator: the OpenAI batch guide example and every lifecycle path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.fixtures.simulator import start_simulator

MODEL = "gpt-4.1-mini"
FINAL = {"completed", "failed", "expired", "cancelled"}


def line(custom_id: str, text: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write(path: Path, items: list[Any]) -> Path:
    with path.open("w") as out:
        for item in items:
            out.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def submit(client: OpenAI, path: Path, **kwargs: Any):  # type: ignore[no-untyped-def]
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **kwargs,
    )


def wait(client: OpenAI, batch_id: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL or time.monotonic() > deadline:
            return batch
        time.sleep(0.02)


def results(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(row) for row in client.files.content(file_id).text.splitlines()]


def test_batch_guide_example(openai_client: OpenAI, tmp_path: Path) -> None:
    client = openai_client
    path = write(tmp_path / "batchinput.jsonl", [line(f"request-{i}", f"Q{i}") for i in range(30)])
    batch_input_file = client.files.create(file=open(path, "rb"), purpose="batch")  # noqa: SIM115
    batch = client.batches.create(
        input_file_id=batch_input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"description": "nightly eval job"},
    )
    assert batch.status == "validating" and batch.metadata == {"description": "nightly eval job"}
    batch = wait(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (30, 30)
    assert batch.error_file_id is None and batch.output_file_id
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"):
        assert getattr(batch, stamp), stamp
    assert batch.failed_at is None and batch.cancelled_at is None
    file_response = client.files.content(batch.output_file_id)
    rows = [json.loads(row) for row in file_response.text.splitlines()]
    ids = [row["custom_id"] for row in rows]
    assert sorted(ids) == sorted(f"request-{i}" for i in range(30))
    assert ids != [f"request-{i}" for i in range(30)]  # not the input order
    row = rows[0]
    assert row["id"].startswith("batch_req_") and row["error"] is None
    assert row["response"]["status_code"] == 200
    assert row["response"]["body"]["object"] == "chat.completion"
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.usage is not None and batch.usage.output_tokens > 0


def test_batch_answer_equals_streamed_answer(openai_client: OpenAI, tmp_path: Path) -> None:
    items = [line("a", "same question", max_tokens=12), line("b", "other question", stop=["the"])]
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "in.jsonl", items)).id)
    by_id = {
        r["custom_id"]: r["response"]["body"] for r in results(openai_client, batch.output_file_id)
    }
    for item in items:
        body = item["body"]
        pieces = []
        for chunk in openai_client.chat.completions.create(stream=True, **body):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert by_id[item["custom_id"]]["choices"][0]["message"]["content"] == "".join(pieces)


@pytest.mark.parametrize(
    ("rows", "code", "param"),
    [
        (["{not json", line("b", "x")], "invalid_json_line", None),
        ([{**line("a", "x"), "custom_id": None}], "missing_required_parameter", "custom_id"),
        ([line("a", "x"), line("a", "y")], "duplicate_custom_id", "custom_id"),
        ([line("a", "x"), line("b", "y", model="gpt-4.1")], "mismatched_model", "body.model"),
        ([{**line("a", "x"), "url": "/v1/embeddings"}], "invalid_url", "url"),
        ([line("a", "x", model="gpt-99")], "model_not_found", "body.model"),
    ],
)
def test_validation_failures(
    openai_client: OpenAI, tmp_path: Path, rows: list[Any], code: str, param: str | None
) -> None:
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "bad.jsonl", rows)).id)
    assert batch.status == "failed" and batch.failed_at and batch.in_progress_at is None
    assert batch.errors is not None and batch.errors.object == "list"
    error = batch.errors.data[0]  # type: ignore[index]
    assert (error.code, error.param) == (code, param)
    assert error.line is not None and error.message
    assert batch.output_file_id is None and batch.error_file_id is None


def test_too_many_lines(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.configure(batch_max_lines=3)
    rows = [line(str(i), "x") for i in range(4)]
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "big.jsonl", rows)).id)
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "too_many_requests"  # type: ignore[union-attr,index]


def test_create_errors(openai_client: OpenAI, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a", "x")])
    uploaded = openai_client.files.create(file=path.open("rb"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        openai_client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError):
        openai_client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.retrieve("batch_nope")


def test_validation_fault(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"batch": "fail_validation", "match": "doomed"}])
    ok = submit(openai_client, write(tmp_path / "ok.jsonl", [line("a", "fine")]))
    bad = submit(
        openai_client, write(tmp_path / "bad.jsonl", [line("a", "fine"), line("b", "doomed")])
    )
    assert wait(openai_client, ok.id).status == "completed"
    assert wait(openai_client, bad.id).status == "failed"


def test_expire_fault_partial_results(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"batch": "expire", "after_lines": 4}])
    rows = [line(f"r{i}", f"q{i}") for i in range(10)]
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "in.jsonl", rows)).id)
    assert batch.status == "expired" and batch.expired_at
    done = results(openai_client, batch.output_file_id)
    failed = results(openai_client, batch.error_file_id)
    assert len(done) == 4 and len(failed) == 6
    assert {r["custom_id"] for r in done + failed} == {f"r{i}" for i in range(10)}
    assert all(r["error"]["code"] == "batch_expired" and r["response"] is None for r in failed)
    assert batch.request_counts.completed == 4 and batch.request_counts.failed == 6  # type: ignore[union-attr]


def test_window_expiry(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 0.5 s window and 0.02 s a line (at scale 1000): the window closes mid-way.
    simulator.configure(batch_window_s=500, batch_seconds_per_line=20)
    rows = [line(f"r{i}", f"q{i}") for i in range(60)]
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "in.jsonl", rows)).id)
    assert batch.status == "expired"
    done = results(openai_client, batch.output_file_id)
    failed = results(openai_client, batch.error_file_id)
    assert 0 < len(done) < 60 and len(done) + len(failed) == 60


def test_cancel_with_partial_output(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.configure(batch_seconds_per_line=20)  # 0.02 s a line: 100 lines take 2 s
    rows = [line(f"r{i}", f"q{i}") for i in range(100)]
    batch = submit(openai_client, write(tmp_path / "in.jsonl", rows))
    counts = []
    for _ in range(15):
        time.sleep(0.03)
        counts.append(openai_client.batches.retrieve(batch.id).request_counts.completed)  # type: ignore[union-attr]
    assert counts == sorted(counts) and counts[-1] > counts[0]  # request_counts move
    cancelling = openai_client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait(openai_client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = results(openai_client, batch.output_file_id)
    failed = results(openai_client, batch.error_file_id)
    assert 0 < len(done) < 100 and len(done) + len(failed) == 100
    assert all(r["error"]["code"] == "batch_cancelled" for r in failed)
    with pytest.raises(openai.ConflictError):
        finished = wait(
            openai_client, submit(openai_client, write(tmp_path / "b.jsonl", rows[:1])).id
        )
        openai_client.batches.cancel(finished.id)


def test_lost_lines_and_error_lines(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults(
        [{"batch": "lose_lines", "match": "LOSE"}, {"batch": "error_lines", "match": "BAD"}]
    )
    rows = [line("keep", "fine"), line("lost", "LOSE me"), line("bad", "BAD one")]
    rows.append(line("n2", "x", n=2))  # a line the endpoint itself refuses
    batch = wait(openai_client, submit(openai_client, write(tmp_path / "in.jsonl", rows)).id)
    assert batch.status == "completed"
    done = results(openai_client, batch.output_file_id)
    failed = {r["custom_id"]: r for r in results(openai_client, batch.error_file_id)}
    assert [r["custom_id"] for r in done] == ["keep"]
    assert set(failed) == {"bad", "n2"}
    for row in failed.values():
        assert row["response"]["status_code"] == 400 and row["error"] is None
        assert row["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert batch.request_counts.total == 4  # type: ignore[union-attr]


def test_list_batches_pagination(openai_client: OpenAI, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [line("a", "x")])
    made = [submit(openai_client, path).id for _ in range(3)]
    page = openai_client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    after = openai_client.batches.list(limit=2, after=page.data[-1].id)
    assert after.data[0].id == made[0]
    seen = [b.id for b in openai_client.batches.list(limit=2)]  # auto-pagination
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))


def test_files_endpoints(openai_client: OpenAI, tmp_path: Path) -> None:
    path = write(tmp_path / "upload.jsonl", [line(str(i), "x" * 100) for i in range(50)])
    created = openai_client.files.create(file=path.open("rb"), purpose="batch")
    assert created.bytes == path.stat().st_size and created.filename == "upload.jsonl"
    assert openai_client.files.retrieve(created.id).id == created.id
    assert openai_client.files.content(created.id).content == path.read_bytes()
    assert created.id in [f.id for f in openai_client.files.list(purpose="batch")]
    assert openai_client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.files.content(created.id)
    with pytest.raises(openai.BadRequestError):
        openai_client.files.create(file=path.open("rb"), purpose="nonsense")  # type: ignore[arg-type]


def test_large_upload_streams_to_disk(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big.jsonl"
    row = json.dumps(line("x", "y" * 1000)) + "\n"
    path.write_text(row * 20_000)  # ~21 MB
    created = openai_client.files.create(file=path.open("rb"), purpose="batch")
    assert created.bytes == path.stat().st_size
    simulator.configure(max_file_bytes=1_000_000)
    with pytest.raises(openai.APIStatusError) as error:
        openai_client.files.create(file=path.open("rb"), purpose="batch")
    assert error.value.status_code == 413


def test_no_batch_api() -> None:
    with start_simulator(no_batch_api=True) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.batches.list()
        with pytest.raises(openai.NotFoundError):
            client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        assert client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still streams"}]
        )


def test_async_client_batch(simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from openai import AsyncOpenAI

    path = write(tmp_path / "in.jsonl", [line(f"r{i}", "x") for i in range(5)])

    async def main() -> str:
        async with AsyncOpenAI(base_url=simulator.base_url, api_key=simulator.api_key) as client:
            uploaded = await client.files.create(file=path.open("rb"), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status not in FINAL:
                await asyncio.sleep(0.02)
                batch = await client.batches.retrieve(batch.id)
            assert batch.output_file_id
            return (await client.files.content(batch.output_file_id)).text

    assert len(asyncio.run(main()).splitlines()) == 5


def test_header_faults_on_one_batch(openai_client: OpenAI, tmp_path: Path) -> None:
    rows = [line(f"r{i}", "LOSE" if i % 2 else "keep") for i in range(6)]
    path = write(tmp_path / "in.jsonl", rows)
    header = {"X-Sim-Faults": json.dumps({"batch": "lose_lines", "match": "LOSE"})}
    batch = wait(openai_client, submit(openai_client, path, extra_headers=header).id)
    assert sorted(r["custom_id"] for r in results(openai_client, batch.output_file_id)) == [
        "r0",
        "r2",
        "r4",
    ]
    assert batch.request_counts.completed == 6  # type: ignore[union-attr]  # lost, yet counted
    plain = wait(openai_client, submit(openai_client, path).id)
    assert len(results(openai_client, plain.output_file_id)) == 6


def test_cancel_while_validating(openai_client: OpenAI, simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    simulator.configure(batch_validate_s=300)  # 0.3 s at scale 1000
    batch = submit(openai_client, write(tmp_path / "in.jsonl", [line("a", "x"), line("b", "y")]))
    assert openai_client.batches.cancel(batch.id).status == "cancelling"
    batch = wait(openai_client, batch.id)
    assert batch.status == "cancelled" and batch.output_file_id is None
    assert len(results(openai_client, batch.error_file_id)) == 2
