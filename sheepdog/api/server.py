"""Running the front door: uvicorn with one or more processes."""

from __future__ import annotations

import logging
import os

from core.errors import SheepdogError, scrub_secrets


class _ScrubKeys(logging.Filter):
    """Access-log lines without keys (an EventSource passes its key as ?access_token=)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(scrub_secrets(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_log_scrubber() -> None:
    logging.getLogger("uvicorn.access").addFilter(_ScrubKeys())


def serve(address: str, port: int, processes: int = 1, no_auth: bool = False) -> None:
    """Serve until stopped. Settings reach every process through the environment."""
    import uvicorn

    from sheepdog.api.front import is_loopback
    from workers.metrics import prepare_multiprocess

    if no_auth and not is_loopback(address):
        raise SheepdogError(f"--no-auth serves only a loopback address, not {address}")
    os.environ["SHEEPDOG_API_ADDRESS"] = address
    os.environ["SHEEPDOG_API_PORT"] = str(port)
    os.environ["SHEEPDOG_API_NO_AUTH"] = "1" if no_auth else "0"
    from core.settings import get_settings

    get_settings.cache_clear()
    prepare_multiprocess(processes > 1)
    # httptools and uvloop named, not left to "auto": a missing one fails at start instead of
    # falling back quietly to the slower pure-Python parser and loop.
    uvicorn.run(
        "sheepdog.api.app:create_app",
        factory=True,
        host=address,
        port=port,
        workers=processes,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        log_level="info",
        access_log=get_settings().api_access_log,
        http="httptools",
        loop="uvloop",
        backlog=4096,  # a thousand event streams connect at once
    )
