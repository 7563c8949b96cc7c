"""Writing a batch job's input file line by line, and reading JSONL streams line by line.

The file is written from a server-side cursor over the job's rows, one validated line at a
time, never built in memory. A request whose line cannot be written (its body does not
validate, or its model is not the job's) is reported back and left out of the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.batch_lines import CHAT_URL, InputLine
from models.status import Status
from models.tables import Request

READ_CHUNK = 1 << 16
MAX_LINE_BYTES = 64 << 20  # a result line longer than this is dropped as malformed


@dataclass
class Written:
    """The file written for one job."""

    path: Path
    lines: int = 0
    bytes: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request id, reason)


def job_path(workdir: str, job_id: str) -> Path:
    return Path(workdir) / f"{job_id}.jsonl"


def encode_line(request_id: str, body: object, model: str) -> bytes:
    """One validated input line (bytes, newline included); ValueError with the reason."""
    raw = {"custom_id": request_id, "method": "POST", "url": CHAT_URL, "body": body}
    try:
        line = InputLine.model_validate(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"cannot write batch line: {where}: {first['msg']}") from None
    if line.body.model != model:
        raise ValueError(f"cannot write batch line: model {line.body.model!r} is not {model!r}")
    try:
        return orjson.dumps(raw) + b"\n"
    except TypeError as err:
        raise ValueError(f"cannot write batch line: {err}") from None


def write_job_file(
    session: Session, job_id: str, model: str, workdir: str, max_bytes: int
) -> Written:
    """Write the job's `batched` rows to `<workdir>/<job_id>.jsonl` (atomically renamed into
    place), streaming rows from the database."""
    target = job_path(workdir, job_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    written = Written(target)
    stmt = (
        select(Request.id, Request.body)
        .where(Request.batch_job_id == job_id, Request.status == Status.BATCHED.value)
        .order_by(Request.id)
        .execution_options(yield_per=2000)
    )
    with tmp.open("wb") as out:
        for request_id, body in session.execute(stmt):
            try:
                data = encode_line(request_id, body, model)
            except ValueError as err:
                written.rejected.append((request_id, str(err)))
                continue
            if written.bytes + len(data) > max_bytes:
                written.rejected.append((request_id, "cannot write batch line: file limit"))
                continue
            out.write(data)
            written.lines += 1
            written.bytes += len(data)
    tmp.replace(target)
    return written


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream (without newlines, blank lines skipped), holding one partial
    line at a time. A line longer than MAX_LINE_BYTES is yielded as b"\\x00" (malformed)."""
    rest = b""
    skipping = False
    for chunk in chunks:
        if not chunk:
            continue
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            if skipping:
                skipping = False
                continue
            if part.strip():
                yield part
        if len(rest) > MAX_LINE_BYTES:
            rest = b""
            if not skipping:
                skipping = True
                yield b"\x00"
    if rest.strip() and not skipping:
        yield rest


def file_lines(path: Path) -> Iterator[bytes]:
    """Lines of a local file, streamed."""
    with path.open("rb") as handle:
        yield from split_lines(iter(lambda: handle.read(READ_CHUNK), b""))
