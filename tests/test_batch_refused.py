"""A provider that refuses the batch for good (a wrong key): the job's requests fail with the
provider's reason, scrubbed of the key, instead of the job waiting in `preparing` forever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr

from batch.flush import flush
from core.db import session_scope
from models.tables import BatchJob
from tests.fixtures.batch import add_requests, make_settings, rows


def test_a_refused_batch_fails_its_requests_with_the_reason(
    batch_db: str, redis_url: str, simulator: Any, tmp_path: Path
) -> None:
    wrong_key = "sk-wrong-" + "k" * 24
    settings = make_settings(batch_db, redis_url, simulator, tmp_path).model_copy(
        update={"openai_api_key": SecretStr(wrong_key), "default_batch_mode": "native"}
    )
    ids = add_requests(settings, [("sheepdog-mini", f"refused q{i}") for i in range(5)])
    report = flush(settings)
    assert report.failed == 5
    found = rows(settings, ids)
    assert {r.status for r in found.values()} == {"failed"}
    reason = next(iter(found.values())).error or ""
    assert reason.startswith("the provider refused the batch (401)")
    assert wrong_key not in reason
    with session_scope(settings.database_url) as session:
        job = session.get(BatchJob, next(iter(found.values())).batch_job_id)
        assert job is not None and job.status == "failed" and job.ingested_at is not None
    assert flush(settings).jobs == []  # nothing left preparing
