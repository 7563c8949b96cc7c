"""The batch lifecycle, run as one background task per batch.

validating → in_progress → finalizing → completed, or validating → failed, or
in_progress → expired (window passed or ``expire`` fault), or → cancelling → cancelled.
Lines are answered in bulk and written to disk in shuffled blocks, so the output order is not
the input order and a 50,000-line batch needs only a few seconds at a high time scale.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from simulator.batch_store import BatchJob
from simulator.chat_request import completion_body, error_line_body, parse_chat_request
from simulator.errors import ApiError, bad_request
from simulator.faults import BatchPlan
from simulator.files import FileStore, open_new
from simulator.ids import new_id, now
from simulator.state import SimState

BLOCK = 500  # lines answered between two yields to the event loop
MAX_ERRORS = 100

EXPIRED = "This request could not be executed before the completion window expired."
CANCELLED = "This request was not executed because the batch was cancelled."


class Line:
    """One input line, parsed."""

    __slots__ = ("body", "custom_id", "text")

    def __init__(self, custom_id: str, body: dict[str, Any], text: str) -> None:
        self.custom_id = custom_id
        self.body = body
        self.text = text


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for the non-blank lines of a file, streamed."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def _parse(raw: bytes) -> Line:
    from simulator.chat_request import last_user_text

    item = orjson.loads(raw)
    body = item["body"]
    return Line(item["custom_id"], body, last_user_text(body.get("messages")))


def validate(
    path: Path,
    endpoint: str,
    models: frozenset[str],
    max_lines: int,
    max_bytes: int,
    matches: set[str],
) -> tuple[list[dict[str, Any]], int, str | None, set[str]]:
    """Check an input file: (errors, line count, model, matches seen). Streams the file."""
    errors: list[dict[str, Any]] = []

    def error(code: str, message: str, line: int | None, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "line": line, "param": param})

    size = path.stat().st_size
    if size > max_bytes:
        error("file_too_large", f"The input file is larger than {max_bytes} bytes.", None)
        return errors, 0, None, set()
    seen_ids: set[str] = set()
    seen_matches: set[str] = set()
    model: str | None = None
    count = 0
    for number, raw in _lines(path):
        count += 1
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        if not isinstance(item, dict):
            error("invalid_json_line", "Each line must be a JSON object.", number)
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            error(
                "missing_required_parameter",
                "Missing required parameter: 'custom_id'.",
                number,
                "custom_id",
            )
        elif custom_id in seen_ids:
            error(
                "duplicate_custom_id",
                f"The custom_id '{custom_id}' is used more than once in this file.",
                number,
                "custom_id",
            )
        else:
            seen_ids.add(custom_id)
        if item.get("method", "POST") != "POST":
            error("invalid_method", "Only the POST method is supported.", number, "method")
        if item.get("url") != endpoint:
            error(
                "invalid_url",
                f"The url of this line must be '{endpoint}' (the batch's endpoint).",
                number,
                "url",
            )
        body = item.get("body")
        if not isinstance(body, dict):
            error("invalid_request", "Missing required parameter: 'body'.", number, "body")
            continue
        line_model = body.get("model")
        if model is None and isinstance(line_model, str):
            model = line_model
            if model not in models:
                error(
                    "model_not_found", f"The model '{model}' does not exist.", number, "body.model"
                )
        elif line_model != model:
            error(
                "mismatched_model",
                f"All lines must use the same model; this line uses {line_model!r}, "
                f"earlier lines {model!r}.",
                number,
                "body.model",
            )
        if matches:
            from simulator.chat_request import last_user_text

            text = last_user_text(body.get("messages"))
            seen_matches.update(m for m in matches if m in text)
    if count > max_lines:
        error("too_many_requests", f"The batch has {count} lines; the limit is {max_lines}.", None)
    if count == 0:
        error("empty_file", "The input file has no requests.", None)
    return errors, count, model, seen_matches


class Writer:
    """Output or error file of a batch: created on the first line, blocks written shuffled."""

    def __init__(self, files: FileStore, filename: str, rng: random.Random) -> None:
        self.files = files
        self.filename = filename
        self.rng = rng
        self.file_id = new_id("file-")
        self.handle: IO[bytes] | None = None
        self.pending: list[bytes] = []
        self.count = 0

    def add(self, line: dict[str, Any]) -> None:
        self.pending.append(orjson.dumps(line) + b"\n")
        self.count += 1

    def flush(self) -> None:
        if not self.pending:
            return
        if self.handle is None:
            self.handle = open_new(self.files, self.file_id)
        self.rng.shuffle(self.pending)
        self.handle.write(b"".join(self.pending))
        self.pending.clear()

    def close(self) -> str | None:
        """Close and register the file; its id, or None when it got no line."""
        self.flush()
        if self.handle is None:
            return None
        self.handle.close()
        self.files.add(self.file_id, self.filename, "batch_output")
        return self.file_id


async def _sleep(state: SimState, provider_seconds: float) -> None:
    seconds = state.config.scaled(provider_seconds)
    await asyncio.sleep(seconds if seconds > 0.0005 else 0)


async def run_batch(state: SimState, job: BatchJob) -> None:
    """Drive one batch to a final status."""
    try:
        await _run(state, job)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a simulator bug must still end the batch
        job.obj["errors"] = {
            "object": "list",
            "data": [{"code": "server_error", "message": str(exc), "line": None, "param": None}],
        }
        job.set_status("failed")


async def _run(state: SimState, job: BatchJob) -> None:
    files: FileStore = state.files
    await _sleep(state, state.config.batch_validate_s)
    matches = state.engine.batch_matches(job.faults)
    path = files.path(job.obj["input_file_id"])
    errors, count, model, seen = await asyncio.to_thread(
        validate,
        path,
        job.obj["endpoint"],
        state.models,
        state.config.batch_max_lines,
        state.config.max_file_bytes,
        matches,
    )
    job.obj["model"] = model
    plan = state.engine.batch(model or "", seen, job.faults)
    if plan.fail_validation and not errors:
        errors.append(
            {
                "code": "invalid_request",
                "message": "The batch failed validation (simulated).",
                "line": 1,
                "param": None,
            }
        )
    if errors:
        job.obj["errors"] = {"object": "list", "data": errors}
        job.set_status("failed")
        state.stats.count("batches.failed")
        return
    job.obj["request_counts"]["total"] = count
    if job.status == "validating":
        job.set_status("in_progress")
    await _process(state, job, path, plan, count)


async def _process(state: SimState, job: BatchJob, path: Path, plan: BatchPlan, count: int) -> None:
    files: FileStore = state.files
    rng = random.Random(job.id)
    output = Writer(files, f"{job.id}_output.jsonl", rng)
    errors = Writer(files, f"{job.id}_error.jsonl", rng)
    counts = job.obj["request_counts"]
    usage = {"input_tokens": 0, "output_tokens": 0}
    expire_after = plan.expire_after
    if expire_after is not None and expire_after < 0:
        expire_after = count // 2
    stop: str | None = None  # "expired" | "cancelled"
    done = since_yield = 0
    started = time.monotonic()
    lines = _lines(path)
    for _, raw in lines:
        if stop is None:
            if job.status == "cancelling":
                stop = "cancelled"
            elif (expire_after is not None and done >= expire_after) or (
                time.monotonic() >= job.deadline
            ):
                stop = "expired"
        line = _parse(raw)
        if stop is not None:
            code, message = (
                ("batch_expired", EXPIRED)
                if stop == "expired"
                else (
                    "batch_cancelled",
                    CANCELLED,
                )
            )
            errors.add(_line(line.custom_id, None, {"code": code, "message": message}))
            counts["failed"] += 1
            continue
        _answer(state, line, plan, output, errors, counts, usage)
        done += 1
        since_yield += 1
        per_line = state.config.scaled(state.config.batch_seconds_per_line)
        if since_yield >= max(1, min(BLOCK, int(0.02 / per_line) if per_line else BLOCK)):
            since_yield = 0
            output.flush()
            errors.flush()
            ahead = started + done * per_line - time.monotonic()
            await asyncio.sleep(ahead if ahead > 0.0005 else 0)
    if stop is None and job.status == "cancelling":
        stop = "cancelled"
    job.obj["usage"] = {
        **usage,
        "total_tokens": usage["input_tokens"] + usage["output_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    if stop is None:
        remaining = state.config.scaled(count * state.config.batch_seconds_per_line) - (
            time.monotonic() - started
        )
        if remaining > 0:
            await asyncio.sleep(remaining)
        job.set_status("finalizing")
        await _sleep(state, state.config.batch_finalize_s)
    job.obj["output_file_id"] = await asyncio.to_thread(output.close)
    job.obj["error_file_id"] = await asyncio.to_thread(errors.close)
    if stop is None and job.status == "cancelling":
        stop = "cancelled"
    final = stop or "completed"
    job.set_status(final)
    state.stats.count(f"batches.{final}")


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> dict:
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _answer(
    state: SimState,
    line: Line,
    plan: BatchPlan,
    output: Writer,
    errors: Writer,
    counts: dict[str, int],
    usage: dict[str, int],
) -> None:
    """Answer one line into the output or error file (or nowhere, for a lost line)."""
    fate = plan.fate(line.text) if plan.line_rules else None
    request_id = new_id("req_")
    if fate == "lose":
        counts["completed"] += 1
        return
    try:
        if fate == "error":
            raise bad_request("Simulated invalid request in a batch line.", code="invalid_value")
        chat = parse_chat_request(line.body, state.models)
    except ApiError as exc:
        body = error_line_body(exc)
        errors.add(
            _line(
                line.custom_id,
                {"status_code": exc.status, "request_id": request_id, "body": body},
                None,
            )
        )
        counts["failed"] += 1
        return
    answer = chat.answer(state.config.answer_tokens)
    body = completion_body(chat, answer, new_id("chatcmpl-"), now())
    usage["input_tokens"] += body["usage"]["prompt_tokens"]
    usage["output_tokens"] += body["usage"]["completion_tokens"]
    output.add(
        _line(line.custom_id, {"status_code": 200, "request_id": request_id, "body": body}, None)
    )
    counts["completed"] += 1
