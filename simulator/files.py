"""``/v1/files``: uploads streamed to disk, metadata in memory, contents streamed back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from simulator.errors import ApiError, bad_request, json_response, not_found
from simulator.ids import new_id, now
from simulator.state import api, sim

PURPOSES = {"batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals"}


class FileStore:
    """File objects by id; each file's bytes live at ``<data_dir>/files/<id>``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.objects: dict[str, dict[str, Any]] = {}

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def get(self, file_id: str) -> dict[str, Any]:
        """The file object; 404 when unknown."""
        try:
            return self.objects[file_id]
        except KeyError:
            raise not_found(f"No such File object: {file_id}", param="id") from None

    def add(self, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        """Register a file already written at ``path(file_id)``."""
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": self.path(file_id).stat().st_size,
            "created_at": now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }
        self.objects[file_id] = obj
        return obj

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        del self.objects[file_id]
        self.path(file_id).unlink(missing_ok=True)


def store(request: Request) -> FileStore:
    files: FileStore = sim(request).files
    return files


class _Upload:
    """Streaming multipart parser writing the ``file`` part straight to disk."""

    def __init__(self, target: Path, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.written = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._value = bytearray()
        self._out: IO[bytes] | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode()
        if b"filename" in params and self._name == "file":
            self.filename = params[b"filename"].decode(errors="replace")
            self._out = open(self.target, "wb")  # noqa: SIM115 - closed in _part_end/close

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self.written += end - start
            if self.written > self.limit:
                raise ApiError(
                    413, f"File is larger than the {self.limit} bytes limit.", param="file"
                )
            self._out.write(data[start:end])
        else:
            self._value += data[start:end]

    def _part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._name:
            self.fields[self._name] = self._value.decode(errors="replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


@api(batch_api=True)
async def create_file(request: Request) -> Response:
    """``POST /v1/files`` (multipart ``file`` + ``purpose``)."""
    files = store(request)
    state = sim(request)
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise bad_request("Expected a multipart/form-data body with a 'file' part.")
    file_id = new_id("file-")
    upload = _Upload(files.path(file_id), state.config.max_file_bytes)
    parser = MultipartParser(params[b"boundary"], upload.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        upload.close()
        files.path(file_id).unlink(missing_ok=True)
        raise
    except Exception as exc:
        upload.close()
        files.path(file_id).unlink(missing_ok=True)
        raise bad_request(f"Malformed multipart body: {exc}") from None
    purpose = upload.fields.get("purpose")
    if upload.filename is None:
        files.path(file_id).unlink(missing_ok=True)
        raise bad_request("Missing required parameter: 'file'.", param="file")
    if purpose not in PURPOSES:
        files.path(file_id).unlink(missing_ok=True)
        raise bad_request(f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
    state.stats.count("files.created")
    return json_response(files.add(file_id, upload.filename, purpose))


@api(batch_api=True)
async def list_files(request: Request) -> Response:
    """``GET /v1/files`` with ``purpose``, ``limit``, ``after``, ``order``."""
    files = store(request)
    query = request.query_params
    items = list(files.objects.values())
    if purpose := query.get("purpose"):
        items = [f for f in items if f["purpose"] == purpose]
    if query.get("order", "desc") == "desc":
        items.reverse()
    return json_response(
        page(items, query.get("after"), parse_limit(query.get("limit"), 10_000, 10_000))
    )


@api(batch_api=True)
async def retrieve_file(request: Request) -> Response:
    """``GET /v1/files/{id}``."""
    return json_response(store(request).get(request.path_params["file_id"]))


@api(batch_api=True)
async def file_content(request: Request) -> Response:
    """``GET /v1/files/{id}/content``, streamed from disk."""
    files = store(request)
    file_id = request.path_params["file_id"]
    files.get(file_id)
    return FileResponse(files.path(file_id), media_type="application/octet-stream")


@api(batch_api=True)
async def delete_file(request: Request) -> Response:
    """``DELETE /v1/files/{id}``."""
    file_id = request.path_params["file_id"]
    store(request).delete(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


def parse_limit(raw: str | None, maximum: int, default: int = 20) -> int:
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        raise bad_request("limit must be an integer", param="limit") from None
    if not 1 <= value <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}", param="limit")
    return value


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """A cursor page of ``items`` (already in page order) starting after the id ``after``."""
    start = 0
    if after:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }


def open_new(files: FileStore, file_id: str) -> IO[bytes]:
    """Open a new file's path for writing (used for batch output and error files)."""
    os.makedirs(files.dir, exist_ok=True)
    return open(files.path(file_id), "wb")
