"""The CLI at its edges: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sheepdog(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sheepdog", *args],
        cwd=ROOT,
        env=full,
        text=True,
        capture_output=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unreachable_redis_names_the_url_and_how_to_start_it() -> None:
    result = sheepdog(
        "submit",
        "--model",
        "sheepdog-mini",
        "--prompt",
        "hi",
        env={"SHEEPDOG_REDIS_URL": "redis://127.0.0.1:6399/0"},
    )
    line = one_line_error(result)
    assert "cannot reach Redis at redis://127.0.0.1:6399/0" in line
    assert "redis-server" in line


def test_worker_refuses_to_start_without_redis() -> None:
    line = one_line_error(
        sheepdog("worker", env={"SHEEPDOG_REDIS_URL": "redis://127.0.0.1:6399/0"})
    )
    assert "cannot reach Redis" in line


def test_unreachable_database(tmp_path: Path) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:5999/none"
    line = one_line_error(sheepdog("db", "upgrade", env={"SHEEPDOG_DATABASE_URL": url}))
    assert "cannot reach the database at postgresql+psycopg://nobody:***@127.0.0.1:5999" in line
    assert "secret" not in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "--prompt", "hi"], "model: unknown model 'nope'"),
        (["--model", "sheepdog-mini", "--prompt", "hi", "--priority", "asap"], "unknown priority"),
        (["--model", "sheepdog-mini", "--prompt", ""], "content is empty"),
        (["--model", "sheepdog-mini", "--prompt", "x", "--max-tokens", "0"], "must be positive"),
        (["--model", "sheepdog-mini", "--prompt", "x", "--max-cost-usd", "-1"], "not be negative"),
        (["--prompt", "x"], "--model and --prompt are required"),
        (
            ["--model", "sheepdog-mini", "--prompt", "x", "--lane", "priority"],
            "lane 'priority' is for priority high, not normal",
        ),
    ],
)
def test_submit_bad_flags(args: list[str], message: str, redis_url: str) -> None:
    line = one_line_error(sheepdog("submit", *args, env={"SHEEPDOG_REDIS_URL": redis_url}))
    assert message in line


def test_submit_file_with_a_bad_line_enqueues_nothing(tmp_path: Path, redis_url: str) -> None:
    import uuid

    import redis

    path = tmp_path / "reqs.jsonl"
    good = '{"model": "sheepdog-mini", "messages": [{"role": "user", "content": "hi"}]}'
    path.write_text(f"{good}\n{good}\n{{not json\n")
    # A deployment of its own (key prefix): anything it enqueued would be under that prefix.
    prefix = f"t-cli-{uuid.uuid4().hex[:8]}:"
    env = {"SHEEPDOG_REDIS_URL": redis_url, "SHEEPDOG_BROKER_PREFIX": prefix}
    line = one_line_error(sheepdog("submit", "--file", str(path), env=env))
    assert f"{path}:3: not valid JSON" in line
    path.write_text(f'{good}\n{{"model": "sheepdog-mini", "messages": []}}\n')
    line = one_line_error(sheepdog("submit", "--file", str(path), env=env))
    assert "request 1: invalid request: messages: messages is empty" in line
    assert list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}*")) == []


def test_status_of_an_unknown_request(sqlite_url: str) -> None:
    unknown = "req_" + "0" * 32
    result = sheepdog("status", unknown, "--json", env={"SHEEPDOG_DATABASE_URL": sqlite_url})
    assert f"no request {unknown}" in one_line_error(result)
    result = sheepdog("status", "req_nope", "--json", env={"SHEEPDOG_DATABASE_URL": sqlite_url})
    assert "invalid request id 'req_nope'" in one_line_error(result)


def test_an_export_that_cannot_be_written_is_one_line(sqlite_url: str, tmp_path: Path) -> None:
    """`documents export --output` into a missing folder printed a traceback."""
    env = {"SHEEPDOG_DATABASE_URL": sqlite_url}
    missing = tmp_path / "nowhere" / "docs.jsonl"
    result = sheepdog("documents", "export", "--format", "jsonl", "--output", str(missing), env=env)
    assert f"cannot write {missing}" in one_line_error(result)


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    """matplotlib is the `plot` extra: without it `costs --plot` is one line naming the extra
    (checked before the database is opened: this one does not exist)."""
    hide = "import sys; sys.modules['matplotlib'] = None; from sheepdog.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env["SHEEPDOG_DATABASE_URL"] = "postgresql://nobody:secret@127.0.0.1:5999/none"
    result = subprocess.run(
        [sys.executable, "-c", hide, "costs", "--plot", str(tmp_path / "c.png")],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    line = one_line_error(result)
    assert "matplotlib" in line and "sheepdog[plot]" in line
    assert not (tmp_path / "c.png").exists()
