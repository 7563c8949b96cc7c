"""Reading a provider's Batch object: the SDK builds it without checking its fields, so each
value is taken only when the batch_jobs column can hold it and the code after can use it. A
relay's odd object must not stop the poll of every job, nor an ingest for good."""

from __future__ import annotations

from typing import Any

from models.tables import INTEGER_MAX, BatchJob


def batch_values(batch: Any) -> dict[str, Any]:
    """batch_jobs columns, but the status, from a provider Batch object (a final status's
    finished_at is stamped by the move)."""
    counts = batch.request_counts
    values: dict[str, Any] = {
        "output_file_id": _file_id(batch.output_file_id),
        "error_file_id": _file_id(batch.error_file_id),
        "completed_count": _count(getattr(counts, "completed", 0)),
        "failed_count": _count(getattr(counts, "failed", 0)),
    }
    if total := _count(getattr(counts, "total", 0)):
        values["request_count"] = total
    if batch.errors is not None:
        values["errors"] = _errors(batch.errors)
    return values


FILE_ID_CHARS: int = getattr(BatchJob.__table__.c.output_file_id.type, "length", 100)


def status_of(batch: Any) -> str:
    """The Batch object's status; one that is not a string is a word of the relay's own."""
    status = batch.status
    return status if isinstance(status, str) else f"<{type(status).__name__}>"


def _file_id(value: object) -> str | None:
    """A file id the row can hold and a download can name: the SDK refuses `.`, `..` and ids
    with a `/` in its path (every ingest of the job would fail on it)."""
    if not isinstance(value, str) or not 0 < len(value) <= FILE_ID_CHARS:
        return None
    if value in (".", "..") or any(c in value for c in "/\\\x00") or not value.isprintable():
        return None
    return value


def _errors(errors: Any) -> dict[str, Any]:
    """A Batch object's `errors` as its readers (the leftovers' reasons) take it: `data` a list
    of error objects, or none; anything else becomes one error's message."""
    dumped = (
        errors.model_dump(mode="json", warnings=False) if hasattr(errors, "model_dump") else errors
    )
    data = dumped.get("data") if isinstance(dumped, dict) else ()
    if data is None or (isinstance(data, list) and all(isinstance(i, dict) for i in data)):
        return dumped  # type: ignore[no-any-return]
    return {"data": [{"message": str(dumped)[:1000]}]}


def _count(value: object) -> int:
    return value if type(value) is int and 0 <= value <= INTEGER_MAX else 0
