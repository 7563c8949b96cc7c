"""End to end through a real worker and beat: low-priority requests submitted with the client
end succeeded at the batch rate; `sheepdog batches --json` shows their job."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from rules.prices import price_table
from tests.fixtures.workers import ROOT


def test_low_priority_requests_end_succeeded_at_batch_rate(
    stack: Any, worker: Any, stack_client: Any
) -> None:
    beat = stack.start_beat()
    try:
        requests = [
            {
                "model": "sheepdog-mini",
                "messages": [{"role": "user", "content": f"e2e batch question {i}"}],
                "priority": "low",
                "max_tokens": 30,
            }
            for i in range(25)
        ]
        ids = stack_client.submit_many(requests)
        views = [stack_client.result(rid, wait=90) for rid in ids]
    finally:
        beat.stop()
    prices = price_table()
    for view in views:
        assert view.status == "succeeded", (view.status, view.error)
        assert view.route == "batch" and view.text and view.batch_job_id
        assert view.usage is not None
        assert view.cost_usd == prices.cost(
            view.model, view.usage.prompt_tokens, view.usage.completion_tokens, "batch"
        )
    out = subprocess.run(
        [sys.executable, "-c", "from sheepdog.cli import main; main()", "batches", "--json"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = {b["id"]: b for b in json.loads(out.stdout)["batches"]}
    for job_id in {v.batch_job_id for v in views}:
        assert listed[job_id]["ingested_at"] and listed[job_id]["cost_usd"]
