"""bench_batch.py's last phase: the peak memory of one ingest of a large output file, measured
in a fresh subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import update

from bench.batch_steps import record
from bench.bodies import low_requests
from bench.report import Measure
from bench.stack import ROOT, sim_settings
from core.db import session_scope
from core.settings import Settings
from models.tables import Request
from simulator.server import SimulatorProcess
from tests.fixtures.pg import create_database, drop_database

MODELS = ("sheepdog-mini", "gpt-4.1-mini")
ANSWER = "lorem ipsum dolor sit amet " * 150  # ~4 KB

CHILD = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from pydantic import SecretStr
from core.settings import Settings
from batch.ingest import ingest
cfg = json.loads(sys.argv[2])
settings = Settings().model_copy(update={**cfg, "openai_api_key": SecretStr(cfg["openai_api_key"])})
tracemalloc.start()
t = time.perf_counter()
report = ingest(cfg["job_id"], settings)
elapsed = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "ok": report.succeeded, "s": elapsed}))
"""


def output_line(rid: str, model: str) -> str:
    """One line of a Batch API output file: a ~4 KB answer for request `rid`."""
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 900},
    }
    line = {
        "id": "br",
        "custom_id": rid,
        "error": None,
        "response": {"status_code": 200, "request_id": "r", "body": body},
    }
    return json.dumps(line) + "\n"


def claimed_groups(settings: Settings, mb: int) -> list[Any]:
    """Rows for an output file of about `mb` MB, recorded and claimed into jobs."""
    from batch.claim import claim
    from sheepdog.client import Client

    n = mb * 1_000_000 // (len(ANSWER) + 300)
    client = Client(settings)
    prompt = f"mem{mb} question number {{i}}, briefly"
    items = [client.prepare(r) for r in low_requests(n, prompt, models=MODELS)]
    record(settings.database_url, items, per_message=2000)
    with session_scope(settings.database_url) as session:
        return claim(session, settings.model_copy(update={"batch_max_lines": 10**9})).groups


def one_completed_job(
    sim: SimulatorProcess, settings: Settings, groups: list[Any], path: Path, mb: int
) -> str:
    """Upload the output file and make one job, completed, hold every request: its id."""
    from openai import OpenAI

    from batch.jobs import update_job

    oai = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0, timeout=600)
    with path.open("rb") as fh:
        file_id = oai.files.create(file=(path.name, fh), purpose="batch").id
    first, *others = groups
    for g in others:  # one job holding every request, as one big output file
        with session_scope(settings.database_url) as session:
            session.execute(
                update(Request)
                .where(Request.batch_job_id == g.job_id)
                .values(batch_job_id=first.job_id)
            )
    update_job(
        settings,
        first.job_id,
        status="completed",
        output_file_id=file_id,
        provider_batch_id=f"batch_mem_{mb}",
    )
    return str(first.job_id)


def ingest_in_child(cfg: dict[str, str]) -> dict[str, Any]:
    """Ingest job cfg["job_id"] in a fresh interpreter under tracemalloc (cfg: its settings):
    its peak, max RSS and rate."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def memory(sim: SimulatorProcess, redis: str, mb: int, rows: list[Measure]) -> None:
    """Ingest an output file of `mb` MB (answers of ~4 KB) in a subprocess; its peak memory."""
    db = create_database("sheepdog_bench")
    try:
        workdir = tempfile.mkdtemp(prefix="bench-mem-")
        settings = sim_settings(redis, db, sim, batch_workdir=workdir)
        groups = claimed_groups(settings, mb)
        path = Path(workdir) / "output.jsonl"
        with path.open("w") as out:
            for g in groups:
                out.writelines(output_line(rid, g.model) for rid in g.ids)
        size = path.stat().st_size
        cfg = {
            "database_url": db,
            "redis_url": redis,
            "openai_base_url": sim.base_url,
            "openai_api_key": sim.api_key,
            "batch_workdir": workdir,
            "job_id": one_completed_job(sim, settings, groups, path, mb),
        }
        res = ingest_in_child(cfg)
        rows.append(
            (
                f"ingest peak memory, {size / 1e6:.0f} MB output",
                f"{res['peak'] / 1e6:.1f} MB traced",
                f"max RSS {res['rss_kb'] / 1024:.0f} MB; {res['ok']:,} rows, "
                f"{res['ok'] / res['s']:,.0f} rows/s under tracemalloc",
            )
        )
        path.unlink()
    finally:
        drop_database(db)
