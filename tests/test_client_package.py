"""sheepdog-client against the real front door: a real `sheepdog api` process, a real Celery
worker, Redis, PostgreSQL and the simulator.

The first test builds the client's wheel, installs it into a fresh virtual environment and runs
it from a service folder with its own `models.py`, `tasks.py` and `workers/` (the layout that
breaks `import sheepdog`); the rest use the package from its source, in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sheepdog_client import (
    APIConnectionError,
    AuthenticationError,
    BudgetExceeded,
    Client,
    InvalidRequest,
    NotFound,
    RateLimited,
    RequestFailed,
    RequestView,
    WaitTimeout,
)

from tests.fixtures.api import ApiServer, free_port
from tests.fixtures.workers import Stack

ROOT = Path(__file__).resolve().parents[1]
CLIENT_SRC = ROOT / "clients" / "python"
MODEL = "gpt-4.1-mini"


def ask(prompt: str, **fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def ended(view: RequestView, status: str = "succeeded") -> RequestView:
    """`view`, after checking its status (the request's error in the failure message)."""
    assert view.status == status, f"{view.id} ended {view.status}: {view.error}"
    return view


@pytest.fixture
def client(api_server: ApiServer) -> Iterator[Client]:
    with Client(api_server.url, api_key=api_server.key(), timeout=30) as c:
        yield c


# -- the wheel, installed where a service lives ------------------------------------------------


SERVICE_SCRIPT = """
import json, sys
from sheepdog_client import Client
import models, tasks, workers  # the service's own modules, not Sheepdog's
assert models.SERVICE and tasks.SERVICE and workers.SERVICE

url, key = sys.argv[1], sys.argv[2]
with Client(url, api_key=key) as client:
    rid = client.submit(
        model="gpt-4.1-mini",
        messages=[{"role": "user", "content": "from a service folder"}],
        priority="high",
    )
    pieces = [e.text for e in client.stream(rid) if e.type == "token"]
    view = client.result(rid, wait=60)
print(json.dumps({"id": rid, "streamed": "".join(pieces), "status": view.status}))
"""


def _service_folder(root: Path) -> Path:
    """A Flask/Celery-style service folder: models.py, tasks.py and a workers/ package."""
    service = root / "service"
    (service / "workers").mkdir(parents=True)
    (service / "models.py").write_text("SERVICE = 'models'\n")
    (service / "tasks.py").write_text("SERVICE = 'tasks'\n")
    (service / "workers" / "__init__.py").write_text("SERVICE = 'workers'\n")
    (service / "app.py").write_text(textwrap.dedent(SERVICE_SCRIPT))
    return service


def test_wheel_in_a_fresh_venv_streams_from_a_service_folder(
    api_server: ApiServer, tmp_path: Path
) -> None:
    dist = tmp_path / "dist"
    uv = ROOT / ".venv" / "bin" / "uv"
    subprocess.run(
        [str(uv), "build", "--wheel", "--out-dir", str(dist), str(CLIENT_SRC)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("sheepdog_client-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True, text=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "sheepdog" not in names and {"sheepdog-client", "httpx", "pydantic"} <= names

    service = _service_folder(tmp_path)
    run = subprocess.run(
        [str(venv / "bin" / "python"), "app.py", api_server.url, api_server.key()],
        cwd=service,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    with Client(api_server.url, api_key=api_server.key()) as other, pytest.raises(NotFound):
        other.get(out["id"])  # another tenant's request is not found
    assert out["status"] == "succeeded"
    row_text = _row_text(api_server, out["id"])
    assert out["streamed"] == row_text and row_text


def _row_text(api_server: ApiServer, request_id: str) -> str | None:
    from sqlalchemy import select

    from core.db import session_scope
    from models.tables import Request

    with session_scope(api_server.settings.database_url) as session:
        return session.scalar(select(Request.text).where(Request.id == request_id))


# -- in-process: every call ------------------------------------------------------------------


def test_submit_stream_get_result(client: Client, api_server: ApiServer) -> None:
    rid = client.submit(ask("stream me an answer"), priority="high", max_cost_usd=Decimal("0.05"))
    assert rid.startswith("req_")
    stream = client.stream(rid)
    events = list(stream)
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].type == "done" and stream.final is events[-1]
    view = ended(client.result(rid, wait=60))
    assert stream.text == view.text == _row_text(api_server, rid)
    assert view.usage and view.usage.completion_tokens > 0
    assert stream.final.cost_usd == view.cost_usd and view.cost_usd is not None
    assert view.priority == "high" and view.model == MODEL
    # A finished request streams again from the replay log; the helper gives the text.
    assert client.stream_text(rid) == view.text
    # Resuming after event n gives the rest only.
    rest = list(client.stream(rid, last_event_id=2))
    assert [e.seq for e in rest] == [e.seq for e in events[3:]]


def test_submit_many_result_and_list_pages(client: Client) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = client.submit_many([ask(f"bulk {tag} {i}", priority="normal") for i in range(5)])
    assert len(set(ids)) == 5
    views = [ended(client.result(rid, wait=60)) for rid in ids]
    assert all(v.text for v in views)

    seen: list[str] = []
    page = client.list(status="succeeded", limit=2)
    while True:
        assert len(page.data) <= 2
        seen += [v.id for v in page.data]
        if page.next_cursor is None:
            break
        page = client.list(status="succeeded", limit=2, cursor=page.next_cursor)
    assert sorted(seen) == sorted(ids)  # a fresh tenant sees exactly its own, once each
    assert client.list(status="cancelled").data == []


def test_idempotent_resubmit_returns_the_first_id(client: Client) -> None:
    key = f"order-{uuid.uuid4().hex}"
    first = client.submit(ask("idempotent"), idempotency_key=key)
    assert client.submit(ask("idempotent"), idempotency_key=key) == first
    assert ended(client.result(first, wait=60)).idempotency_key == key


def test_cancel_a_live_stream(client: Client, stack: Stack, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"slow-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    rid = client.submit(ask(f"{tag} please take your time"), priority="high")
    stream = client.stream(rid)
    first = next(e for e in stream if e.type == "token")
    assert first.text
    outcome = client.cancel(rid)
    assert outcome.id == rid and outcome.cancelled
    with pytest.raises(RequestFailed, match="cancelled") as failed:
        stream.final_text()
    assert failed.value.request_id == rid
    ended(client.result(rid, wait=30), "cancelled")
    again = client.cancel(rid)
    assert not again.cancelled and again.status == "cancelled"


def test_result_wait_times_out_on_a_request_still_running(client: Client, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"slow-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": tag, "ttft_ms": 3000}])
    rid = client.submit(ask(tag), priority="high")
    with pytest.raises(WaitTimeout, match=rid):
        client.result(rid, wait=0.3)
    with pytest.raises(WaitTimeout):
        client.stream_text(rid, timeout=0.5)
    client.cancel(rid)


# -- errors, mapped to the exception classes --------------------------------------------------


def test_refusals_raise_their_classes(client: Client, api_server: ApiServer) -> None:
    with pytest.raises(InvalidRequest, match="unknown priority 'urgent'") as bad:
        client.submit(ask("x"), priority="urgent")
    assert bad.value.status == 400 and bad.value.type == "invalid_request_error"
    with pytest.raises(InvalidRequest, match="request 1"):  # all or nothing
        client.submit_many([ask("fine"), ask("bad", max_tokens=-1)])
    assert client.list().data == []  # nothing was enqueued
    with pytest.raises(InvalidRequest, match=r"colour"):
        client.submit(ask("x", colour="blue"))

    with pytest.raises(NotFound) as missing:
        client.get("req_" + "0" * 32)
    assert missing.value.status == 404
    with pytest.raises(NotFound):
        list(client.stream("req_" + "0" * 32))
    with pytest.raises(NotFound):
        client.cancel("req_" + "0" * 32)

    with Client(api_server.url, api_key="sk-sd-not-a-key") as stranger:
        with pytest.raises(AuthenticationError) as denied:
            stranger.get("req_" + "0" * 32)
        assert denied.value.status == 401
    with Client(api_server.url) as anonymous, pytest.raises(AuthenticationError):
        anonymous.submit(ask("x"))

    nowhere = Client(f"http://127.0.0.1:{free_port()}", api_key="k", timeout=2)
    with nowhere, pytest.raises(APIConnectionError):
        nowhere.get("req_x")


def test_another_tenants_request_is_not_found(client: Client, api_server: ApiServer) -> None:
    rid = client.submit(ask("mine"))
    with Client(api_server.url, api_key=api_server.key()) as other:
        with pytest.raises(NotFound):
            other.get(rid)
        with pytest.raises(NotFound):
            other.cancel(rid)
        with pytest.raises(NotFound):
            other.stream_text(rid)
        assert rid not in {v.id for v in other.list().data}
    ended(client.result(rid, wait=60))


def test_budget_and_rate_refusals(api_server: ApiServer) -> None:
    from core.db import session_scope
    from costs.budget_limits import set_budget

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope(api_server.settings.database_url) as session:
        set_budget(session, tenant, daily_usd=Decimal("0.000001"))
    with Client(api_server.url, api_key=api_server.key(tenant)) as poor:
        with pytest.raises(BudgetExceeded, match=tenant) as refused:
            poor.submit(ask("too dear", max_tokens=1000))
        assert refused.value.status == 402 and refused.value.code == "budget_exceeded"

    with Client(api_server.url, api_key=api_server.key(rate_limit_per_minute=1)) as hasty:
        with pytest.raises(RateLimited) as limited:
            for _ in range(100):
                hasty.list()
        assert limited.value.status == 429
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1
