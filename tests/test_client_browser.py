"""A real browser follows a request: headless Chromium (Debian's `chromium`) loads a small page
(tests/fixtures/browser/follow.html, served by the test from another origin, so the API's CORS
setting is what lets it in) that submits a request with `fetch`, follows its events with
`EventSource` and shows its text. The stream goes through a real TCP proxy that drops it
mid-answer: the browser reconnects on its own with `Last-Event-ID`, and the text shown equals the
row's, each event seen once. A second page follows a finished request by id (the replay).

EventSource cannot send an Authorization header: the page passes its tenant key as
`?access_token=` on the event stream (the front door takes it there for that endpoint only), and as
`Authorization: Bearer` on its `fetch`."""

from __future__ import annotations

import functools
import html
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sheepdog_client import Client

from tests.fixtures.api import ApiServer, start_api
from tests.fixtures.tcp_proxy import TcpProxy, port_of, tcp_proxy
from tests.fixtures.workers import Proc, Stack

PAGES = Path(__file__).parent / "fixtures" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """The test's own static server for the page (another origin than the API)."""
    handler = functools.partial(_Quiet, directory=str(PAGES))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def open_door(stack: Stack, worker: Proc, page_origin: str) -> Iterator[ApiServer]:
    """The front door, letting the page's origin in (CORS)."""
    with start_api(stack, SHEEPDOG_API_CORS_ORIGINS=page_origin) as door:
        yield door


def _element(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">(.*?)</', dom, re.S)
    assert match, f"no #{element_id} in the page:\n{dom[:2000]}"
    return html.unescape(match.group(1))


def _cut_once_streaming(proxy: TcpProxy, tokens: int) -> threading.Thread:
    """Drop the browser's event stream once `tokens` token events have gone through it."""

    def run() -> None:
        deadline = time.monotonic() + 90
        while proxy.watched < tokens and time.monotonic() < deadline:
            time.sleep(0.005)
        proxy.cut()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _chromium(page: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    # --dump-dom prints the page once it is idle for the virtual-time budget: an open
    # EventSource is a pending fetch, so that is after the page closed it (done or error).
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=60000"]
    return subprocess.run([*cmd, "--dump-dom", page], capture_output=True, text=True, timeout=120)


def test_browser_submits_and_follows_a_request_with_eventsource(
    open_door: ApiServer,
    page_origin: str,
    simulator,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    tag = f"browser-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 100}])
    key = open_door.key()
    with Client(open_door.url, api_key=key) as client, tcp_proxy(port_of(open_door.url)) as proxy:
        query = {"api": proxy.url, "token": key, "prompt": f"{tag} tell the browser something"}
        cutter = _cut_once_streaming(proxy, tokens=3)
        run = _chromium(f"{page_origin}/follow.html?{urlencode(query)}", tmp_path / "chromium")
        cutter.join(5)
        assert run.returncode == 0, run.stderr[-3000:]
        dom = run.stdout
        rid = _element(dom, "id")
        assert rid.startswith("req_"), dom[:3000]
        view = client.result(rid, wait=30)
    assert view.status == "succeeded", f"{rid} ended {view.status}: {view.error}"
    assert _element(dom, "status") == "done", dom[:3000]
    seqs = [int(s) for s in _element(dom, "seqs").split(",")]
    assert seqs == list(range(len(seqs))), seqs  # no gap, no duplicate across the reconnect
    assert proxy.cuts == 1 and int(_element(dom, "opens")) == 2  # it did reconnect, once
    assert _element(dom, "text") == view.text and view.text


def test_browser_follows_a_finished_request_by_id(
    open_door: ApiServer, page_origin: str, tmp_path: Path
) -> None:
    key = open_door.key()
    with Client(open_door.url, api_key=key) as client:
        rid = client.submit(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "a finished answer, replayed"}],
            priority="normal",
        )
        view = client.result(rid, wait=60)
    assert view.status == "succeeded", f"{rid} ended {view.status}: {view.error}"
    query = {"api": open_door.url, "id": rid, "token": key}
    run = _chromium(f"{page_origin}/follow.html?{urlencode(query)}", tmp_path / "chromium")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _element(run.stdout, "status") == "done", run.stdout[:3000]
    assert _element(run.stdout, "text") == view.text
