"""sheepdog-client's submit against a real HTTP server: a 409 `idempotency_key_in_progress` is
sent again after its Retry-After, any other refusal is raised at once."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from sheepdog_client import AsyncClient, Client

MODEL = "gpt-4.1-mini"


def ask(prompt: str, **fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def test_a_submit_is_resent_while_its_key_is_in_progress() -> None:
    """A 409 `idempotency_key_in_progress` (the first submit with the key not yet written) is
    sent again after the server's Retry-After, up to `max_retries` times; any other 409 is
    raised at once. It was raised, for every caller to write the same loop."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sheepdog_client import Conflict

    posts: list[bytes] = []
    busy = {"left": 0}
    rid = "req_" + "a" * 32

    class Door(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            code = "idempotency_key_in_progress" if busy["left"] else "idempotency_key_conflict"
            if busy["left"] == 0 and b'"other"' not in posts[-1]:
                status, body, extra = 202, {"id": rid}, {}
            else:
                busy["left"] = max(0, busy["left"] - 1)
                status, extra = 409, {"Retry-After": "0.05"}
                body = {"error": {"message": "busy", "type": "x", "param": None, "code": code}}
            raw = orjson.dumps(body)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **extra}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Door)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    body = ask("again", idempotency_key="k1")
    try:
        with Client(base, api_key="k") as client:
            busy["left"] = 2
            assert client.submit(body) == rid
            assert len(posts) == 3 and len(set(posts)) == 1, "the same body, sent again"
            busy["left"], posts[:] = 3, []
            with pytest.raises(Conflict) as err:
                client.submit(body)
            assert err.value.code == "idempotency_key_in_progress" and len(posts) == 3
            assert err.value.retry_after == 0.05
            posts[:] = []
            with pytest.raises(Conflict, match="busy"):
                client.submit(ask("other", idempotency_key="k1"))
            assert len(posts) == 1, "a conflict of another body is not resent"

        async def twice() -> str:
            async with AsyncClient(base, api_key="k", max_retries=1) as client:
                busy["left"] = 1
                return await client.submit(body)

        posts[:] = []
        assert asyncio.run(twice()) == rid and len(posts) == 2
    finally:
        server.shutdown()
        server.server_close()
