"""A final job's result lines from its provider: the output and error files, streamed, and for a
job that failed validation, error lines made from the input lines the provider named."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import openai
import orjson
from pydantic import ValidationError

from batch.jsonl import READ_CHUNK, file_lines, job_path, split_lines
from core.settings import Settings
from models.batch_lines import BatchErrorItem

log = logging.getLogger("sheepdog.batch.ingest")


def download_lines(client: openai.OpenAI, file_id: str) -> Iterator[bytes]:
    """Lines of a provider file, streamed (never the whole file in memory)."""
    with client.files.with_streaming_response.content(file_id) as response:
        yield from split_lines(response.iter_bytes(READ_CHUNK))


def result_lines(client: openai.OpenAI, file_ids: list[str | None]) -> Iterator[bytes]:
    """Lines of the job's output and error files; a file gone at the provider yields nothing
    (its requests are left for the leftover pass)."""
    for file_id in file_ids:
        if not file_id:
            continue
        try:
            yield from download_lines(client, file_id)
        except openai.NotFoundError:
            log.warning("result file %s is gone; its requests are retried", file_id)


def validation_failures(
    settings: Settings,
    client: openai.OpenAI,
    job_id: str,
    input_file_id: str | None,
    errors: dict[str, Any] | None,
) -> Iterator[bytes]:
    """Error lines (provider format) for the input lines a failed validation names; the rest
    of the job's requests are left for the leftover pass (queued again)."""
    by_line = _named_lines(errors)
    if not by_line:
        return
    local = job_path(settings.batch_workdir, job_id)
    if local.exists():
        source: Iterable[bytes] = file_lines(local)
    elif input_file_id:
        source = download_lines(client, input_file_id)
    else:
        return
    last = max(by_line)
    for number, raw in enumerate(source, start=1):
        if number > last:
            break
        item = by_line.get(number)
        if item is None:
            continue
        try:
            custom_id = orjson.loads(raw).get("custom_id")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(custom_id, str) and custom_id:
            message = f"batch validation: {item.message or 'invalid line'}"
            yield orjson.dumps(
                {"custom_id": custom_id, "error": {"code": item.code, "message": message}}
            )


def _named_lines(errors: dict[str, Any] | None) -> dict[int, BatchErrorItem]:
    """The validation errors that name an input line, by line number."""
    items = []
    for entry in (errors or {}).get("data") or []:
        try:
            items.append(BatchErrorItem.model_validate(entry))
        except ValidationError:
            continue
    return {e.line: e for e in items if e.line is not None}
