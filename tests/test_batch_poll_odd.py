"""A relay's odd Batch objects do not stop the poll: a real HTTP server answers the official SDK
with Batch objects whose fields no Batch API sends (over-long file ids, counts past an Integer
column, a string for `errors`, a status of its own), on PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select, update

from batch.claim import claim
from batch.ingest import ingest
from batch.job_status import move_job_now
from batch.poll import poll
from core.db import session_scope
from models.tables import BatchJob, Request, utcnow
from tests.fixtures.batch import add_requests, make_settings, wipe

ODD: dict[str, dict[str, Any]] = {
    "batch_odd_fields": {
        "status": "in_progress",
        "output_file_id": "f" * 300,
        "error_file_id": {"id": 1},
        "request_counts": {"total": 2**40, "completed": -1, "failed": "x"},
        "errors": "broken",
    },
    "batch_odd_errors": {"status": "in_progress", "errors": {"data": 5}},
    "batch_own_status": {"status": "running"},  # a status no Batch API has
    "batch_own_recent": {"status": "running"},  # the same, cancelled inside the grace period
    "batch_cancelling": {"status": "cancelling"},  # a cancel that never finishes
    "batch_dict_status": {"status": {"phase": 2}},  # not even a string
    "batch_dot_file": {"status": "completed", "output_file_id": ".."},  # no download can name
    "batch_fine": {
        "status": "in_progress",
        "request_counts": {"total": 1, "completed": 0, "failed": 0},
    },
}


class _Relay(BaseHTTPRequestHandler):
    cancelled: list[str] = []

    def _answer(self, batch_id: str) -> None:
        body = {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions"}
        body.update(ODD.get(batch_id, {"status": "in_progress"}))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(self.path.rsplit("/", 1)[1])

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        batch_id = self.path.split("/")[-2]  # /v1/batches/{id}/cancel
        self.cancelled.append(batch_id)
        self._answer(batch_id)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def relay() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Relay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_odd_batch_objects_neither_stop_the_poll_nor_wait_forever(
    batch_pg_url: str, redis_url: str, simulator: Any, tmp_path: Path, relay: str
) -> None:
    settings = make_settings(
        batch_pg_url,
        redis_url,
        simulator,
        tmp_path,
        openai_base_url=relay,
        openai_api_key=SecretStr("sk-relay"),
        batch_max_wait_s=60.0,
        batch_orphan_timeout_s=600.0,  # the grace after a cancel
    )
    wipe(settings.database_url)
    jobs: dict[str, str] = {}
    for name in ODD:
        add_requests(settings, [("sheepdog-mini", f"odd {name}")])
        with session_scope(settings.database_url) as session:
            (group,) = claim(session, settings).groups
        move_job_now(settings, group.job_id, "in_progress", provider_batch_id=name)
        jobs[name] = group.job_id
    with session_scope(settings.database_url) as session:  # submitted two hours ago
        for name, ago in (
            ("batch_own_status", 7200),
            ("batch_own_recent", 90),
            ("batch_cancelling", 7200),
        ):
            session.execute(
                update(BatchJob)
                .where(BatchJob.id == jobs[name])
                .values(submitted_at=utcnow() - timedelta(seconds=ago))
            )
        (own_request,) = session.scalars(
            select(Request.id).where(Request.batch_job_id == jobs["batch_own_status"])
        ).all()
    _Relay.cancelled.clear()
    report = poll(settings)
    assert report.checked == len(ODD)
    with session_scope(settings.database_url) as session:
        odd = session.get(BatchJob, jobs["batch_odd_fields"])
        assert odd is not None
        assert (odd.output_file_id, odd.error_file_id) == (None, None)
        assert (odd.completed_count, odd.failed_count) == (0, 0)
        assert odd.errors == {"data": [{"message": "broken"}]}
        errs = session.get(BatchJob, jobs["batch_odd_errors"])
        assert errs is not None and errs.errors is not None
        (item,) = errs.errors["data"]  # a list of error objects, as its readers take
        assert "'data': 5" in item["message"]
    # Past the wait limit with a status of the relay's own: cancelled like an open one, and,
    # its answer still a status of its own, ended here: its request is requeued by the ingest
    # (as for any cancelled batch), and the relay is not asked again.
    own = jobs["batch_own_status"]
    assert sorted(_Relay.cancelled) == ["batch_own_recent", "batch_own_status"]
    assert own in report.cancelled and jobs["batch_own_recent"] in report.cancelled
    # Inside the grace period a cancel may still be finishing: kept open, asked again.
    _Relay.cancelled.clear()
    again = poll(settings)
    assert own in again.to_ingest and jobs["batch_own_recent"] not in again.to_ingest
    # Still `cancelling` past the wait and its grace: ended too (it was polled for ever, its
    # requests `batched` with their holds).
    assert jobs["batch_cancelling"] in report.to_ingest
    assert _Relay.cancelled == ["batch_own_recent"]
    # A status that is not a string is the relay's own word; a file id no download can name
    # is left out, so the completed job's ingest requeues its request instead of failing.
    with session_scope(settings.database_url) as session:
        odd_status = session.get(BatchJob, jobs["batch_dict_status"])
        dot = session.get(BatchJob, jobs["batch_dot_file"])
        assert odd_status is not None and odd_status.status == "in_progress"
        assert dot is not None and (dot.status, dot.output_file_id) == ("completed", None)
    ingest(jobs["batch_dot_file"], settings)
    ingest(own, settings)
    with session_scope(settings.database_url) as session:
        job = session.get(BatchJob, own)
        assert job is not None and job.status == "cancelled" and job.ingested_at is not None
        row = session.get(Request, own_request)
        assert row is not None and (row.status, row.attempts) == ("queued", 1), row.error
