"""Finding and reading the documents the nightly job summarises."""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

MAX_TITLE_CHARS = 200
MAX_PATH_CHARS = 1000  # the documents table's `path` column
_CONTROL = {c: " " for c in range(32) if chr(c) not in "\t\n"} | {0x7F: " "}


@dataclass(frozen=True)
class SourceDocument:
    """One file as read from disk."""

    path: str  # absolute, resolved: the documents table's unique key
    title: str
    text: str | None  # None when the file is not UTF-8 text
    content_hash: str  # sha256 of the bytes
    size_bytes: int
    refused: str | None = None  # why it is refused unread (too large)


def find_files(patterns: str, root: Path | None = None) -> list[Path]:
    """Files matching `patterns` (`|`-separated globs, `**` recursive; relative ones are taken
    from `root`, default the working directory), resolved, sorted, each once."""
    base = root or Path.cwd()
    found: set[Path] = set()
    for pattern in (p.strip() for p in patterns.split("|")):
        if not pattern:
            continue
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        for name in glob.glob(os.path.expanduser(full), recursive=True):
            path = Path(name)
            if path.is_file():
                found.add(path.resolve())
    return sorted(found)


def unfit_file(path: Path) -> str | None:
    """Why `path` cannot be a document row (None: it can): a name that is not UTF-8, or longer
    than the table takes."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not UTF-8"
    if len(name) > MAX_PATH_CHARS:
        return f"the path is over {MAX_PATH_CHARS} characters"
    return None


def shown(path: Path) -> str:
    """`path` for a report: a name that is not UTF-8 with its odd bytes escaped."""
    return str(path).encode("utf-8", "backslashreplace").decode()


def title_of(text: str, fallback: str) -> str:
    """The first Markdown heading, else the first non-empty line, else `fallback`; control
    characters (a NUL: PostgreSQL refuses it in text) as spaces."""
    return _title(text.translate(_CONTROL), fallback)


def _title(text: str, fallback: str) -> str:
    first_line = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()[:MAX_TITLE_CHARS] or fallback
        if not first_line:
            first_line = stripped
    return first_line[:MAX_TITLE_CHARS] or fallback


def read_document(path: Path, max_bytes: int) -> SourceDocument:
    """Read one file; its hash is over the raw bytes, so any change is a new version. A file
    over `max_bytes` is hashed as it is read and not kept: its `refused` says why."""
    fallback = path.stem.replace("-", " ").replace("_", " ")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = f.tell()
            reason = f"{size:,} bytes, over the {max_bytes:,} its parts could ever hold"
            return SourceDocument(str(path.resolve()), fallback, None, digest, size, reason)
    digest = hashlib.sha256(data).hexdigest()
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    title = title_of(text, fallback) if text is not None else fallback
    return SourceDocument(str(path.resolve()), title, text, digest, len(data))


def display_path(path: str, root: Path | None = None) -> str:
    """`path` relative to `root` (default cwd) when it lies below it, else as stored."""
    try:
        return str(Path(path).relative_to(root or Path.cwd()))
    except ValueError:
        return path
