"""Admin endpoints for tests and the demo: ``/_sim/config``, ``/_sim/stats``, ``/_sim/reset``.

The real API has nothing under ``/_sim``. They need the simulator's API key when one is set and
answer loopback clients only when none is (simulator/guard.py); the key itself is never shown.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from simulator.config import SimulatorConfig
from simulator.errors import bad_request, json_response
from simulator.guard import admin
from simulator.state import sim

RUNTIME_FIELDS = {
    "faults",
    "ttft_ms",
    "chunk_delay_ms",
    "time_scale",
    "no_batch_api",
    "reject_stream_options",
    "answer_tokens",
    "api_key",
    "batch_validate_s",
    "batch_seconds_per_line",
    "batch_finalize_s",
    "batch_window_s",
    "batch_max_lines",
    "max_file_bytes",
    "max_body_bytes",
    "service_tiers",
    "flex_capacity",
    "flex_slowdown",
    "flex_ttft_ms",
    "priority_speedup",
}


def _shown(config: SimulatorConfig) -> dict[str, object]:
    shown = config.model_dump(mode="json")
    shown["api_key"] = "(set)" if config.api_key else None
    return shown


@admin
async def get_config(request: Request) -> Response:
    """``GET /_sim/config``: the configuration in force (the API key only as set or not)."""
    return json_response(_shown(sim(request).config))


@admin
async def put_config(request: Request) -> Response:
    """``PUT /_sim/config``: change fields; a ``faults`` list replaces the rules (and counters)."""
    try:
        changes = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return bad_request("Body must be JSON.").response()
    if isinstance(changes, list):
        changes = {"faults": changes}
    if not isinstance(changes, dict) or not set(changes) <= RUNTIME_FIELDS:
        unknown = sorted(set(changes) - RUNTIME_FIELDS) if isinstance(changes, dict) else []
        return bad_request(f"Unknown or unchangeable fields: {unknown}").response()
    try:
        config = sim(request).apply(changes)
    except ValidationError as exc:
        return bad_request(str(exc)).response()
    return json_response(_shown(config))


@admin
async def get_stats(request: Request) -> Response:
    """``GET /_sim/stats``: counters and the chat-request arrival log."""
    return json_response(sim(request).stats.to_json())


@admin
async def reset(request: Request) -> Response:
    """``POST /_sim/reset``: startup configuration, fresh fault counters and statistics."""
    sim(request).reset()
    return json_response({"ok": True})
