"""Fault suite, security: the provider key never shows in worker logs, the database, the broker's
messages or a request's error (even a 401's); prompts are not logged at INFO; SQL is built from
bound parameters only. (Elsewhere: Flower refuses requests without credentials,
tests/test_flower.py; channel and request ids are random, tests/test_security.py; the
simulator refuses wrong keys, tests/test_simulator_chat.py; pickled messages are refused,
tests/test_security.py.)"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from models.tables import Base
from tests.fixtures.faults import (
    Deployment,
    Figures,
    RedisServer,
    make_deployment,
    tally,
    wait_final,
)
from tests.fixtures.invariants import check_invariants
from tests.fixtures.simulator import start_simulator
from tests.fixtures.workers import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def redis_text(url: str) -> bytes:
    """Every value in a Redis database, read by type (DUMP may compress what it returns)."""
    r = redis.Redis.from_url(url)
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"hash":
            out += [k + v for k, v in r.hgetall(key).items()]
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"stream":
            out += [b"".join(f.values()) for _, f in r.xrange(key)]
    return b"\n".join(out)


def database_text(db_url: str) -> str:
    """Every row of every table as text (the table names are the schema's own constants)."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        return "\n".join(
            str(row[0])
            for table in Base.metadata.sorted_tables
            for row in conn.execute(f"SELECT t::text FROM {table.name} AS t")  # schema names
        )


def test_the_key_never_leaks_and_prompts_are_not_logged(
    fault_redis: RedisServer, fault_db: str, tmp_path: Path, fault_figures: Figures
) -> None:
    secret = f"sk-secret-{uuid.uuid4().hex}"
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    prompt = f"confidential prompt {uuid.uuid4().hex}"
    with start_simulator(api_key=secret, time_scale=1000.0) as sim:
        dep: Deployment = make_deployment(tmp_path, fault_redis, fault_db, sim)
        client = dep.client()
        good = client.submit_many(
            [
                {
                    "model": "sheepdog-mini",
                    "messages": [{"role": "user", "content": f"{prompt} {i}"}],
                    "priority": "high" if i % 2 else "low",
                    "max_tokens": 20,
                }
                for i in range(10)
            ]
        )
        queued = redis_text(dep.settings.redis_url)  # the task messages, before any worker
        procs = [dep.stream_worker("stream"), dep.batch_worker("batch")]
        procs.append(dep.stack.start_beat(name="beat"))
        try:
            wait_final(dep.settings, good, 60)
            midway = redis_text(dep.settings.redis_url)
            # A worker holding a key the provider refuses: the request fails with a 401, and
            # its error must not echo the key.
            procs.append(
                dep.stack.start_worker(
                    queues="stream", concurrency=4, name="wrong-key",
                    env={"SHEEPDOG_OPENAI_API_KEY": wrong,
                         "SHEEPDOG_BROKER_PREFIX": "wrong-key:"},
                )
            )  # fmt: skip
            wrong_dep = Deployment(
                {**dep.env, "SHEEPDOG_BROKER_PREFIX": "wrong-key:"},
                dep.stack,
                fault_redis,
                tmp_path,
            )
            refused = wrong_dep.client().submit(
                {"model": "sheepdog-mini", "messages": [{"role": "user", "content": prompt}]}
            )
            rows = wait_final(dep.settings, [refused], 60)
        finally:
            for p in procs:
                p.stop()
    t = tally(dep.settings, [*good, refused])
    check_invariants(dep.settings, [*good, refused])
    fault_figures.record("provider refuses the key (401)", tally(dep.settings, [refused]), "")
    assert t.succeeded == 10 and t.failed == 1 and t.lost == 0, t
    error = rows[refused].error or ""
    assert "401" in error and secret not in error and wrong not in error
    logs = "\n".join(p.log_text() for p in procs)
    assert "succeeded" in logs  # the logs are the run's (INFO level)
    for key in (secret, wrong):
        assert key not in logs
        assert key.encode() not in queued + midway + redis_text(dep.settings.redis_url)
        assert key not in database_text(dep.settings.database_url)
    assert prompt not in logs  # neither in the workers' INFO logs nor in task arguments shown


# SQL built from strings, each vetted: (file, a fragment of the call) -> why it is safe.
VETTED = {
    ("lifecycle/record.py", "COPY intake_rows"): "column names from the Request table",
    ("lifecycle/record.py", "INSERT INTO requests"): "column names from the Request table",
    ("costs/ledger.py", "CREATE TEMP TABLE ledger_in"): "COLUMNS, a module constant",
    ("costs/ledger.py", "COPY ledger_in"): "COLUMNS, a module constant",
    ("costs/ledger.py", "INSERT INTO cost_ledger"): "COLUMNS, a module constant",
    ("core/db.py", "ANALYZE"): "a table name of our own, checked to be an identifier",
    ("lifecycle/moves.py", "literal_column"): "status names from the Status enum",
}
SQL_CALLS = frozenset(
    {"execute", "executemany", "exec_driver_sql", "text", "copy", "literal_column"}
)
SOURCES = [
    "sheepdog", "workers", "tasks", "scheduler", "documents", "intake", "batch", "streaming",
    "lifecycle", "costs", "webhooks", "rules", "models", "core",
]  # fmt: skip


@pytest.mark.unit
def test_sql_is_built_from_bound_parameters_only() -> None:
    found = []
    vetted_seen = set()
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                arg = node.args[0]
                built = isinstance(arg, ast.JoinedStr | ast.BinOp) or (
                    isinstance(arg, ast.Call)
                    and isinstance(arg.func, ast.Attribute)
                    and arg.func.attr == "format"
                )
                if name in SQL_CALLS and built:
                    rel = str(path.relative_to(ROOT))
                    segment = ast.get_source_segment(source, node) or ""
                    vetted = [(f, frag) for f, frag in VETTED if f == rel and frag in segment]
                    vetted_seen.update(vetted)
                    if not vetted:
                        found.append(f"{rel}:{node.lineno}: {segment[:80]}")
    assert not found, "SQL built from strings (bind parameters instead):\n" + "\n".join(found)
    assert vetted_seen == set(VETTED)  # the scan sees them (and the list holds no stale entry)


# -- bad input through the real CLI ------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fuzz_input import payloads  # noqa: E402

lines = st.one_of(st.text(max_size=40), payloads.map(json.dumps))


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(file_lines=st.lists(lines, min_size=1, max_size=4), tail=st.binary(max_size=12))
def test_submit_file_subprocess_accepts_or_refuses_cleanly(
    fault_redis: RedisServer, tmp_path: Path, file_lines: list[str], tail: bytes
) -> None:
    """`sheepdog submit --file` as a real process: a clean one-line refusal with nothing
    enqueued, or one request id a line (a few examples: each is a process start)."""
    url = fault_redis.url(3)  # no worker listens here
    r = redis.Redis.from_url(url)
    r.flushdb()
    path = tmp_path / "requests.jsonl"
    path.write_bytes("\n".join(file_lines).encode() + tail)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(SHEEPDOG_REDIS_URL=url, SHEEPDOG_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    cli = [sys.executable, "-c", "from sheepdog.cli import main; main()"]
    done = subprocess.run(
        [*cli, "submit", "--file", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        assert "Traceback" not in done.stderr + done.stdout
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert r.dbsize() == 0, "a refused file enqueued something"
    else:
        ids = done.stdout.split()
        assert ids and all(i.startswith("req_") for i in ids)
