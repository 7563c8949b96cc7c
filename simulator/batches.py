"""``/v1/batches``: create, retrieve, list, cancel. The lifecycle itself is in ``batch_runner``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from simulator.batch_runner import run_batch
from simulator.batch_store import FINAL, BatchJob, BatchStore
from simulator.errors import ApiError, bad_request, json_response
from simulator.faults import FAULT_HEADER, parse_fault_header
from simulator.files import page, parse_limit
from simulator.ids import new_id, now
from simulator.state import api, sim

ENDPOINTS = {"/v1/chat/completions"}


def store(request: Request) -> BatchStore:
    batches: BatchStore = sim(request).batches
    return batches


def _check_metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise bad_request("metadata must be an object of at most 16 pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise bad_request(
                "metadata keys are at most 64 characters, values strings of at most 512.",
                param="metadata",
            )
    return metadata


@api(batch_api=True)
async def create_batch(request: Request) -> Response:
    """``POST /v1/batches``: checks the request, then starts the lifecycle in the background."""
    state = sim(request)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    extra = parse_fault_header(request.headers.get(FAULT_HEADER))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise bad_request("Missing required parameter: 'input_file_id'.", param="input_file_id")
    file_obj = state.files.get(file_id)
    if file_obj["purpose"] != "batch":
        raise bad_request(
            f"The input file {file_id} must have purpose 'batch'.", param="input_file_id"
        )
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise bad_request(
            f"Invalid value for 'endpoint': {endpoint!r}. Supported: /v1/chat/completions.",
            param="endpoint",
            code="invalid_value",
        )
    if body.get("completion_window") != "24h":
        raise bad_request(
            "Invalid value for 'completion_window': only '24h' is supported.",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _check_metadata(body.get("metadata"))
    window = state.config.scaled(state.config.batch_window_s)
    created = now()
    obj: dict[str, Any] = {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": endpoint,
        "model": None,
        "errors": None,
        "input_file_id": file_id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + max(1, round(window)),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "usage": None,
        "metadata": metadata,
    }
    job = BatchJob(obj, extra, time.monotonic() + window)
    store(request).jobs[job.id] = job
    state.stats.count("batches.created")
    job.task = asyncio.create_task(run_batch(state, job))
    return json_response(obj)


@api(batch_api=True)
async def retrieve_batch(request: Request) -> Response:
    """``GET /v1/batches/{id}``."""
    return json_response(store(request).get(request.path_params["batch_id"]).obj)


@api(batch_api=True)
async def list_batches(request: Request) -> Response:
    """``GET /v1/batches``: newest first, ``limit`` (1..100) and ``after`` cursor."""
    items = [job.obj for job in reversed(store(request).jobs.values())]
    query = request.query_params
    return json_response(page(items, query.get("after"), parse_limit(query.get("limit"), 100)))


@api(batch_api=True)
async def cancel_batch(request: Request) -> Response:
    """``POST /v1/batches/{id}/cancel``: ``cancelling`` now, ``cancelled`` when the runner stops."""
    job = store(request).get(request.path_params["batch_id"])
    if job.status in ("cancelling", "cancelled"):
        return json_response(job.obj)
    if job.status in FINAL:
        raise ApiError(409, f"Cannot cancel a batch with status '{job.status}'.")
    job.set_status("cancelling")
    return json_response(job.obj)
